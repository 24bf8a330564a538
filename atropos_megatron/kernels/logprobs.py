"""Token log-probs (+ entropy) from logits, vocab-parallel, without an fp32 ``[T, V]`` log-softmax.

``algo.logprobs.token_logprobs`` materialises ``log_softmax(logits.float())``: for 16k tokens and a 152k
vocabulary that is 10 GB in fp32, and as much again for autograd. Here the forward keeps only the
per-token statistics of ``token_stats`` (``[T]``), and the backward re-reads the logits once to write
their gradient, into the logits' own storage if the caller allows. Under tensor parallelism each rank
passes its vocabulary shard and the ``[T]`` statistics are all-reduced. Used for the reference model
and the recomputed old log-probs (forward only), and anywhere a loss needs log-probs with gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from atropos_megatron.kernels.backends import backend_ops, resolve_backend
from atropos_megatron.kernels.token_stats import (
    finalize,
    inverse_temperature,
    merge_across_shards,
    rows_view,
    valid_columns,
)


@dataclass(frozen=True)
class VocabShard:
    """Where a rank's logits sit in the vocabulary: columns ``[start, start + V_local)`` of a vocabulary
    whose first ``vocab_size`` ids are real (the rest is padding); ``group`` is the TP group (or None)."""

    start: int = 0
    vocab_size: int | None = None
    group: dist.ProcessGroup | None = None

    @classmethod
    def of_tp_rank(cls, local_vocab: int, vocab_size: int | None, group: dist.ProcessGroup | None):
        """The shard that Megatron's vocab-parallel output layer gives this rank of ``group``."""
        rank = dist.get_rank(group) if group is not None else 0
        return cls(start=rank * local_vocab, vocab_size=vocab_size, group=group)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, shard, with_entropy, backend, inplace_backward):
        rows = rows_view(logits.detach())
        ops = backend_ops(backend)
        valid = valid_columns(rows.shape[2], shard.start, shard.vocab_size)
        stats = ops.shard_stats(
            rows,
            labels,
            inv_temperature,
            vocab_start=shard.start,
            valid_cols=valid,
            with_entropy=with_entropy,
        )
        result = finalize(merge_across_shards(stats, shard.group), with_entropy=with_entropy)
        ctx.save_for_backward(logits, labels, inv_temperature, result.lse, result.entropy)
        ctx.shard, ctx.valid, ctx.ops, ctx.inplace_backward = shard, valid, ops, inplace_backward
        entropy = result.entropy if with_entropy else torch.zeros_like(result.lse)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return result.logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, inv_temperature, lse, entropy = ctx.saved_tensors
        rows = rows_view(logits.detach())
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if entropy is None:
            grad_entropy = None
        # In place, each row of the logits is read, then overwritten with its gradient: no second
        # [T, V] buffer. The caller gives up the logits' values (Liger's GRPO kernel does the same).
        out = rows if ctx.inplace_backward else torch.empty_like(rows)
        ctx.ops.write_grad(
            rows, out, labels, inv_temperature, lse, entropy, grad_logprobs.contiguous(),
            grad_entropy.contiguous() if grad_entropy is not None else None,
            vocab_start=ctx.shard.start, valid_cols=ctx.valid,
        )  # fmt: skip
        return out.view_as(logits), None, None, None, None, None, None


def fused_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    shard: VocabShard | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same values as :func:`algo.logprobs.token_logprobs`, in ``O(T)`` extra memory, vocab-parallel.

    Args:
        logits: ``[T, V_local]`` or ``[D0, D1, V_local]`` (e.g. Megatron's ``[S, B, V/TP]``, or a
            transposed view of it) in fp32/bf16/fp16, contiguous along the vocabulary.
        labels: ``logits.shape[:-1]`` int64 global token ids. A label outside the real vocabulary
            (e.g. -100 on a padded position) gets a meaningless log-prob: mask it out downstream.
        temperature: float, or a tensor broadcastable to ``labels`` (per sequence or per token).
        shard: this rank's vocabulary shard and TP group (default: the whole vocabulary, no TP).
        return_entropy: also return the per-token entropy (differentiable).
        backend: ``auto``, ``triton`` or ``torch`` (see ``kernels.backends``).
        inplace_backward: write the gradient into ``logits``' storage during backward (saves a
            ``[T, V]`` buffer); only when nothing reads the logits after the loss.

    Returns:
        ``(logprobs, entropy or None)`` shaped like ``labels``, fp32.
    """
    shard = shard or VocabShard()
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    flat_labels = labels.reshape(-1).contiguous()
    inv_temperature = inverse_temperature(temperature, labels.shape, logits.device)
    logprobs, entropy = _TokenLogprobs.apply(
        logits, flat_labels, inv_temperature, shard, return_entropy,
        resolve_backend(backend, logits.device), inplace_backward,
    )  # fmt: skip
    return logprobs.view(labels.shape), (entropy.view(labels.shape) if return_entropy else None)
