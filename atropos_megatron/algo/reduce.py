"""How per-token losses become one number: every mode is a weighted sum with per-token weights.

Writing each aggregation as ``loss = sum(token_loss * weights)`` lets the fused kernel take the
weights as an input (its gradient w.r.t. a token's loss is just the weight), and makes the modes
correct across micro-batches and data-parallel ranks: pass the *global* counts and every rank's
partial sums add up to the loss of the whole batch.

Modes (``B`` sequences, ``n_b`` trained tokens in sequence b, ``N = sum n_b``, ``S`` sequences with
``n_b > 0``):
- ``token-mean``: each token weighs ``1 / N`` (DAPO; long answers count more).
- ``seq-mean-token-mean``: ``1 / (n_b * S)`` (original GRPO; every sequence counts equally).
- ``seq-mean-token-sum``: ``1 / S``.
- ``seq-mean-token-sum-norm``: ``1 / (S * L)`` with a constant ``L`` (Dr. GRPO; no length bias):
  ``grpo.loss_norm_length``, by default ``data.max_token_len`` (see ``config.GRPOConfig``).

The mode is applied here, once, by whoever sees the whole batch (``data/batching.py``); the losses take
the weights and never read ``grpo.loss_aggregation`` themselves (a micro-batch lacks the global counts
and, packed, the sequence boundaries). :func:`aggregation_key` labels the weights with the config they
were made for, so that the loss pass can refuse weights made for another mode.
"""

from __future__ import annotations

import torch

from atropos_megatron.config import LOSS_AGGREGATIONS, GRPOConfig


def aggregation_weights(
    loss_mask: torch.Tensor,
    mode: str,
    *,
    global_tokens: int | None = None,
    global_sequences: int | None = None,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Per-token weights for ``mode``; zero on untrained tokens.

    Args:
        loss_mask: ``[B, T]`` bool.
        mode: one of ``config.LOSS_AGGREGATIONS``.
        global_tokens: trained tokens in the whole batch (default: this ``loss_mask``'s).
        global_sequences: sequences with a trained token in the whole batch (default: this mask's).
        norm_length: the constant ``L`` of ``seq-mean-token-sum-norm`` (default ``T``).

    Returns:
        ``[B, T]`` fp32 weights.
    """
    mask = loss_mask.float()
    tokens_per_seq = mask.sum(-1, keepdim=True)
    tokens = global_tokens if global_tokens is not None else int(mask.sum())
    sequences = global_sequences if global_sequences is not None else int((tokens_per_seq > 0).sum())
    if mode == "token-mean":
        return mask / max(tokens, 1)
    if mode == "seq-mean-token-mean":
        return mask / (tokens_per_seq.clamp(min=1) * max(sequences, 1))
    if mode == "seq-mean-token-sum":
        return mask / max(sequences, 1)
    if mode == "seq-mean-token-sum-norm":
        return mask / (max(sequences, 1) * (norm_length or loss_mask.shape[-1]))
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregation_key(cfg: GRPOConfig) -> tuple[str, int | None]:
    """The fields of ``cfg`` that :func:`aggregation_weights` was called with, to compare on use."""
    return cfg.loss_aggregation, cfg.loss_norm_length
