"""Per-token log-probabilities and entropy from logits: the reference the fused kernels must match.

Computed in fp32 whatever the logits' dtype (bf16 log-softmax loses ~1e-2 per token, which is the
size of the policy updates GRPO makes). Logits are divided by the sampling temperature first, so
that the trainer scores tokens under the same distribution the inference server sampled from.
"""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    vocab_size: int | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits / temperature)[label]`` and optionally the entropy, per token.

    Args:
        logits: ``[..., V]`` any float dtype (``V`` may include padding rows).
        labels: ``[...]`` int64 token ids in ``[0, vocab_size)``.
        temperature: a float, or a tensor broadcastable to ``labels`` (per-sequence or per-token
            temperatures, e.g. from Atropos ``overrides``), all > 0.
        vocab_size: real vocabulary size; logits of padded columns ``>= vocab_size`` are ignored.
        return_entropy: also return ``-sum(p * log p)`` over the (real) vocabulary.

    Returns:
        ``(logprobs, entropy)``, both shaped like ``labels`` in fp32 (entropy None unless asked).
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    scaled = logits.float() / temperature.unsqueeze(-1) if temperature.dim() else logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    picked = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if return_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy
