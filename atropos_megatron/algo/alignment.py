"""From Atropos's token-aligned arrays to the label-aligned arrays a causal LM trains on.

Atropos sends, per sequence, ``tokens`` and arrays indexed like ``tokens``: ``masks`` (label-style:
-100 = not trained, otherwise the token id itself), ``advantages``, ``inference_logprobs`` (with the
placeholder 1.0 on untrained positions) and ``ref_logprobs``. A causal LM's output at position i
predicts token i + 1, so everything about token i + 1 moves to position i: inputs are
``tokens[:-1]``, labels ``tokens[1:]``, and every per-token array drops its first element.
Getting this shift wrong trains on the wrong tokens without any error, hence one function, tested on
hand-made examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LabelAligned:
    """One sequence, shifted so that position i holds what the model predicts at i (shape ``[L-1]``)."""

    input_ids: torch.Tensor
    """int64 inputs: ``tokens[:-1]``."""
    labels: torch.Tensor
    """int64 targets: ``tokens[1:]``."""
    loss_mask: torch.Tensor
    """bool, True where the target token is trained (``masks[1:] != -100``)."""
    advantages: torch.Tensor | None
    """fp32 token advantages from the environment (``advantages[1:]``), 0 where not trained."""
    inference_logprobs: torch.Tensor | None
    """fp32 sampling log-probs of the targets (``inference_logprobs[1:]``), 0 where not trained."""
    ref_logprobs: torch.Tensor | None
    """fp32 reference log-probs of the targets (``ref_logprobs[1:]``), 0 where not trained."""


def align_to_labels(
    tokens: list[int] | torch.Tensor,
    masks: list[int] | torch.Tensor,
    *,
    advantages: list[float] | torch.Tensor | None = None,
    inference_logprobs: list[float] | torch.Tensor | None = None,
    ref_logprobs: list[float] | torch.Tensor | None = None,
) -> LabelAligned:
    """Shift one Atropos sequence to label alignment.

    Raises:
        ValueError: lengths differ, the sequence is shorter than 2 tokens, a trained mask entry is
            not the token it labels, or nothing is trained.
    """
    tokens_t = torch.as_tensor(tokens, dtype=torch.int64)
    masks_t = torch.as_tensor(masks, dtype=torch.int64)
    length = tokens_t.numel()
    if tokens_t.dim() != 1 or length < 2:
        raise ValueError(f"a sequence needs at least 2 tokens, got {length}")
    if masks_t.shape != tokens_t.shape:
        raise ValueError(f"masks has {masks_t.numel()} entries for {length} tokens")
    trained = masks_t != IGNORE_INDEX
    if not torch.equal(masks_t[trained], tokens_t[trained]):
        bad = int(torch.nonzero(trained & (masks_t != tokens_t))[0])
        raise ValueError(
            f"masks[{bad}]={int(masks_t[bad])} is neither -100 nor tokens[{bad}]={int(tokens_t[bad])}"
        )
    loss_mask = trained[1:]
    if not loss_mask.any():
        raise ValueError("no trained token after the first position (every mask is -100)")

    def shifted(values, name: str) -> torch.Tensor | None:
        if values is None:
            return None
        values_t = torch.as_tensor(values, dtype=torch.float32)
        if values_t.shape != tokens_t.shape:
            raise ValueError(f"{name} has {values_t.numel()} entries for {length} tokens")
        return torch.where(loss_mask, values_t[1:], torch.zeros(()))

    return LabelAligned(
        input_ids=tokens_t[:-1],
        labels=tokens_t[1:],
        loss_mask=loss_mask,
        advantages=shifted(advantages, "advantages"),
        inference_logprobs=shifted(inference_logprobs, "inference_logprobs"),
        ref_logprobs=shifted(ref_logprobs, "ref_logprobs"),
    )
