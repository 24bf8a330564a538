"""fp64 references and GRPO inputs shared by the kernel tests (unit and vocab-parallel).

The reference is the spec (``algo/``) evaluated in fp64 on the same (possibly bf16) logits, so that a
kernel's error is measured against the exact answer for its inputs, not against another fp32 result.
"""

from __future__ import annotations

import torch

from atropos_megatron.algo.grpo import grpo_token_loss
from atropos_megatron.algo.reduce import aggregation_weights
from atropos_megatron.config import GRPOConfig

# (dtype, relative tolerance vs fp64): the bars for fp32 and bf16 inputs.
DTYPE_TOLERANCES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 1e-2)}


def logprobs_fp64(logits, labels, *, temperature=1.0, vocab_size=None):
    """``(logprobs, entropy)`` in fp64, differentiable w.r.t. ``logits`` (labels outside the real
    vocabulary give 0)."""
    logits = logits[..., :vocab_size] if vocab_size is not None else logits
    temperature = torch.as_tensor(temperature, dtype=torch.float64)
    log_probs = torch.log_softmax(
        logits.double() / (temperature[..., None] if temperature.dim() else temperature), -1
    )
    valid = (labels >= 0) & (labels < log_probs.shape[-1])
    picked = log_probs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0), -(log_probs.exp() * log_probs).sum(-1)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |value - reference| / max |reference|``."""
    return ((value.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def grpo_inputs(batch=6, seq=9, vocab=101, *, dtype=torch.float32, seed=0, aggregation="token-mean"):
    """A batch with every case the loss must handle: ratios on both sides of both clip bounds,
    negative advantages past the dual-clip bound, a sequence whose group scores were all equal
    (advantage exactly 0), and untrained positions (prompt, padding) labelled -100."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask = torch.ones(batch, seq, dtype=torch.bool)
    loss_mask[:, :2] = False  # prompt
    loss_mask[-1, -3:] = False  # padding
    labels[~loss_mask] = -100
    current, _ = logprobs_fp64(logits, labels)
    old = (current + 0.8 * torch.randn(batch, seq, generator=gen, dtype=torch.float64)).float()
    # Per-sequence advantages of both signs; sequence 1 is an all-equal group (advantage exactly 0).
    signs = torch.tensor([1.0, 0.0, -1.0, -1.0]).repeat(batch)[:batch, None]
    advantages = (signs * (0.5 + torch.rand(batch, 1, generator=gen))).expand(batch, seq).clone()
    return dict(
        logits=logits,
        labels=labels,
        old_logprobs=torch.where(loss_mask, old, 0.0),
        advantages=torch.where(loss_mask, advantages, 0.0),
        loss_mask=loss_mask,
        weights=aggregation_weights(loss_mask, aggregation),
        ref_logprobs=(current + 0.2 * torch.randn(batch, seq, generator=gen, dtype=torch.float64)).float(),
        inference_logprobs=(old + 0.1 * torch.randn(batch, seq, generator=gen)).float(),
    )


FAR_REFERENCE = {(0, 3): 6.0, (2, 4): 25.0, (3, 5): -6.0, (4, 6): 2.5}
"""``(sequence, position) -> log pi_ref - log pi`` for :func:`with_far_reference`: k3 = 396 (past
``grpo.kl_clamp``'s 10), past the +-20 log-ratio clamp too, 5.0 and 8.7 (inside: their gradient flows)."""


def with_far_reference(inputs: dict) -> dict:
    """``inputs`` with the reference log-probs of a few trained tokens moved by :data:`FAR_REFERENCE`
    from the current policy's (fp64), so that the k3 value clamp and the log-ratio clamp are both hit."""
    current, _ = logprobs_fp64(inputs["logits"], inputs["labels"])
    ref = inputs["ref_logprobs"].clone()
    for (b, t), shift in FAR_REFERENCE.items():
        assert inputs["loss_mask"][b, t], "far-reference tokens must be trained"
        ref[b, t] = float(current[b, t]) + shift
    return dict(inputs, ref_logprobs=ref)


def grpo_loss_fp64(inputs: dict, cfg: GRPOConfig, *, temperature=1.0, vocab_size=None):
    """``(loss, metrics, d loss / d logits)`` of the spec in fp64 on ``inputs`` (from :func:`grpo_inputs`)."""
    logits = inputs["logits"].double().requires_grad_()
    logprobs, entropy = logprobs_fp64(
        logits, inputs["labels"], temperature=temperature, vocab_size=vocab_size
    )
    loss, metrics = grpo_token_loss(
        logprobs,
        inputs["old_logprobs"].double(),
        inputs["advantages"].double(),
        inputs["loss_mask"],
        inputs["weights"].double(),
        cfg=cfg,
        ref_logprobs=inputs["ref_logprobs"].double(),
        inference_logprobs=inputs["inference_logprobs"].double(),
        entropy=entropy,
        sequence_ids=inputs.get("sequence_ids"),
    )
    loss.backward()
    return loss.detach(), metrics, logits.grad
