"""The two passes of ``token_stats`` in plain torch, a chunk of tokens at a time: the fallback backend.

Runs wherever torch runs (CPU, or a GPU without Triton). Each chunk's fp32 temporaries are
``chunk x V`` (156 MB at V = 152k and 256 tokens), so the peak extra memory is bounded whatever T is;
the Triton backend computes the same numbers without any ``[chunk, V]`` temporary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from atropos_megatron.kernels.token_stats import EMPTY_MAX, VocabShardStats, is_unit_temperature

DEFAULT_CHUNK_TOKENS = 256
"""Tokens per chunk: each fp32 temporary is chunk x V; the gradient pass holds about four."""


def shard_stats(
    rows: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: torch.Tensor,
    *,
    vocab_start: int,
    valid_cols: int,
    with_entropy: bool,
    chunk_tokens: int | None = None,
) -> VocabShardStats:
    """Statistics of one vocabulary shard. ``rows`` ``[D0, D1, V]`` (see ``token_stats.rows_view``);
    ``labels`` (global ids) and ``inv_temperature`` are ``[N]`` with ``N = D0 * D1``."""
    num_tokens = labels.shape[0]
    out = torch.zeros(4, num_tokens, dtype=torch.float32, device=rows.device)
    out[0] = EMPTY_MAX
    if valid_cols == 0:
        return VocabShardStats(*out)
    unit = is_unit_temperature(inv_temperature)
    for span, block in _row_blocks(rows, chunk_tokens):
        x = block[:, :valid_cols].float()  # a view of fp32 logits
        if not unit:
            x = x * inv_temperature[span, None]
        row_max = x.amax(-1).clamp(min=EMPTY_MAX)
        local, owned = _local_labels(labels[span], vocab_start, valid_cols)
        out[3, span] = torch.where(owned, x.gather(-1, local[:, None]).squeeze(-1), 0.0)
        shifted = x - row_max[:, None]
        exp = shifted.exp()
        out[0, span] = row_max
        out[1, span] = exp.sum(-1)
        if with_entropy:
            sum_shifted = shifted.mul_(exp).sum(-1)
            if sum_shifted.isnan().any():  # exp == 0 where x = -inf: that term is 0, not 0 * -inf
                shifted = x - row_max[:, None]
                sum_shifted = (exp * torch.where(exp > 0, shifted, 0.0)).sum(-1)
            out[2, span] = sum_shifted
    return VocabShardStats(*out)


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
    chunk_tokens: int | None = None,
) -> None:
    """Write ``d loss / d logits`` of one shard into ``out`` (same shape as ``rows``; may be ``rows``
    itself: each chunk is read before it is overwritten). Padding columns get 0."""
    unit = is_unit_temperature(inv_temperature)
    for span, block in _row_blocks(rows, chunk_tokens):
        out_block = _same_block(out, rows, block, span)
        # Where the output is the fp32 logits' own storage, the whole pass runs in it: no temporaries.
        in_place = out_block.data_ptr() == block.data_ptr() and block.dtype == torch.float32
        logp = block[:, :valid_cols] if in_place else block[:, :valid_cols].float().clone()
        if not unit:
            logp.mul_(inv_temperature[span, None])
        logp.sub_(lse[span, None])
        local, owned = _local_labels(labels[span], vocab_start, valid_cols)
        label_grad = torch.where(owned, grad_logprobs[span], 0.0)[:, None]
        if grad_entropy is None:
            grad = logp.exp_().mul_(-grad_logprobs[span, None])
        else:
            probs = logp.exp()
            term = torch.where(probs > 0, probs * (logp + entropy[span, None]), 0.0)
            grad = probs.mul_(-grad_logprobs[span, None]).sub_(term.mul_(grad_entropy[span, None]))
        grad.scatter_add_(-1, local[:, None], label_grad)
        if not unit:
            grad.mul_(inv_temperature[span, None])
        if grad.data_ptr() != out_block.data_ptr():
            out_block[:, :valid_cols] = grad
        out_block[:, valid_cols:] = 0


def _local_labels(labels: torch.Tensor, vocab_start: int, valid_cols: int):
    local = labels - vocab_start
    owned = (local >= 0) & (local < valid_cols)
    return torch.where(owned, local, 0), owned


def _row_blocks(rows: torch.Tensor, chunk_tokens: int | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(flat token span, [c, V] view)`` pairs covering ``rows`` in the flat order ``d0 * D1 + d1``."""
    chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS
    inner = rows.shape[1]
    for d0 in range(rows.shape[0]):
        for start in range(0, inner, chunk_tokens):
            stop = min(start + chunk_tokens, inner)
            yield slice(d0 * inner + start, d0 * inner + stop), rows[d0, start:stop]


def _same_block(out: torch.Tensor, rows: torch.Tensor, block: torch.Tensor, span: slice) -> torch.Tensor:
    if out is rows:
        return block
    inner = rows.shape[1]
    d0, start = divmod(span.start, inner)
    return out[d0, start : start + (span.stop - span.start)]
