"""Group-relative advantages: each completion is scored against the other completions of its prompt.

GRPO (DeepSeekMath) normalises by the group's standard deviation; Dr. GRPO argues the division
biases updates toward easy/hard prompts and uses the centred score alone. Both are here
(``normalize_std``). A group whose scores are all equal carries no signal: its advantages are
exactly zero, not ``0 / eps`` rounding noise, and so is a group of one.
"""

from __future__ import annotations

import torch


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sequence advantages ``(r - mean_g) / (std_g + eps)`` (or ``r - mean_g``).

    Args:
        scores: ``[N]`` float, one finite score per sequence.
        group_ids: ``[N]`` int, sequences with the same id belong to one prompt's group.
        normalize_std: divide by the group's (unbiased) standard deviation.
        eps: added to the standard deviation.

    Returns:
        ``[N]`` fp32 advantages; exactly 0 for groups whose scores are all equal or that hold one
        sequence.

    Raises:
        ValueError: on shape mismatch or non-finite scores.
    """
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(
            f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    values = scores.double()
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.bincount(group, minlength=num_groups).double()
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, values) / count
    centred = values - mean[group]
    if normalize_std:
        sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, centred**2)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        centred = centred / (std[group] + eps)
    low = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce_(
        0, group, values, "amin"
    )
    high = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce_(
        0, group, values, "amax"
    )
    no_signal = (low == high) | (count < 2)
    return torch.where(no_signal[group], torch.zeros_like(centred), centred).float()


def expand_to_tokens(sequence_advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence to its trained tokens.

    Args:
        sequence_advantages: ``[B]`` float.
        loss_mask: ``[B, T]`` bool, True where a token is trained.

    Returns:
        ``[B, T]`` fp32, the sequence's advantage on trained tokens and 0 elsewhere.
    """
    return sequence_advantages.float().unsqueeze(1) * loss_mask.float()
