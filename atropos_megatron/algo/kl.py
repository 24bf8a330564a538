"""KL estimators from per-token log-probs of sampled tokens (Schulman, "Approximating KL Divergence").

For tokens sampled from the policy p, with ``log_ratio = log q - log p`` against the other policy q:
k1 = ``-log_ratio`` (unbiased, high variance, can be negative), k2 = ``log_ratio**2 / 2`` (biased,
low variance), k3 = ``exp(log_ratio) - 1 - log_ratio`` (unbiased, always >= 0; GRPO's choice).
"""

from __future__ import annotations

import torch

from atropos_megatron.config import KL_ESTIMATORS

# exp() of a log-ratio beyond this overflows fp32 long before it means anything; clamping keeps one
# wildly off-policy token from turning the whole loss into inf (verl clamps k3 similarly).
MAX_LOG_RATIO = 20.0


def kl_estimate(
    logprobs: torch.Tensor, other_logprobs: torch.Tensor, *, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p.

    Args:
        logprobs: ``[...]`` fp32, log p of the sampled tokens (the policy being trained).
        other_logprobs: ``[...]`` fp32, log q of the same tokens (e.g. the reference model).
        estimator: ``k1``, ``k2`` or ``k3``.

    Returns:
        ``[...]`` fp32 per-token estimates (differentiable w.r.t. both inputs).
    """
    log_ratio = (other_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
