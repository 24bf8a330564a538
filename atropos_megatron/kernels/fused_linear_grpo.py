"""The GRPO loss straight from the last hidden states and the output layer's weight: no ``[T, V]`` logits.

``kernels.grpo_loss.fused_grpo_loss`` starts from logits that the model's output layer already
materialised (``[T, V/TP]``, plus their gradient). This op takes what the output layer takes, the
hidden states ``h [N, H]`` and this rank's weight shard ``W [V/TP, H]`` (vocabulary-parallel rows, as
Megatron's ``ColumnParallelLinear`` output layer holds them), and produces the same loss, metrics and
the gradients ``d/dh`` and ``d/dW``, a chunk of tokens at a time. This is Liger-Kernel's fused-linear
loss design (gradients computed during the forward; the backward only rescales them) extended to the
GRPO objective and to tensor parallelism.

The GRPO loss is not separable per token (GSPO's sequence ratio; the spec is one function of the
whole batch's log-probs), so the op makes two passes over the chunks, as the two-pass logits path:

1. per chunk: ``logits_c = h_c @ W^T`` (``[c, V/TP]``), then the per-token softmax statistics of
   ``token_stats`` (max, sum-exp, shifted sum, label logit). The chunk's logits are then dropped.
   The statistics of all tokens are merged over the TP group (two collectives of ``[N]`` / ``[3, N]``
   fp32; the logits never cross ranks).
2. the spec (``algo.grpo.grpo_token_loss``) on the ``[N]`` log-probs and entropies, under autograd:
   the loss, its metrics, and ``d loss / d logprob``, ``d loss / d entropy`` per token.
3. per chunk again: recompute ``logits_c``, overwrite it with ``d loss / d logits_c``, then
   ``dh_c = dlogits_c @ W`` and ``dW += dlogits_c^T @ h_c``.

That is four GEMMs of ``N x H x V/TP`` instead of three (the logits are computed twice), for a peak
extra memory of ``dh + dW`` (the results) plus one chunk's ``[c, V/TP]`` temporaries, whatever N is.
Only trained tokens (``loss_mask``) are multiplied at all: prompt and padding rows get ``dh = 0``
without a GEMM (their log-probs do not enter the loss or any metric).

Backends (``cfg.kernel``, resolved as for the logits path): ``triton`` runs the per-chunk statistics
and gradient with the Triton ``shard_stats`` / ``write_grad`` kernels of ``kernels.triton_ops``
(no ``[c, V]`` temporary; the GEMMs are torch / cuBLAS); ``torch`` (CPU, or CUDA without Triton)
runs the same passes as ``kernels.torch_ops`` but in place over the chunk's logits, which this op owns
(it recomputes them), so that a chunk costs its logits plus one ``[c, V]`` temporary.

Tensor parallelism: each rank passes its vocabulary shard of ``W`` and the full (replicated) ``h``.
The returned ``dh`` is this rank's *partial* gradient ``dlogits_local @ W_local``; the gradient of
``h`` is the sum of the partials over the TP group. Megatron's output layer gets that sum from
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) on its input, or
from the reduce-scatter of the sequence-parallel all-gather: feed ``h`` through the same region
before this op (``reduce_grad_input=True`` does the all-reduce here instead). ``dW`` is this rank's
shard's gradient, nothing to reduce.

Tied embeddings: ``W`` may be the input embedding's weight; its gradient here is an ordinary autograd
gradient and accumulates with the embedding's (Megatron's tied-embedding all-reduce across pipeline
stages then runs as usual).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from atropos_megatron.algo.grpo import grpo_token_loss
from atropos_megatron.config import GRPOConfig
from atropos_megatron.kernels.backends import backend_ops, resolve_backend
from atropos_megatron.kernels.grpo_loss import with_old_logprobs
from atropos_megatron.kernels.logprobs import VocabShard, fused_token_logprobs
from atropos_megatron.kernels.token_stats import (
    EMPTY_MAX,
    VocabShardStats,
    finalize,
    inverse_temperature,
    is_unit_temperature,
    merge_across_shards,
    rows_view,
    valid_columns,
)

MIN_CHUNK_TOKENS = 16
MAX_CHUNK_TOKENS = 1024


AUTO_LOGITS_BYTES = 256 * 2**20
"""``grpo.fused_linear: auto`` computes a micro-batch's trained-token logits in one piece (once) up to
this size, and in chunks (each twice, memory bounded) beyond it."""


def use_fused_linear(mode: str, tokens: int, local_vocab: int) -> bool:
    """Whether ``grpo.fused_linear`` (``always``, ``never`` or ``auto``) chunks the logits of micro-batches
    of ``tokens`` tokens over ``local_vocab`` vocabulary rows (``auto``: where their fp32 logits exceed
    :data:`AUTO_LOGITS_BYTES`, where the memory matters more than the recomputed logits' time)."""
    if mode == "auto":
        return tokens * local_vocab * 4 > AUTO_LOGITS_BYTES
    return mode == "always"


def single_chunk_bytes(mode: str) -> int:
    """The fused ops' ``single_chunk_bytes`` for ``grpo.fused_linear`` ``mode`` (``always``: always chunk)."""
    return AUTO_LOGITS_BYTES if mode == "auto" else 0


def default_chunk_tokens(num_tokens: int, hidden: int, local_vocab: int) -> int:
    """Tokens per chunk such that a chunk's logits are about as large as ``h`` itself (``c * V ~ N * H``),
    as a power of two in ``[MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS]``: the extra memory then scales like the
    activations, not like the vocabulary."""
    target = max(1, num_tokens * hidden // max(local_vocab, 1))
    chunk = 1 << (target.bit_length() - 1)  # largest power of two <= target
    return max(MIN_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, chunk))


class _FusedLinearGRPO(torch.autograd.Function):
    """``loss`` of ``(hidden [N, H], weight [V_local, H])``; both gradients are computed in the forward
    and the backward only multiplies them by the upstream gradient (Megatron's loss scaling)."""

    @staticmethod
    def forward(ctx, hidden, weight, run):
        loss, grad_hidden, grad_weight = run(hidden.detach(), weight.detach(), ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = None if torch.equal(grad_output, torch.ones_like(grad_output)) else grad_output
        if scale is not None:
            if grad_hidden is not None:
                grad_hidden = grad_hidden.mul_(scale.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight = grad_weight.mul_(scale.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    cfg: GRPOConfig,
    ref_logprobs: torch.Tensor | None = None,
    inference_logprobs: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
    shard: VocabShard | None = None,
    chunk_tokens: int | None = None,
    single_chunk_bytes: int = 0,
    reduce_grad_input: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``algo.grpo.grpo_token_loss`` of ``logits = hidden @ weight^T``, without ever holding those logits.

    Args:
        hidden: ``[B, T, H]`` (any view, e.g. Megatron's ``[S, B, H]`` transposed) or ``[B * T, H]``
            last hidden states (after the final norm), fp32/bf16/fp16.
        weight: ``[V_local, H]`` this rank's rows of the output layer (or the tied embedding), same dtype.
        labels, old_logprobs, advantages, loss_mask, weights, ref_logprobs, inference_logprobs,
        sequence_ids, temperature: as for :func:`kernels.grpo_loss.fused_grpo_loss` (``[B, T]``; ``old_logprobs``
            None: this pass's own, detached).
        cfg: the objective; ``cfg.kernel`` picks the per-chunk backend.
        shard: this rank's vocabulary shard and TP group (default: the whole vocabulary, no TP); rows of
            ``weight`` at or beyond ``shard.vocab_size`` (padding) are ignored.
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).
        single_chunk_bytes: all trained tokens in one chunk when their fp32 logits fit in this many
            bytes; the gradient pass then reuses those logits instead of recomputing them.
        reduce_grad_input: all-reduce ``d/dhidden`` over ``shard.group`` here (only when the caller does
            not route ``hidden`` through Megatron's ``copy_to_tensor_model_parallel_region``).

    Returns:
        ``(loss, metrics)`` like the spec. ``loss`` carries gradients to ``hidden`` and ``weight`` when
        they require grad and grad mode is on (``d/dhidden`` is this rank's partial under TP unless
        ``reduce_grad_input``); the second pass is skipped otherwise.
    """
    shard = shard or VocabShard()
    if labels.dim() != 2:
        raise ValueError(f"expected labels [B, T]; got {tuple(labels.shape)}")
    if hidden.shape[:-1] != labels.shape and hidden.shape[:-1] != (labels.numel(),):
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_local, {hidden.shape[-1]}]; got {tuple(weight.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # a copy only for non-contiguous views
    mask = loss_mask.bool()
    spec = dict(
        old_logprobs=old_logprobs, advantages=advantages, loss_mask=mask, weights=weights, cfg=cfg,
        ref_logprobs=ref_logprobs, inference_logprobs=inference_logprobs, sequence_ids=sequence_ids,
    )  # fmt: skip
    temperature = temperature if temperature is not None else cfg.temperature
    run = _Run(
        labels=labels, mask=mask, inv_temperature=inverse_temperature(temperature, labels.shape, hidden.device),
        spec=spec, shard=shard, ops=_chunk_ops(cfg.kernel, hidden.device),
        chunk_tokens=chunk_tokens, reduce_grad_input=reduce_grad_input, single_chunk_bytes=single_chunk_bytes,
    )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            loss, _, _ = run(flat_hidden, weight, (False, False))
        return loss, run.metrics
    loss = _FusedLinearGRPO.apply(flat_hidden, weight, run)
    return loss, run.metrics


def _chunk_ops(kernel: str, device: torch.device):
    """The Triton backend's passes, or None for this module's in-place torch passes (below)."""
    return backend_ops("triton") if resolve_backend(kernel, device) == "triton" else None


def _owned_shard_stats(rows, labels, inv_temperature, *, vocab_start, valid_cols, with_entropy):
    """``torch_ops.shard_stats`` for logits that this op owns (it recomputes them anyway): scaled and
    shifted in place, one ``[c, V]`` temporary (the exponentials) instead of five."""
    x = rows[0].float() if rows.dtype != torch.float32 else rows[0]
    out = torch.zeros(4, x.shape[0], dtype=torch.float32, device=x.device)
    out[0] = EMPTY_MAX
    if valid_cols == 0:
        return VocabShardStats(*out)
    x = x[:, :valid_cols]
    if not is_unit_temperature(inv_temperature):
        x.mul_(inv_temperature[:, None])
    local = labels - vocab_start
    owned = (local >= 0) & (local < valid_cols)
    out[3] = torch.where(owned, x.gather(-1, torch.where(owned, local, 0)[:, None]).squeeze(-1), 0.0)
    out[0] = x.amax(-1).clamp(min=EMPTY_MAX)
    shifted = x.sub_(out[0, :, None])
    exp = shifted.exp()
    out[1] = exp.sum(-1)
    if with_entropy:  # finite logits (a matmul's): no 0 * -inf to guard against
        out[2] = exp.mul_(shifted).sum(-1)
    return VocabShardStats(*out)


def _owned_write_grad(
    rows, out, labels, inv_temperature, lse, entropy, grad_logprobs, grad_entropy, *, vocab_start, valid_cols,
    shifted_by=None,
):  # fmt: skip
    """``torch_ops.write_grad`` in place over logits this op owns (``out is rows``), at most one ``[c, V]``
    temporary: ``d/dx_j = g_lp * onehot_j - p_j * (g_lp + g_h * (log p_j + H))``, divided by the
    temperature. ``shifted_by``: the logits are pass 1's, already scaled and shifted by this max."""
    assert out is rows
    block = rows[0]
    x = block.float() if block.dtype != torch.float32 else block
    unit = is_unit_temperature(inv_temperature)
    logp = x[:, :valid_cols]
    if shifted_by is None:
        if not unit:
            logp.mul_(inv_temperature[:, None])
        logp.sub_(lse[:, None])
    else:
        logp.sub_((lse - shifted_by)[:, None])
    if grad_entropy is None:
        grad = logp.exp_().mul_(-grad_logprobs[:, None])
    else:
        probs = logp.exp()
        grad = logp.add_(entropy[:, None]).mul_(grad_entropy[:, None]).add_(grad_logprobs[:, None])
        grad = grad.mul_(probs).neg_()
    local = labels - vocab_start
    owned = (local >= 0) & (local < valid_cols)
    grad.scatter_add_(
        -1, torch.where(owned, local, 0)[:, None], torch.where(owned, grad_logprobs, 0.0)[:, None]
    )
    if not unit:
        grad.mul_(inv_temperature[:, None])
    if x is not block:
        block[:, :valid_cols] = grad
    block[:, valid_cols:] = 0


class _Run:
    """One evaluation: the passes over the chunks; leaves the spec's metrics in ``self.metrics``."""

    def __init__(
        self, *, labels, mask, inv_temperature, spec, shard, ops, chunk_tokens, reduce_grad_input,
        single_chunk_bytes=0,
    ):  # fmt: skip
        flat_mask = mask.reshape(-1)
        # Only trained tokens are computed (the same rows on every TP rank: the mask is replicated).
        self.rows = flat_mask.nonzero().squeeze(-1)
        self.labels = labels.reshape(-1)[self.rows].contiguous()
        self.inv_t = inv_temperature[self.rows].contiguous()
        self.token_shape, self.spec, self.shard, self.ops = mask.shape, spec, shard, ops
        self.chunk_tokens, self.reduce_grad_input = chunk_tokens, reduce_grad_input
        self.single_chunk_bytes = single_chunk_bytes
        self.metrics: dict[str, torch.Tensor] = {}

    def _chunks(self, hidden, weight):
        """``(span into self.rows, h_c [c, H])``: trained tokens' hidden states, ``chunk`` at a time."""
        count = self.rows.numel()
        chunk = self.chunk_tokens or default_chunk_tokens(count, hidden.shape[1], weight.shape[0])
        if count * weight.shape[0] * 4 <= self.single_chunk_bytes:
            chunk = max(count, 1)  # all in one: pass 2 reuses pass 1's logits
        for start in range(0, count, chunk):
            span = slice(start, min(start + chunk, count))
            yield span, hidden.index_select(0, self.rows[span])

    def __call__(self, hidden, weight, needs):
        shard, ops = self.shard, self.ops
        valid = valid_columns(weight.shape[0], shard.start, shard.vocab_size)
        count = self.rows.numel()
        # Pass 1: per-token statistics of this shard, chunk by chunk.
        stats = torch.zeros(4, count, dtype=torch.float32, device=hidden.device)
        stats[0] = EMPTY_MAX
        chunks, kept = 0, None
        for span, h_c in self._chunks(hidden, weight):
            kept = None  # the previous chunk's logits go before the next ones exist
            logits = h_c @ weight.t()
            part = (ops.shard_stats if ops is not None else _owned_shard_stats)(
                rows_view(logits), self.labels[span], self.inv_t[span], vocab_start=shard.start,
                valid_cols=valid, with_entropy=True,
            )  # fmt: skip
            stats[:, span] = torch.stack(part)
            chunks += 1
            kept = (logits, h_c)
            del logits
        # One chunk: pass 2 reuses its logits (fp32 ones the torch stats left scaled and shifted by the max).
        kept = kept if chunks == 1 else None
        token = finalize(merge_across_shards(VocabShardStats(*stats), shard.group), with_entropy=True)

        # The spec on [B, T] (untrained positions: finite placeholders, masked out by the spec).
        want_grad = needs[0] or needs[1]
        logprobs = self._scatter(token.logprobs).requires_grad_(want_grad)
        entropy = self._scatter(token.entropy).requires_grad_(want_grad)
        spec = with_old_logprobs(self.spec, logprobs)
        with torch.enable_grad() if want_grad else torch.no_grad():
            loss, self.metrics = grpo_token_loss(logprobs, entropy=entropy, **spec)
        if not want_grad:
            return loss.detach(), None, None
        grads = torch.autograd.grad(loss, [logprobs, entropy], allow_unused=True)
        grad_lp, grad_h = (
            g.reshape(-1)[self.rows].float().contiguous() if g is not None else None for g in grads
        )
        if grad_lp is None:
            grad_lp = torch.zeros_like(token.lse)

        # Pass 2: each chunk's logits (recomputed, or kept from pass 1) overwritten with their gradient,
        # then the two GEMMs.
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = None
        if needs[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        chunk_iter = [(slice(0, count), kept[1])] if kept is not None else self._chunks(hidden, weight)
        for span, h_c in chunk_iter:
            logits = kept[0] if kept is not None else h_c @ weight.t()
            rows = rows_view(logits)
            grad_args = (
                rows, rows, self.labels[span], self.inv_t[span], token.lse[span], token.entropy[span],
                grad_lp[span], grad_h[span] if grad_h is not None else None,
            )  # fmt: skip
            if ops is not None:  # Triton reads the logits and leaves them as they were
                ops.write_grad(*grad_args, vocab_start=shard.start, valid_cols=valid)
            else:
                in_place = kept is not None and logits.dtype == torch.float32
                shifted_by = stats[0, span] if in_place else None
                _owned_write_grad(
                    *grad_args, vocab_start=shard.start, valid_cols=valid, shifted_by=shifted_by
                )
            kept = None
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, self.rows[span], logits @ weight)
            if grad_weight is not None:
                if logits.dtype == torch.float32:
                    grad_weight.addmm_(logits.t(), h_c)
                else:  # fp32 accumulation across chunks (a bf16 running sum would lose the small ones)
                    grad_weight.addmm_(logits.t().float(), h_c.float())
            del logits, rows
        if grad_hidden is not None and self.reduce_grad_input and shard.group is not None:
            dist.all_reduce(grad_hidden, group=shard.group)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return loss.detach(), grad_hidden, grad_weight

    def _scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[count]`` trained-token values -> ``[B, T]`` (0 elsewhere)."""
        out = torch.zeros(self.token_shape.numel(), dtype=values.dtype, device=values.device)
        out[self.rows] = values
        return out.view(self.token_shape)


@torch.no_grad()
def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    shard: VocabShard | None = None,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    mask: torch.Tensor | None = None,
    single_chunk_bytes: int = 0,
) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits = hidden @ weight^T`` (``[B, T]``, fp32), a chunk of tokens
    at a time: the forward-only passes' (old and reference log-probs) counterpart of
    :func:`fused_linear_grpo_loss`, so that no pass of a step materialises ``[T, V/TP]`` logits.

    Each chunk's logits go through ``kernels.logprobs.fused_token_logprobs`` (vocab-parallel under
    ``shard``: ``[chunk]`` statistics cross the TP group, per chunk). ``mask`` (``[B, T]`` bool, the
    same on every TP rank): only those tokens are computed, the others get 0. ``single_chunk_bytes``:
    one chunk when all their fp32 logits fit in that many bytes.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    temperatures = torch.as_tensor(temperature, dtype=torch.float32, device=hidden.device)
    flat_temperature = temperatures.expand(labels.shape).reshape(-1) if temperatures.dim() else None
    rows = mask.reshape(-1).nonzero().squeeze(-1) if mask is not None else None
    count = rows.numel() if rows is not None else flat_labels.numel()
    chunk = chunk_tokens or default_chunk_tokens(count, hidden.shape[-1], weight.shape[0])
    if count * weight.shape[0] * 4 <= single_chunk_bytes:
        chunk = max(count, 1)
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, count, chunk):
        span = rows[start : start + chunk] if rows is not None else slice(start, min(start + chunk, count))
        logits = flat_hidden[span] @ weight.t()
        out[span], _ = fused_token_logprobs(
            logits,
            flat_labels[span],
            temperature=flat_temperature[span] if flat_temperature is not None else temperatures,
            shard=shard,
            backend=backend,
        )
        del logits
    return out.view(labels.shape)
