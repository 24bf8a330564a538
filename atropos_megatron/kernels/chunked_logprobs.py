"""Token log-probs (+ entropy) from logits without an fp32 ``[T, V]`` log-softmax: the torch fallback.

``algo.logprobs.token_logprobs`` materialises ``log_softmax(logits.float())``: for T = 16k tokens and
a 152k vocabulary that is 10 GB in fp32, plus as much again for autograd. Here the tokens are
processed in chunks: the forward keeps only one chunk's fp32 copy alive and saves a per-token
log-sum-exp ``[T]``; the backward recomputes each chunk's softmax from the (caller-owned) logits
and that statistic. Peak extra memory is ``O(chunk x V)`` instead of ``O(T x V)``.

Gradients, with ``x = logits / temperature``, ``p = softmax(x)``, ``log p = x - lse``,
``H = -sum(p * log p)``: ``d logp[label] / dx = onehot(label) - p`` and
``d H / dx = -p * (log p - sum(p * log p))``; both scale by ``1 / temperature`` on the way to the
logits.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 256
"""Tokens per chunk: each fp32 temporary is chunk x V (156 MB at V = 152k); backward holds ~4 of them."""


class ChunkedTokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves ``logits``, ``labels`` and the per-token log-sum-exp only."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_tokens, with_entropy, inplace_backward):
        num_tokens = logits.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        lse = torch.empty_like(logprobs)
        for start in range(0, num_tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            scaled = logits[rows].float() / temperature
            lse[rows] = torch.logsumexp(scaled, dim=-1)
            logprobs[rows] = scaled.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
            if with_entropy:
                chunk_logprobs = scaled - lse[rows].unsqueeze(-1)
                entropy[rows] = -(chunk_logprobs.exp() * chunk_logprobs).sum(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk_tokens, ctx.with_entropy = temperature, chunk_tokens, with_entropy
        ctx.inplace_backward = inplace_backward
        if with_entropy:
            return logprobs, entropy
        ctx.mark_non_differentiable(lse)
        return logprobs, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_second):
        logits, labels, lse = ctx.saved_tensors
        if grad_logprobs is None:  # only the entropy reaches the loss
            grad_logprobs = torch.zeros_like(lse)
        grad_entropy = grad_second if ctx.with_entropy else None
        # In place: each chunk of logits is read, then overwritten with its gradient, so no second
        # [T, V] buffer exists. The caller gives up the logits' values (Liger's GRPO kernel does the same).
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            chunk_logprobs = logits[rows].float() / ctx.temperature - lse[rows].unsqueeze(-1)
            probs = chunk_logprobs.exp()
            grad = -probs * grad_logprobs[rows].unsqueeze(-1)
            grad.scatter_add_(-1, labels[rows].unsqueeze(-1), grad_logprobs[rows].unsqueeze(-1))
            if grad_entropy is not None:
                # In log-prob form rather than with raw logits: log p is ~0 where p is large, so the
                # difference below loses far less fp32 precision (5e-6 -> 2e-7 in the tests).
                mean_logprob = (probs * chunk_logprobs).sum(-1, keepdim=True)
                grad -= probs * (chunk_logprobs - mean_logprob) * grad_entropy[rows].unsqueeze(-1)
            with torch.no_grad():
                grad_logits[rows] = grad / ctx.temperature
        return grad_logits, None, None, None, None, None


def chunked_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same result as :func:`algo.logprobs.token_logprobs` in bounded memory.

    Args:
        logits: ``[T, V]`` fp32/bf16/fp16 (cut padded vocabulary columns before calling).
        labels: ``[T]`` int64 in ``[0, V)``.
        temperature: > 0; logits are divided by it.
        return_entropy: also return the per-token entropy (differentiable).
        chunk_tokens: tokens per chunk.
        inplace_backward: write the gradient into ``logits``' own storage during backward (saves a
            ``[T, V]`` buffer). Only when nothing reads the logits after backward: their values are gone.

    Returns:
        ``(logprobs [T] fp32, entropy [T] fp32 or None)``.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [T, V] and labels [T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if temperature <= 0 or chunk_tokens <= 0:
        raise ValueError("temperature and chunk_tokens must be > 0")
    logprobs, second = ChunkedTokenLogprobsFunction.apply(
        logits, labels, float(temperature), int(chunk_tokens), return_entropy, inplace_backward
    )
    return logprobs, (second if return_entropy else None)
