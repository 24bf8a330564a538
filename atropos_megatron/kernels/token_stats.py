"""Per-token softmax statistics: all that the kernels' passes, and the tensor-parallel ranks, share.

With ``x = logits / temperature`` over a row's vocabulary (or one rank's shard of it), a pass that reads
each logit once keeps four numbers per token (an online log-sum-exp):

- ``max``          ``m = max_j x_j``
- ``sum_exp``      ``s = sum_j exp(x_j - m)``
- ``sum_shifted``  ``t = sum_j exp(x_j - m) * (x_j - m)``  (only for the entropy)
- ``label_logit``  ``x_label`` where this shard owns the label, else 0

From them: ``lse = m + log s``, ``log p(label) = x_label - lse`` and ``H = log s - t / s``. Keeping
``t`` relative to the max (instead of ``sum p * x``) avoids the cancellation ``lse - E[x]`` when the
logits are large. Under tensor parallelism each rank computes its shard's four ``[T]`` vectors and
:func:`merge_across_shards` combines them with one MAX and one SUM all-reduce: the ``[T, V]`` logits
never cross ranks.

The gradient that the second pass writes, with ``log p_j = x_j - lse`` and upstream gradients
``g_lp`` (of the label log-prob) and ``g_h`` (of the entropy)::

    d/dx_j = g_lp * (onehot(label)_j - p_j) - g_h * p_j * (log p_j + H)

and ``d/dlogits = d/dx / temperature``. A rank that does not own the label still gets the ``-p_j``
part, which is why the label logit must be reduced across ranks before the second pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

EMPTY_MAX = -1e30
"""``max`` of a shard without real vocabulary columns: finite, so that ``exp(EMPTY_MAX - m)`` is 0
without the NaN that ``-inf - -inf`` would give."""


class VocabShardStats(NamedTuple):
    """Per-token statistics of one vocabulary shard (or of the whole row), each ``[N]`` fp32."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    sum_shifted: torch.Tensor
    label_logit: torch.Tensor


class TokenStats(NamedTuple):
    """The per-token results, each ``[N]`` fp32; ``entropy`` is None unless asked for."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor


def merge_across_shards(stats: VocabShardStats, group: dist.ProcessGroup | None) -> VocabShardStats:
    """Combine the shards' statistics of a vocabulary split over ``group`` (identity without one).

    Every rank ends with the statistics of the whole vocabulary. Two collectives of ``[N]`` and
    ``[3, N]`` fp32, whatever V is.
    """
    if group is None or dist.get_world_size(group) == 1:
        return stats
    global_max = stats.max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = stats.max - global_max
    scale = torch.exp(shift)
    packed = torch.stack(
        [stats.sum_exp * scale, scale * (stats.sum_shifted + shift * stats.sum_exp), stats.label_logit]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return VocabShardStats(global_max, packed[0], packed[1], packed[2])


def finalize(stats: VocabShardStats, *, with_entropy: bool) -> TokenStats:
    """Label log-probs, entropy and log-sum-exp from whole-vocabulary statistics."""
    log_sum = torch.log(stats.sum_exp)
    lse = stats.max + log_sum
    entropy = log_sum - stats.sum_shifted / stats.sum_exp if with_entropy else None
    return TokenStats(stats.label_logit - lse, entropy, lse)


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as a ``[D0, D1, V]`` view with unit stride over V (no copy), for the kernels.

    ``[T, V]`` becomes ``[1, T, V]``; ``[B, S, V]`` and ``[S, B, V]`` (Megatron's order) stay as they are,
    transposed views included. Rows are numbered ``d0 * D1 + d1``, the order of ``x.reshape(-1)`` for the
    matching ``[D0, D1]`` per-token tensors.
    """
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [T, V] or [D0, D1, V], got shape {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary (stride 1 in the last dim)")
    return logits


def valid_columns(vocab_shard: int, vocab_start: int, vocab_size: int | None) -> int:
    """How many of a shard's columns are real vocabulary (the rest is TP padding)."""
    if vocab_size is None:
        return vocab_shard
    return max(0, min(vocab_shard, vocab_size - vocab_start))


def inverse_temperature(temperature: float | torch.Tensor, token_shape: torch.Size, device) -> torch.Tensor:
    """``1 / temperature`` as a contiguous ``[N]`` fp32 tensor, N = prod(token_shape).

    ``temperature`` is a float, or a tensor broadcastable to ``token_shape`` (per sequence ``[B, 1]``
    or per token), all > 0.
    """
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if (temperature <= 0).any():
        raise ValueError("temperature must be > 0")
    return torch.broadcast_to(1.0 / temperature, token_shape).reshape(-1).contiguous()


def is_unit_temperature(inv_temperature: torch.Tensor) -> bool:
    """Every token at temperature 1 (the usual case): the passes skip their scaling steps."""
    return bool((inv_temperature == 1).all())
