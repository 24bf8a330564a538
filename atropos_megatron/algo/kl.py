"""KL estimators from per-token log-probs of sampled tokens (Schulman, "Approximating KL Divergence").

For tokens sampled from the policy p, with ``log_ratio = log q - log p`` against the other policy q:
k1 = ``-log_ratio`` (unbiased, high variance, can be negative), k2 = ``log_ratio**2 / 2`` (biased,
low variance), k3 = ``exp(log_ratio) - 1 - log_ratio`` (unbiased, always >= 0; GRPO's choice).

Two clamps, both with zero gradient beyond them (torch's ``clamp``):

- the log-ratio, at ``+-MAX_LOG_RATIO`` for every estimator, so that ``exp`` cannot overflow fp32.
  verl clamps k3's log-ratio at the same 20 and leaves k1 and k2 unclamped: they differ from verl
  only for a token whose log-probs are more than 20 nats apart.
- k3's *value*, at ``+-clamp`` (``grpo.kl_clamp``, verl's 10 by default): k3 grows like
  ``exp(log_ratio)`` (396 at a log-ratio of 6, gradient -402), so without it a single token far from
  the reference would dominate the penalty of the whole batch. verl clamps only k3's value; so do we.

Not here: the importance-weighted (DeepSeek-V3.2) or straight-through (verl's ``k3+``) variants.
"""

from __future__ import annotations

import torch

from atropos_megatron.config import DEFAULT_KL_CLAMP, KL_ESTIMATORS

MAX_LOG_RATIO = 20.0
"""exp() of a log-ratio beyond this overflows fp32 long before it means anything (see above)."""


def kl_estimate(
    logprobs: torch.Tensor,
    other_logprobs: torch.Tensor,
    *,
    estimator: str = "k3",
    clamp: float | None = DEFAULT_KL_CLAMP,
) -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p.

    Args:
        logprobs: ``[...]`` fp32, log p of the sampled tokens (the policy being trained).
        other_logprobs: ``[...]`` fp32, log q of the same tokens (e.g. the reference model).
        estimator: ``k1``, ``k2`` or ``k3``.
        clamp: bound on the k3 value (``grpo.kl_clamp``; None: unbounded, e.g. for a metric that
            must show how far apart the policies are). Ignored by k1 and k2.

    Returns:
        ``[...]`` fp32 per-token estimates (differentiable w.r.t. both inputs).
    """
    log_ratio = (other_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
        return kl if clamp is None else kl.clamp(-clamp, clamp)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
