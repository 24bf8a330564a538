"""Group advantages and the Atropos -> label alignment, on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from atropos_megatron.algo.advantages import expand_to_tokens, group_advantages
from atropos_megatron.algo.alignment import align_to_labels


def test_grpo_advantages_are_centred_and_std_normalised():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([7, 7, 7, 7]), eps=0.0)
    # mean 0.5, unbiased std sqrt(1/3): (1 - 0.5) / 0.57735 = 0.8660
    expected = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([expected, -expected, expected, -expected]))


def test_dr_grpo_advantages_are_only_centred():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 0, 0]), normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]))


def test_groups_are_independent_and_may_interleave():
    adv = group_advantages(
        torch.tensor([1.0, 10.0, 0.0, 20.0]), torch.tensor([0, 1, 0, 1]), normalize_std=False
    )
    torch.testing.assert_close(adv, torch.tensor([0.5, -5.0, -0.5, 5.0]))


def test_all_equal_and_singleton_groups_get_exactly_zero():
    scores = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3])
    adv = group_advantages(scores, torch.tensor([0, 0, 0, 1, 2]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def test_expand_to_tokens_zeroes_untrained_positions():
    out = expand_to_tokens(
        torch.tensor([2.0, -1.0]), torch.tensor([[False, True, True], [True, False, False]])
    )
    assert out.tolist() == [[0.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]


def test_atropos_arrays_shift_to_label_positions():
    # prompt = tokens 5, 6; completion = 7, 8 (masks are label-style: the token id where trained)
    aligned = align_to_labels(
        [5, 6, 7, 8],
        [-100, -100, 7, 8],
        advantages=[9.0, 9.0, 0.5, 0.7],
        inference_logprobs=[1.0, 1.0, -0.2, -0.3],
        ref_logprobs=[0.0, 0.0, -0.25, -0.35],
    )
    assert aligned.input_ids.tolist() == [5, 6, 7]
    assert aligned.labels.tolist() == [6, 7, 8]
    assert aligned.loss_mask.tolist() == [False, True, True]  # position 1 predicts token 7
    assert aligned.advantages.tolist() == pytest.approx([0.0, 0.5, 0.7])
    assert aligned.inference_logprobs.tolist() == pytest.approx([0.0, -0.2, -0.3])  # 1.0 placeholder dropped
    assert aligned.ref_logprobs.tolist() == pytest.approx([0.0, -0.25, -0.35])


def test_multi_turn_masks_keep_their_holes():
    aligned = align_to_labels([1, 2, 3, 4, 5], [-100, 2, -100, 4, 5])
    assert aligned.loss_mask.tolist() == [True, False, True, True]


@pytest.mark.parametrize(
    ("tokens", "masks", "extra", "match"),
    [
        ([1], [1], {}, "at least 2 tokens"),
        ([1, 2], [-100], {}, "masks has 1 entries"),
        ([1, 2, 3], [-100, 2, 9], {}, r"masks\[2\]=9"),
        ([1, 2, 3], [-100, -100, -100], {}, "no trained token"),
        ([1, 2, 3], [-100, 2, 3], {"advantages": [0.0, 1.0]}, "advantages has 2 entries"),
    ],
)
def test_malformed_sequences_are_rejected(tokens, masks, extra, match):
    with pytest.raises(ValueError, match=match):
        align_to_labels(tokens, masks, **extra)
