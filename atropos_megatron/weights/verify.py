"""Check a conversion by running both models: HF ``transformers`` and Megatron on the same tokens.

Only logits are kept between the two runs, so verification never holds two models at once: the
converter computes Megatron's logits, frees the Megatron model, then loads the HF one.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

# Default bounds on max |logit difference|. Both sides run in the checkpoint's dtype; fp32 differences
# come from summation order only, 16-bit ones from rounding each layer's output (bf16 keeps 8 bits of
# mantissa: a logit near 10 moves in steps of 0.0625).
DEFAULT_TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}
MIN_COSINE = 0.999
PROBE_BATCH, PROBE_LENGTH = 4, 64


@dataclass(frozen=True)
class LogitAgreement:
    """How closely two models' logits agree on the same tokens."""

    max_abs_diff: float
    cosine: float
    """Mean over positions of the cosine similarity between the two logit vectors."""
    top1_agreement: float
    """Fraction of positions where both models rank the same token first."""
    positions: int

    def passes(self, tolerance: float, min_cosine: float = MIN_COSINE) -> bool:
        return self.max_abs_diff <= tolerance and self.cosine >= min_cosine

    def describe(self) -> str:
        return (
            f"max |logit diff| {self.max_abs_diff:.3e}, cosine {self.cosine:.6f}, "
            f"top-1 agreement {self.top1_agreement:.1%} over {self.positions} positions"
        )


def compare_logits(expected: torch.Tensor, got: torch.Tensor) -> LogitAgreement:
    """Agreement of two ``[..., V]`` logit tensors, computed in fp64."""
    if expected.shape != got.shape:
        raise ValueError(f"logit shapes differ: {tuple(expected.shape)} vs {tuple(got.shape)}")
    a = expected.reshape(-1, expected.shape[-1]).double()
    b = got.reshape(-1, got.shape[-1]).double()
    return LogitAgreement(
        max_abs_diff=(a - b).abs().max().item(),
        cosine=torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item(),
        top1_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        positions=a.shape[0],
    )


def probe_tokens(vocab_size: int, *, seed: int = 0) -> torch.Tensor:
    """``[PROBE_BATCH, PROBE_LENGTH]`` token ids drawn uniformly from the vocabulary (any model, no
    tokenizer needed; random ids exercise every embedding row alike)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (PROBE_BATCH, PROBE_LENGTH), generator=generator)


@torch.no_grad()
def megatron_logits(chunk: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[B, S, vocab_size]`` (padding cut) of a single-chunk TP=1, PP=1 model."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = chunk(tokens, positions, attention_mask=None)
    return logits[..., :vocab_size].float().clone()


@torch.no_grad()
def hf_logits(directory: str | Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits of the HF checkpoint in ``directory``, loaded in ``dtype`` and freed before returning."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    try:
        return model.eval()(tokens).logits.float().clone()
    finally:
        del model
        gc.collect()
