"""Triton kernels for ``token_stats``'s two passes, and the one-kernel GRPO token loss.

One program per token row streams the row's vocabulary in ``BLOCK_V`` slices: no ``[T, V]`` fp32
temporary exists, the logits are read once per pass and the gradient is written (optionally over the
logits) in the input dtype. Any V: the last slice is masked.

- ``_shard_stats_kernel``: pass 1, the online log-sum-exp statistics of ``token_stats``.
- ``_grad_kernel``: pass 2, ``d loss / d logits`` from the final per-token statistics.
- ``_fused_grpo_kernel``: both passes plus the per-token GRPO loss in between (PPO clip with
  separate low/high bounds, dual clip, KL to the reference with k1/k2/k3 and k3's value clamp,
  entropy bonus, a constant per-token importance weight), for a whole vocabulary on one rank. It
  mirrors ``algo.grpo.grpo_token_loss`` line by line, including how torch splits the gradient at ties of
  ``min``/``clamp``, and the tests hold it to that spec.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests only; set it before importing this module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atropos_megatron.algo.kl import MAX_LOG_RATIO
from atropos_megatron.config import KL_ESTIMATORS
from atropos_megatron.kernels.token_stats import EMPTY_MAX, VocabShardStats

MAX_BLOCK_V = 4096
"""Vocabulary slice per loop step: 16 KB of fp32 per program, enough to keep HBM busy."""

_EMPTY_MAX = tl.constexpr(EMPTY_MAX)


@triton.jit
def _label_in_shard(labels_ptr, row, vocab_start, valid_cols):
    """The row's label as a column of this shard, or -1 when another shard (or nobody) owns it."""
    label = tl.load(labels_ptr + row) - vocab_start
    return tl.where((label >= 0) & (label < valid_cols), label, -1)


@triton.jit
def _online_stats(row_ptr, inv_t, label, valid_cols, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """One read of a row: (max, sum exp(x - max), sum exp(x - max) * (x - max), x[label])."""
    row_max = _EMPTY_MAX
    sum_exp = 0.0
    sum_shifted = 0.0
    label_logit = 0.0
    for start in range(0, valid_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < valid_cols, other=float("-inf")).to(tl.float32) * inv_t
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        rescale = tl.exp(row_max - new_max)
        exp = tl.exp(x - new_max)
        if WITH_ENTROPY:
            shifted = tl.where(exp > 0, x - new_max, 0.0)
            sum_shifted = rescale * (sum_shifted + (row_max - new_max) * sum_exp) + tl.sum(
                exp * shifted, axis=0
            )
        sum_exp = sum_exp * rescale + tl.sum(exp, axis=0)
        label_logit += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
        row_max = new_max
    return row_max, sum_exp, sum_shifted, label_logit


@triton.jit
def _write_grad_row(
    row_ptr, out_ptr, inv_t, label, lse, entropy, grad_lp, grad_h, valid_cols, n_cols,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):  # fmt: skip
    """One read and one write of a row: ``(g_lp (onehot - p) - g_h p (log p + H)) / T``; padding gets 0."""
    # A row without upstream gradient (an untrained token) is only zero-filled: its logits are not read.
    active = (grad_lp != 0.0) | (grad_h != 0.0)
    read_cols = tl.where(active, valid_cols, 0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < read_cols, other=float("-inf")).to(tl.float32) * inv_t
        logp = x - lse
        probs = tl.exp(logp)
        grad = tl.where(cols == label, grad_lp, 0.0) - probs * grad_lp
        if WITH_ENTROPY:
            # where() first: 0 * -inf on the padding columns would be NaN.
            grad -= grad_h * probs * tl.where(probs > 0, logp + entropy, 0.0)
        tl.store(out_ptr + cols, (grad * inv_t).to(out_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _shard_stats_kernel(
    logits_ptr, labels_ptr, inv_temp_ptr, stats_ptr, n_rows, n_inner, stride_outer, stride_inner,
    vocab_start, valid_cols, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
    label = _label_in_shard(labels_ptr, row, vocab_start, valid_cols)
    inv_t = tl.load(inv_temp_ptr + row)
    row_max, sum_exp, sum_shifted, label_logit = _online_stats(
        row_ptr, inv_t, label, valid_cols, BLOCK_V, WITH_ENTROPY
    )
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + n_rows + row, sum_exp)
    tl.store(stats_ptr + 2 * n_rows + row, sum_shifted)
    tl.store(stats_ptr + 3 * n_rows + row, label_logit)


@triton.jit
def _grad_kernel(
    logits_ptr, out_ptr, labels_ptr, inv_temp_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_h_ptr,
    n_inner, stride_outer, stride_inner, out_stride_outer, out_stride_inner, vocab_start, valid_cols, n_cols,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
    out_row_ptr = out_ptr + _row_offset(row, n_inner, out_stride_outer, out_stride_inner)
    label = _label_in_shard(labels_ptr, row, vocab_start, valid_cols)
    entropy = 0.0
    grad_h = 0.0
    if WITH_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_h = tl.load(grad_h_ptr + row)
    _write_grad_row(
        row_ptr, out_row_ptr, tl.load(inv_temp_ptr + row), label, tl.load(lse_ptr + row), entropy,
        tl.load(grad_lp_ptr + row), grad_h, valid_cols, n_cols, BLOCK_V, WITH_ENTROPY,
    )  # fmt: skip


@triton.jit
def _min_with_grad(a, grad_a, b, grad_b):
    """``min(a, b)`` and its gradient, split in half at a tie as ``torch.minimum`` does."""
    grad = tl.where(a < b, grad_a, tl.where(a > b, grad_b, 0.5 * (grad_a + grad_b)))
    return tl.minimum(a, b), grad


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without the cancellation near 0 (Taylor to x^6 below |x| = 0.1)."""
    series = x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0 * (1.0 + x / 6.0)))))
    return tl.where(tl.abs(x) < 0.1, series, tl.exp(x) - 1.0)


@triton.jit
def _fused_grpo_kernel(
    logits_ptr, out_ptr, labels_ptr, inv_temp_ptr, active_ptr, weight_ptr, old_ptr, adv_ptr, tis_ptr, ref_ptr,
    result_ptr, n_rows, n_inner, stride_outer, stride_inner, out_stride_outer, out_stride_inner,
    valid_cols, n_cols, clip_low, clip_high, dual_clip, kl_coef, kl_clamp, entropy_coef, max_log_ratio,
    HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
    HAS_TIS: tl.constexpr, WITH_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
    label = _label_in_shard(labels_ptr, row, 0, valid_cols)
    inv_t = tl.load(inv_temp_ptr + row)
    active = tl.load(active_ptr + row) != 0
    # Pass 1 (skipped for untrained tokens, whose logits are never read).
    row_max, sum_exp, sum_shifted, label_logit = _online_stats(
        row_ptr, inv_t, label, tl.where(active, valid_cols, 0), BLOCK_V, WITH_ENTROPY
    )
    log_sum = tl.log(tl.where(active, sum_exp, 1.0))
    lse = row_max + log_sum
    logprob = tl.where(active, label_logit - lse, 0.0)
    entropy = tl.where(active, log_sum - sum_shifted / tl.where(active, sum_exp, 1.0), 0.0)

    # The per-token loss and d loss / d logprob: algo/grpo.py's formula, written out.
    weight = tl.load(weight_ptr + row)
    adv = tl.load(adv_ptr + row)
    log_ratio_raw = logprob - tl.load(old_ptr + row)
    log_ratio = tl.minimum(tl.maximum(log_ratio_raw, -max_log_ratio), max_log_ratio)
    ratio = tl.exp(log_ratio)
    ratio_grad = tl.where(tl.abs(log_ratio_raw) <= max_log_ratio, ratio, 0.0)  # d ratio / d logprob
    low = 1.0 - clip_low
    high = 1.0 + clip_high
    clipped = tl.minimum(tl.maximum(ratio, low), high)
    inside = (ratio >= low) & (ratio <= high)
    neg_surrogate, neg_grad = _min_with_grad(ratio * adv, adv, clipped * adv, tl.where(inside, adv, 0.0))
    surrogate = -neg_surrogate
    grad_ratio = -neg_grad  # d surrogate / d ratio
    if HAS_DUAL_CLIP:
        bounded, bounded_grad = _min_with_grad(surrogate, grad_ratio, -dual_clip * adv, 0.0)
        surrogate = tl.where(adv < 0, bounded, surrogate)
        grad_ratio = tl.where(adv < 0, bounded_grad, grad_ratio)
    if HAS_TIS:
        tis = tl.load(tis_ptr + row)
        surrogate *= tis
        grad_ratio *= tis
    per_token = surrogate
    grad_lp = grad_ratio * ratio_grad
    if KL_ESTIMATOR > 0:
        ref_ratio_raw = tl.load(ref_ptr + row) - logprob
        ref_ratio = tl.minimum(tl.maximum(ref_ratio_raw, -max_log_ratio), max_log_ratio)
        kl_in_range = tl.abs(ref_ratio_raw) <= max_log_ratio
        if KL_ESTIMATOR == 1:
            kl = -ref_ratio
            kl_grad = tl.where(kl_in_range, 1.0, 0.0)
        elif KL_ESTIMATOR == 2:
            kl = 0.5 * ref_ratio * ref_ratio
            kl_grad = tl.where(kl_in_range, -ref_ratio, 0.0)
        else:
            expm1 = _expm1(ref_ratio)
            kl = expm1 - ref_ratio
            kl_grad = tl.where(kl_in_range, -expm1, 0.0)
            if HAS_KL_CLAMP:
                # clamp(kl, -c, c): the gradient passes where -c <= kl <= c (inclusive, as in torch).
                kl_grad = tl.where(tl.abs(kl) <= kl_clamp, kl_grad, 0.0)
                kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
        per_token += kl_coef * kl
        grad_lp += kl_coef * kl_grad
    grad_h = 0.0
    if WITH_ENTROPY:
        per_token -= entropy_coef * entropy
        grad_h = -entropy_coef * weight
    grad_lp *= weight
    tl.store(result_ptr + row, tl.where(active, per_token * weight, 0.0))
    tl.store(result_ptr + n_rows + row, logprob)
    tl.store(result_ptr + 2 * n_rows + row, entropy)
    if WRITE_GRAD:
        out_row_ptr = out_ptr + _row_offset(row, n_inner, out_stride_outer, out_stride_inner)
        grad_lp = tl.where(active, grad_lp, 0.0)
        grad_h = tl.where(active, grad_h, 0.0)
        _write_grad_row(
            row_ptr, out_row_ptr, inv_t, label, lse, entropy, grad_lp, grad_h, valid_cols, n_cols,
            BLOCK_V, WITH_ENTROPY,
        )  # fmt: skip


def _block_v(valid_cols: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(valid_cols, 16)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def shard_stats(
    rows: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    *,
    vocab_start: int,
    valid_cols: int,
    with_entropy: bool,
) -> VocabShardStats:
    """Same contract as ``torch_ops.shard_stats``."""
    num_tokens = labels.shape[0]
    stats = torch.empty(4, num_tokens, dtype=torch.float32, device=rows.device)
    if num_tokens:
        block_v = _block_v(valid_cols)
        _shard_stats_kernel[(num_tokens,)](
            rows, labels, inv_temperature, stats, num_tokens, rows.shape[1], rows.stride(0), rows.stride(1),
            vocab_start, valid_cols, BLOCK_V=block_v, WITH_ENTROPY=with_entropy,
            num_warps=_num_warps(block_v),
        )  # fmt: skip
    return VocabShardStats(*stats)


def write_grad(
    rows: torch.Tensor,
    out: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    *,
    vocab_start: int,
    valid_cols: int,
) -> None:
    """Same contract as ``torch_ops.write_grad``."""
    num_tokens = labels.shape[0]
    if not num_tokens:
        return
    with_entropy = grad_entropy is not None
    block_v = _block_v(rows.shape[2])
    _grad_kernel[(num_tokens,)](
        rows, out, labels, inv_temperature, lse, entropy if with_entropy else lse,
        grad_logprobs.contiguous(), grad_entropy.contiguous() if with_entropy else lse,
        rows.shape[1], rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
        vocab_start, valid_cols, rows.shape[2], BLOCK_V=block_v, WITH_ENTROPY=with_entropy,
        num_warps=_num_warps(block_v),
    )  # fmt: skip


def fused_grpo_token_loss(
    rows: torch.Tensor,
    out: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    active: torch.Tensor,
    weights: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    importance_weights: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    *,
    valid_cols: int,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    kl_clamp: float | None,
    entropy_coef: float,
    with_entropy: bool,
) -> torch.Tensor:
    """Per-token ``(loss * weight, logprob, entropy)`` as a ``[3, N]`` fp32 tensor; with ``out`` given, the
    gradient of ``sum(loss * weight)`` w.r.t. the logits is written there (``out`` may be ``rows``).

    All ``[N]`` inputs are fp32 except ``labels`` (int64) and ``active`` (bool: trained tokens).
    ``kl_clamp`` bounds the k3 value as ``algo.kl.kl_estimate`` does (None: unbounded).
    """
    num_tokens = labels.shape[0]
    result = torch.zeros(3, num_tokens, dtype=torch.float32, device=rows.device)
    if not num_tokens:
        return result
    block_v = _block_v(rows.shape[2])
    kl_code = KL_ESTIMATORS.index(kl_estimator) + 1 if kl_coef > 0 else 0
    grad_out = out if out is not None else rows
    placeholder = old_logprobs
    _fused_grpo_kernel[(num_tokens,)](
        rows, grad_out, labels, inv_temperature, active.to(torch.int8), weights.contiguous(),
        old_logprobs.contiguous(), advantages.contiguous(),
        importance_weights.contiguous() if importance_weights is not None else placeholder,
        ref_logprobs.contiguous() if ref_logprobs is not None else placeholder,
        result, num_tokens, rows.shape[1], rows.stride(0), rows.stride(1),
        grad_out.stride(0), grad_out.stride(1), valid_cols, rows.shape[2],
        clip_low, clip_high, dual_clip or 0.0, kl_coef, kl_clamp or 0.0, entropy_coef, MAX_LOG_RATIO,
        HAS_DUAL_CLIP=dual_clip is not None, KL_ESTIMATOR=kl_code,
        HAS_KL_CLAMP=kl_clamp is not None and kl_code == 3, HAS_TIS=importance_weights is not None,
        WITH_ENTROPY=with_entropy, WRITE_GRAD=out is not None, BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )  # fmt: skip
    return result
