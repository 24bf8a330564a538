"""Atropos overrides (temperature priority, set_advantage_to_zero, env token advantages) on hand-made groups."""

from __future__ import annotations

import math

import pytest
import torch

from atropos_megatron.algo.advantages import group_advantages
from atropos_megatron.algo.alignment import align_to_labels
from atropos_megatron.algo.overrides import sequence_temperatures, token_advantages, zeroed_sequences
from atropos_megatron.kernels.logprobs import fused_token_logprobs


def test_temperature_priority_sequence_over_generation_params_over_group_over_default():
    temps = sequence_temperatures(
        3,
        overrides=[{"temperature": 0.5}, None, {"set_advantage_to_zero": True}],
        generation_params={"temperature": 0.9},
        group_overrides={"temperature": 1.3},
        default=0.7,
    )
    assert temps.tolist() == pytest.approx([0.5, 0.9, 0.9])
    assert sequence_temperatures(
        2, group_overrides={"temperature": 1.3}, default=0.7
    ).tolist() == pytest.approx([1.3, 1.3])
    assert sequence_temperatures(2, default=0.7).tolist() == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(overrides=[{"temperature": 0.0}]), r"overrides\[0\].temperature"),
        (dict(overrides=[{"temperature": float("nan")}]), r"overrides\[0\].temperature"),
        (dict(generation_params={"temperature": "hot"}), "generation_params.temperature"),
        (dict(group_overrides={"temperature": True}), "group_overrides.temperature"),
        (dict(overrides=[{}, {}]), "2 entries for 1"),
    ],
)
def test_malformed_temperatures_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sequence_temperatures(1, **kwargs)


def test_set_advantage_to_zero_keeps_the_tokens_but_not_the_signal():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    zeroed = zeroed_sequences(4, [None, {"set_advantage_to_zero": True}, {}, {"temperature": 1.0}])
    assert zeroed.tolist() == [False, True, False, False]
    mask = torch.tensor([[False, True, True]] * 4)
    adv = token_advantages(group_advantages(scores, torch.zeros(4), normalize_std=False), mask, zeroed=zeroed)
    assert adv.tolist() == [[0.0, 0.5, 0.5], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, -0.5, -0.5]]
    with pytest.raises(ValueError, match=r"overrides\[0\].set_advantage_to_zero"):
        zeroed_sequences(1, [{"set_advantage_to_zero": "yes"}])


def test_environment_token_advantages_replace_the_group_ones_after_the_shift():
    # Two sequences of a group; the env sent token-aligned advantages (indexed like tokens).
    seqs = [
        align_to_labels([5, 6, 7, 8], [-100, -100, 7, 8], advantages=[9.0, 9.0, 0.25, -0.75]),
        align_to_labels([5, 6, 9, 2], [-100, -100, 9, 2], advantages=[9.0, 9.0, 1.5, 0.5]),
    ]
    mask = torch.stack([s.loss_mask for s in seqs])
    env = torch.stack([s.advantages for s in seqs])
    adv = token_advantages(
        torch.tensor([3.0, -3.0]), mask, env_advantages=env, zeroed=torch.tensor([False, True])
    )
    assert adv.tolist() == [[0.0, 0.25, -0.75], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="finite"):
        token_advantages(torch.zeros(2), mask, env_advantages=torch.full((2, 3), float("inf")))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_temperature_is_the_one_log_probs_use(backend):
    """Hand-computed: logits [0, ln 3] at T=0.5 -> softmax of [0, 2 ln 3] = [1/10, 9/10]."""
    logits = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, math.log(3.0)]]])  # [N=2, T=1, V=2]
    labels = torch.tensor([[1], [1]])
    temps = sequence_temperatures(2, overrides=[{"temperature": 0.5}, None], default=1.0)
    lp, _ = fused_token_logprobs(logits, labels, temperature=temps[:, None], backend=backend)
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.9], [0.75]])))
