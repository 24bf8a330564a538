"""Atropos's per-sequence and per-group overrides, turned into the tensors the loss takes.

An Atropos group (``ScoredData``) can carry, besides its scores:

- ``overrides[i]``: per sequence, ``set_advantage_to_zero`` (keep the sample, learn nothing from it)
  and ``temperature`` (the sequence was sampled at another temperature);
- ``generation_params`` (``{"temperature": t}``) and ``group_overrides`` (``{"temperature": t}``).

The temperature a sequence was sampled at is what its log-probs must be computed at; the priority is
the one Atropos's own example trainer uses: ``overrides[i].temperature`` > ``generation_params`` >
``group_overrides`` > the configured default. Token-level ``advantages`` sent by the environment
replace the group-relative ones for that group. Malformed values raise ``ValueError`` naming the
field, so that the caller can skip the group with a counted reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def sequence_temperatures(
    num_sequences: int,
    *,
    overrides: Sequence[Mapping[str, Any] | None] | None = None,
    generation_params: Mapping[str, Any] | None = None,
    group_overrides: Mapping[str, Any] | None = None,
    default: float = 1.0,
) -> torch.Tensor:
    """The sampling temperature of each sequence of one group, ``[N]`` fp32."""
    group_value = default
    for source, name in ((group_overrides, "group_overrides"), (generation_params, "generation_params")):
        if source and source.get("temperature") is not None:
            group_value = _positive_float(source["temperature"], f"{name}.temperature")
    values = [group_value] * num_sequences
    for i, override in enumerate(_per_sequence(overrides, num_sequences)):
        if override and override.get("temperature") is not None:
            values[i] = _positive_float(override["temperature"], f"overrides[{i}].temperature")
    return torch.tensor(values, dtype=torch.float32)


def zeroed_sequences(
    num_sequences: int, overrides: Sequence[Mapping[str, Any] | None] | None
) -> torch.Tensor:
    """``[N]`` bool, True where ``overrides[i].set_advantage_to_zero`` is set."""
    flags = []
    for i, override in enumerate(_per_sequence(overrides, num_sequences)):
        value = (override or {}).get("set_advantage_to_zero", False)
        if not isinstance(value, bool):
            raise ValueError(f"overrides[{i}].set_advantage_to_zero must be true or false, got {value!r}")
        flags.append(value)
    return torch.tensor(flags, dtype=torch.bool)


def token_advantages(
    sequence_advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    env_advantages: torch.Tensor | None = None,
    zeroed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantages of one group: the environment's if it sent them, else the sequence's own.

    Args:
        sequence_advantages: ``[N]`` group-relative advantages (``advantages.group_advantages``).
        loss_mask: ``[N, T]`` bool, label-aligned.
        env_advantages: ``[N, T]`` label-aligned token advantages from Atropos (``align_to_labels``).
        zeroed: ``[N]`` bool from :func:`zeroed_sequences`.

    Returns:
        ``[N, T]`` fp32, 0 on untrained tokens and on zeroed sequences.
    """
    if env_advantages is not None:
        if env_advantages.shape != loss_mask.shape:
            raise ValueError(
                f"advantages {tuple(env_advantages.shape)} do not match the tokens {tuple(loss_mask.shape)}"
            )
        if not torch.isfinite(env_advantages).all():
            raise ValueError("advantages must be finite")
        values = env_advantages.float()
    else:
        values = sequence_advantages.float().unsqueeze(1).expand(loss_mask.shape)
    keep = loss_mask.bool()
    if zeroed is not None:
        keep = keep & ~zeroed.bool().unsqueeze(1)
    return torch.where(keep, values, 0.0)


def _per_sequence(overrides, num_sequences: int) -> Sequence[Mapping[str, Any] | None]:
    if overrides is None:
        return [None] * num_sequences
    if len(overrides) != num_sequences:
        raise ValueError(f"overrides has {len(overrides)} entries for {num_sequences} sequences")
    return overrides


def _positive_float(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
