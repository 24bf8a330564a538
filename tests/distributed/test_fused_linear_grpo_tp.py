"""The fused linear GRPO loss with the output weight split by vocabulary rows over 2 gloo ranks equals TP=1.

Each rank holds the replicated hidden states and half of a padded output weight (V = 97 real rows
padded to 104, 52 per rank, as Megatron's vocab-parallel output layer holds them); only ``[T]``
statistics cross ranks. Loss and metrics must equal TP=1's on every rank. ``d/dh`` on a rank is its
partial ``dlogits_local @ W_local``: summed over the TP group (what the all-reduce in the backward of
Megatron's ``copy_to_tensor_model_parallel_region`` does to the output layer's input) it must equal
TP=1's ``d/dh``, and ``reduce_grad_input=True`` must give that sum directly. Each rank's ``d/dW`` must
equal TP=1's rows for its shard.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

TP = 2
OBJECTIVES = {
    "ppo-clip+kl-k3+entropy": dict(clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01),
    "gspo+tis-sequence": dict(
        policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, importance_correction="sequence"
    ),
}


def _body(rank, world_size):
    import torch.distributed as dist

    from atropos_megatron.config import GRPOConfig
    from atropos_megatron.kernels import torch_ops
    from atropos_megatron.kernels.fused_linear_grpo import fused_linear_grpo_loss
    from atropos_megatron.kernels.logprobs import VocabShard
    from tests.kernel_reference import relative_error
    from tests.unit.test_fused_linear_grpo import (
        PADDED,
        TEMPERATURE,
        VOCAB,
        linear_inputs,
        reference_fp64,
    )

    torch_ops.DEFAULT_CHUNK_TOKENS = 4
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    local = PADDED // world_size
    rows = slice(rank * local, (rank + 1) * local)
    shard = VocabShard.of_tp_rank(local, VOCAB, group)
    errors = {}

    hidden, weight, inputs = linear_inputs(seed=9)
    # Labels on both ranks' halves (the shard boundary is id 52), none in the padding.
    for objective, overrides in OBJECTIVES.items():
        cfg = GRPOConfig(kernel="torch", **overrides)
        results = {}
        for name, w, this_shard, reduce in (
            ("tp1", weight, VocabShard(vocab_size=VOCAB), False),
            ("tp2", weight[rows], shard, False),
            ("tp2-reduced", weight[rows], shard, True),
        ):
            h, w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
            loss, metrics = fused_linear_grpo_loss(
                h, w, **inputs, cfg=cfg, temperature=TEMPERATURE, shard=this_shard, chunk_tokens=7,
                reduce_grad_input=reduce,
            )  # fmt: skip
            loss.backward()
            results[name] = (loss.detach(), metrics, h.grad, w.grad)
        tp1, tp2, reduced = results["tp1"], results["tp2"], results["tp2-reduced"]
        summed_dh = tp2[2].clone()
        dist.all_reduce(summed_dh, group=group)  # the output layer's input-gradient all-reduce
        ref_loss, _, ref_dh, ref_dw = reference_fp64(hidden, weight, inputs, cfg, temperature=TEMPERATURE)
        # Metrics are fp32 scalars (some small, e.g. the KL): held to the fp32 bar, not to 2e-6.
        errors[f"{objective}/metrics-vs-tp1"] = max(
            (tp2[1][k].double() - v.double()).abs().item() / max(v.abs().item(), 1.0)
            for k, v in tp1[1].items()
        )
        errors[f"{objective}/vs-tp1"] = max(
            relative_error(tp2[0], tp1[0]),
            relative_error(summed_dh, tp1[2]),
            relative_error(reduced[2], tp1[2]),
            relative_error(tp2[3], tp1[3][rows]),
        )
        errors[f"{objective}/vs-fp64"] = max(
            relative_error(tp2[0], ref_loss),
            relative_error(summed_dh, ref_dh),
            relative_error(tp2[3], ref_dw[rows]),
        )
        # The partial is not the whole: each rank only sees its half of the vocabulary.
        errors[f"{objective}/partial-differs"] = float(relative_error(tp2[2], tp1[2]) > 1e-3)
        errors[f"{objective}/same-metrics"] = float(set(tp2[1]) == set(tp1[1]))
    dist.destroy_process_group()
    return errors


def test_tp2_equals_tp1_and_the_fp64_spec(report):
    per_rank = run_ranks(_body, TP, timeout_s=180)
    worst = {key: max(errors[key] for errors in per_rank) for key in per_rank[0]}
    report(
        "fused linear GRPO, TP=2 vs TP=1 worst relative error: "
        f"{max(v for k, v in worst.items() if k.endswith('vs-tp1')):.1e}; "
        f"vs fp64: {max(v for k, v in worst.items() if k.endswith('vs-fp64')):.1e}"
    )
    report("per check: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for key, value in worst.items():
        if key.endswith(("partial-differs", "same-metrics")):
            assert min(errors[key] for errors in per_rank) == 1.0, key
        else:
            assert value < (2e-6 if key.endswith("/vs-tp1") else 1e-5), key
