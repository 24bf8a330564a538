"""The logit-agreement numbers that --verify reports and decides on."""

from __future__ import annotations

import math

import pytest
import torch

from atropos_megatron.weights.verify import compare_logits, probe_tokens


def test_identical_logits_agree_perfectly():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    agreement = compare_logits(logits, logits.clone())
    assert agreement.max_abs_diff == 0.0
    assert agreement.cosine == pytest.approx(1.0, abs=1e-12)
    assert agreement.top1_agreement == 1.0
    assert agreement.positions == 10
    assert agreement.passes(tolerance=0.0)


def test_numbers_match_a_hand_computed_case():
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # second position: orthogonal, other top-1
    agreement = compare_logits(expected, got)
    assert agreement.max_abs_diff == 1.0
    assert agreement.cosine == pytest.approx(0.5)
    assert agreement.top1_agreement == 0.5
    assert not agreement.passes(tolerance=2.0)  # cosine 0.5 fails whatever the tolerance
    assert not compare_logits(expected, expected + 0.01).passes(tolerance=0.001)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(torch.zeros(2, 3), torch.zeros(2, 4))


def test_probe_tokens_are_deterministic_and_in_vocabulary():
    a, b = probe_tokens(17), probe_tokens(17)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 17
    assert not math.isclose(probe_tokens(17, seed=1).float().mean(), a.float().mean(), abs_tol=1e-9)
