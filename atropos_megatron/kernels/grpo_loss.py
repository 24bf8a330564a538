"""The GRPO loss straight from (vocab-parallel) logits, with ``d loss / d logits`` computed in the forward.

Liger's design, extended to tensor parallelism: the gradient is known as soon as the per-token loss
is, so the forward writes it (into the logits' own storage when ``inplace``; the logits are dead after
the loss) and the backward only hands it on. Peak extra memory is then ``O(T)``, not the
``3 x [T, V]`` fp32 of ``log_softmax`` + its saved output + its gradient.

Two paths, same numbers (the tests hold both to ``algo.grpo.grpo_token_loss`` in fp64):

- **one kernel** (Triton, whole vocabulary on this rank, token-level ratio): statistics, per-token
  loss and gradient in one program per token; the logits are read twice and written once.
- **two passes** (any backend, any TP, GSPO): pass 1 gives per-token statistics, merged across the
  TP group (only ``[T]`` vectors move); the loss and ``d loss / d logprob`` then come from the spec
  itself on ``[T]``-sized tensors (autograd on tiny tensors); pass 2 writes the gradient.
"""

from __future__ import annotations

import torch

from atropos_megatron.algo.grpo import grpo_token_loss, truncated_importance_weight
from atropos_megatron.config import GRPOConfig
from atropos_megatron.kernels.backends import backend_ops, resolve_backend
from atropos_megatron.kernels.logprobs import VocabShard
from atropos_megatron.kernels.token_stats import (
    finalize,
    inverse_temperature,
    merge_across_shards,
    rows_view,
    valid_columns,
)


class _PrecomputedGrad(torch.autograd.Function):
    """Returns ``loss``; its backward gives ``logits`` the gradient already written in the forward."""

    @staticmethod
    def forward(ctx, logits, loss, grad_logits):
        ctx.save_for_backward(grad_logits)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_logits,) = ctx.saved_tensors
        # Megatron scales the loss (1 / micro-batches, loss scale): one extra pass over [T, V] unless 1.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad_logits = grad_logits.mul_(grad_output.to(grad_logits.dtype))
        return grad_logits, None, None


def fused_grpo_loss(
    logits: torch.Tensor,
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
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``algo.grpo.grpo_token_loss`` evaluated from logits, its gradient written during the forward.

    Args:
        logits: ``[B, T, V_local]`` (or a transposed view of Megatron's ``[T, B, V_local]``), any float
            dtype, contiguous along the vocabulary.
        labels: ``[B, T]`` int64 global token ids (any value where ``loss_mask`` is False).
        old_logprobs, advantages, loss_mask, weights, ref_logprobs, inference_logprobs: ``[B, T]``, as
            for :func:`algo.grpo.grpo_token_loss`; so is ``sequence_ids`` (packed rows: which sequence
            each token is; None: each row is one sequence).
            ``old_logprobs`` None: the log-probs this pass computes, detached (on-policy: a batch
            taken in one update, whose policy has not moved since sampling; the ratio is exactly 1).
        cfg: the objective; ``cfg.kernel`` picks the backend.
        temperature: float or tensor broadcastable to ``[B, T]`` (default ``cfg.temperature``).
        shard: this rank's vocabulary shard and TP group (default: whole vocabulary).
        inplace: write the gradient over ``logits`` (nothing may read them afterwards).

    Returns:
        ``(loss, metrics)`` like the spec. ``loss`` carries the gradient to ``logits`` when they require
        grad and grad mode is on; otherwise nothing is written and the logits are untouched.
    """
    shard = shard or VocabShard()
    if labels.shape != logits.shape[:-1] or labels.dim() != 2:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")  # fmt: skip
    rows = rows_view(logits.detach())  # kernel I/O outside autograd; in-place writes bump the version
    backend = resolve_backend(cfg.kernel, logits.device)
    mask = loss_mask.bool()
    spec = dict(
        old_logprobs=old_logprobs, advantages=advantages, loss_mask=mask, weights=weights, cfg=cfg,
        ref_logprobs=ref_logprobs, inference_logprobs=inference_logprobs, sequence_ids=sequence_ids,
    )  # fmt: skip
    flat = _Flat(labels, mask, temperature if temperature is not None else cfg.temperature, logits.device)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    grad_out = (rows if inplace else torch.empty_like(rows)) if needs_grad else None
    valid = valid_columns(rows.shape[2], shard.start, shard.vocab_size)
    with torch.no_grad():
        one_kernel = shard.group is None and cfg.policy_loss == "ppo_clip" and old_logprobs is not None
        if backend == "triton" and one_kernel:
            loss, metrics = _one_kernel(rows, grad_out, flat, valid, spec)
        else:
            loss, metrics = _two_pass(backend_ops(backend), rows, grad_out, flat, valid, shard, spec)
    if not needs_grad:
        return loss, metrics
    return _PrecomputedGrad.apply(logits, loss, grad_out.view_as(logits)), metrics


def _one_kernel(rows, grad_out, flat, valid_cols: int, spec: dict):
    """Triton, whole vocabulary here, token-level ratio: statistics, loss and gradient in one kernel."""
    from atropos_megatron.kernels import triton_ops

    cfg, mask = spec["cfg"], spec["loss_mask"]
    tis = None
    if cfg.importance_correction != "none":
        if spec["inference_logprobs"] is None:
            raise ValueError("grpo.importance_correction needs inference_logprobs")
        tis = truncated_importance_weight(
            spec["old_logprobs"], spec["inference_logprobs"], mask, cfg, spec["sequence_ids"]
        )
    if cfg.kl_coef > 0 and spec["ref_logprobs"] is None:
        raise ValueError("grpo.kl_coef > 0 needs ref_logprobs")
    per_token, logprobs, entropy = triton_ops.fused_grpo_token_loss(
        rows, grad_out, flat.labels, flat.inv_temperature, flat.mask,
        _flat32(torch.where(mask, spec["weights"], 0.0)), _flat32(spec["old_logprobs"]),
        _flat32(spec["advantages"]), _flat32(tis.expand_as(mask)) if tis is not None else None,
        _flat32(spec["ref_logprobs"]) if cfg.kl_coef > 0 else None,
        valid_cols=valid_cols, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp,
        entropy_coef=cfg.entropy_coef, with_entropy=True,
    )  # fmt: skip
    # Metrics from the kernel's own log-probs, by the spec ([T]-sized, cheap).
    _, metrics = grpo_token_loss(logprobs.view(mask.shape), entropy=entropy.view(mask.shape), **spec)
    return per_token.sum(), metrics


def _two_pass(ops, rows, grad_out, flat, valid_cols: int, shard: VocabShard, spec: dict):
    """Statistics (merged over TP) -> the spec on [T] tensors with autograd -> the gradient pass."""
    mask = spec["loss_mask"]
    stats = ops.shard_stats(
        rows, flat.labels, flat.inv_temperature, vocab_start=shard.start, valid_cols=valid_cols,
        with_entropy=True,  # the entropy is always logged: it costs arithmetic, not memory traffic
    )  # fmt: skip
    token = finalize(merge_across_shards(stats, shard.group), with_entropy=True)
    needs_grad = grad_out is not None
    logprobs = token.logprobs.view(mask.shape).requires_grad_(needs_grad)
    entropy = token.entropy.view(mask.shape).requires_grad_(needs_grad)
    with torch.enable_grad():
        loss, metrics = grpo_token_loss(logprobs, entropy=entropy, **with_old_logprobs(spec, logprobs))
    if needs_grad:
        grads = torch.autograd.grad(loss, [logprobs, entropy], allow_unused=True)
        grad_lp = _flat32(grads[0] if grads[0] is not None else torch.zeros_like(logprobs))
        grad_h = _flat32(grads[1]) if grads[1] is not None else None  # no entropy term: a cheaper pass
        ops.write_grad(
            rows, grad_out, flat.labels, flat.inv_temperature, token.lse, token.entropy, grad_lp, grad_h,
            vocab_start=shard.start, valid_cols=valid_cols,
        )  # fmt: skip
    return loss.detach(), metrics


def with_old_logprobs(spec: dict, logprobs: torch.Tensor) -> dict:
    """``spec`` whose ``old_logprobs``, when None, are ``logprobs`` themselves, detached."""
    return spec if spec["old_logprobs"] is not None else {**spec, "old_logprobs": logprobs.detach()}


class _Flat:
    """The per-token inputs every path needs, flattened to ``[N]`` in the logits' row order."""

    def __init__(self, labels, mask, temperature, device):
        self.mask = mask.reshape(-1).contiguous()
        # Untrained positions may carry any id (-100, padding): point them at no column.
        self.labels = torch.where(self.mask, labels.reshape(-1), -1).contiguous()
        self.inv_temperature = inverse_temperature(temperature, labels.shape, device)


def _flat32(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1).float().contiguous()
