"""Batch planning: every trained token lands in exactly one micro-batch of one data-parallel rank, with
the weight that makes all partial losses add up to the batch loss, and packed sequences cannot see
each other."""

from __future__ import annotations

import json

import pytest
import torch

from atropos_megatron.config import DataConfig, GRPOConfig
from atropos_megatron.data.batching import (
    assign_to_ranks,
    build_rollouts,
    plan_micro_batches,
    split_into_updates,
)
from tests.rollouts import synthetic_batch

GRPO = GRPOConfig()


def _plans(data: DataConfig, dp_size: int, grpo: GRPOConfig = GRPO):
    rollouts, _ = build_rollouts(synthetic_batch(3, groups=5, group_size=3), grpo)
    return rollouts, [
        plan_micro_batches(rollouts, data=data, grpo=grpo, dp_rank=r, dp_size=dp_size) for r in range(dp_size)
    ]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_every_trained_token_is_planned_once_with_weights_summing_to_one(packing, dp_size):
    data = DataConfig(max_token_len=32, micro_batch_tokens=64, pad_to_multiple_of=8, packing=packing)
    rollouts, plans = _plans(data, dp_size)
    planned = sorted(
        (int(mb["labels"][mask].sum()), int(mask.sum()))
        for plan in plans
        for mb in plan
        for mask in [mb["loss_mask"]]
    )
    assert sum(count for _, count in planned) == sum(int(r.loss_mask.sum()) for r in rollouts)
    # token-mean: every trained token weighs 1/N of the whole batch, whichever rank holds it.
    total_weight = sum(float(mb["weights"].sum()) for plan in plans for mb in plan)
    assert total_weight == pytest.approx(1.0, abs=1e-6)
    for plan in plans:
        assert len({tuple(mb["tokens"].shape) for mb in plan}) == 1, (
            "one shape per rank (pipeline parallelism)"
        )
        for mb in plan:
            assert mb["tokens"].numel() <= max(data.micro_batch_tokens, mb["tokens"].shape[1])
            assert mb["trained_tokens"] == int(mb["loss_mask"].sum())


@pytest.mark.parametrize(("loss_norm_length", "norm"), [(None, 32), (24, 24)])
def test_seq_mean_token_sum_norm_divides_by_grpo_loss_norm_length(loss_norm_length, norm):
    """null keeps the old constant, data.max_token_len; a set value replaces it (e.g. the completion budget)."""
    grpo = GRPOConfig(loss_aggregation="seq-mean-token-sum-norm", loss_norm_length=loss_norm_length)
    rollouts, (plan,) = _plans(DataConfig(max_token_len=32, micro_batch_tokens=64), 1, grpo)
    sequences = sum(bool(r.loss_mask.any()) for r in rollouts)
    for mb in plan:
        weights = mb["weights"][mb["loss_mask"]]
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / (sequences * norm)))
        assert not mb["weights"][~mb["loss_mask"]].any()


def test_the_loss_pass_refuses_weights_planned_for_another_aggregation():
    from atropos_megatron.trainer.grpo_step import require_planned_for

    data = DataConfig(max_token_len=32, micro_batch_tokens=64)
    _, (plan,) = _plans(data, 1)
    require_planned_for(plan, GRPO)  # same config: fine
    for other in (
        GRPOConfig(loss_aggregation="seq-mean-token-mean"),
        GRPOConfig(loss_aggregation="seq-mean-token-sum-norm", loss_norm_length=16),
    ):
        with pytest.raises(ValueError, match="grpo.loss_aggregation"):
            require_planned_for(plan, other)
    unplanned = {k: v for k, v in plan[0].items() if k != "aggregation"}  # made by something else
    with pytest.raises(ValueError, match="None"):
        require_planned_for([unplanned], GRPO)


def test_packed_micro_batches_are_one_thd_row_whose_segments_are_the_sequences():
    data = DataConfig(max_token_len=32, micro_batch_tokens=64, pad_to_multiple_of=8)
    rollouts, (plan,) = _plans(data, 1)
    unplaced = [r.input_ids.tolist() for r in rollouts]
    assert len(plan) > 1, "the test needs more than one micro-batch"
    for mb in plan:
        assert mb["tokens"].shape == plan[0]["tokens"].shape and mb["tokens"].shape[0] == 1
        assert mb["tokens"].shape[1] <= data.micro_batch_tokens
        edges = mb["cu_seqlens"].tolist()
        assert mb["cu_seqlens"].dtype == torch.int32 and edges[0] == 0 and edges[-1] == mb["tokens"].shape[1]
        spans = list(zip(edges[:-1], edges[1:], strict=True))
        assert mb["max_seqlen"] == max(stop - start for start, stop in spans)
        for k, (start, stop) in enumerate(spans):
            torch.testing.assert_close(mb["position_ids"][0, start:stop], torch.arange(stop - start))
            tokens = mb["tokens"][0, start:stop].tolist()
            if tokens in unplaced:
                unplaced.remove(tokens)
            else:  # only the row's padding tail is not a sequence
                assert k == len(spans) - 1 and not any(tokens) and not mb["loss_mask"][0, start:].any()
    assert not unplaced, "every sequence is exactly one segment"


def test_rank_shares_are_balanced_and_deterministic():
    lengths = [9, 1, 7, 3, 5, 5, 2, 8]
    shares = assign_to_ranks(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths)
    assert shares == assign_to_ranks(lengths, 3)


def test_a_rank_without_sequences_gets_one_untrained_micro_batch():
    rollouts, _ = build_rollouts(synthetic_batch(1, groups=1, group_size=2), GRPO)
    (empty,) = plan_micro_batches(
        rollouts, data=DataConfig(max_token_len=32), grpo=GRPO, dp_rank=2, dp_size=3
    )
    assert empty["trained_tokens"] == 0 and not empty["loss_mask"].any()


def test_rollouts_take_group_advantages_temperatures_and_zeroed_sequences_from_the_batch():
    batch = synthetic_batch(2, groups=2, group_size=3)
    overrides = {"overrides": [{"temperature": 0.5}, {"set_advantage_to_zero": True}, None]}
    batch.groups[1].overrides_json = json.dumps(overrides)
    rollouts, stats = build_rollouts(batch, GRPO)
    scores = torch.as_tensor(batch.scores)
    first = (scores[:3] - scores[:3].mean()) / (scores[:3].std() + GRPO.advantage_eps)
    for j in range(3):
        trained = rollouts[j].advantages[rollouts[j].loss_mask]
        assert torch.allclose(trained, first[j].expand_as(trained), atol=1e-6)
    assert [r.temperature for r in rollouts[3:]] == [0.5, 1.0, 1.0]
    assert not rollouts[4].advantages.any(), "set_advantage_to_zero was ignored"
    assert stats.sequences == 6 and stats.groups == 2
    assert stats.reward_mean == pytest.approx(float(scores.mean()))


def test_updates_take_whole_groups_in_order():
    rollouts, _ = build_rollouts(synthetic_batch(4, groups=5, group_size=2), GRPO)
    minis = split_into_updates(rollouts, 2)
    assert [sorted({r.group for r in mini}) for mini in minis] == [[0, 1, 2], [3, 4]]
    assert sum(len(m) for m in minis) == len(rollouts)
    assert len(split_into_updates(rollouts, 8)) == 5, "more updates than groups: one group each"
