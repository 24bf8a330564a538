"""The GRPO policy loss per token, with the variants people use today, and its metrics.

    per_token = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)     (PPO clip; DAPO clip-higher)
                [A < 0: min(that, dual_clip * |A|)]                         (dual clip)
                * w_tis                                                     (truncated IS, rollout mismatch)
                + kl_coef * KL(pi || pi_ref) - entropy_coef * H             (penalty, bonus; algo/kl.py)
    loss      = sum(per_token * weights)                                    (see algo/reduce.py)

with ``r = exp(logprobs - old_logprobs)`` per token, or for GSPO the sequence ratio
``exp(mean_t(logprobs - old_logprobs))`` carried on every token (the GSPO-token form: value of the
sequence ratio, gradient through each token's log-prob). Departures from the DeepSeekMath paper are
options, not defaults: the KL penalty is off by default (``kl_coef=0``), as in DAPO and Dr. GRPO.

The truncated importance weight ``w_tis = min(pi_old / pi_rollout, cap)`` (per token, or per
sequence as a product) corrects for the inference engine sampling from a slightly different
distribution than the trainer computes (different kernels, precision); it is a constant for the
gradient.
"""

from __future__ import annotations

import math

import torch

from atropos_megatron.algo.kl import MAX_LOG_RATIO, kl_estimate
from atropos_megatron.config import GRPOConfig


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    cfg: GRPOConfig,
    ref_logprobs: torch.Tensor | None = None,
    inference_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The aggregated GRPO loss and its metrics.

    Args:
        logprobs: ``[B, T]`` fp32 log-probs of the labels under the current policy (requires grad).
        old_logprobs: ``[B, T]`` fp32 log-probs under the policy that the batch is measured against
            (recomputed before the update, or the inference log-probs).
        advantages: ``[B, T]`` fp32 token advantages (0 on untrained tokens).
        loss_mask: ``[B, T]`` bool, True on trained tokens.
        weights: ``[B, T]`` fp32 aggregation weights from :func:`algo.reduce.aggregation_weights`:
            they *are* the aggregation. ``cfg.loss_aggregation`` is not read here: the mode needs the
            whole batch's counts and sequence boundaries, which a micro-batch (packed rows, one
            data-parallel share) does not have; ``data.batching`` makes the weights from the config
            and ``trainer.grpo_step`` checks that they were made for ``cfg``.
        cfg: the objective's hyper-parameters.
        ref_logprobs: ``[B, T]`` fp32 reference-model log-probs; required when ``cfg.kl_coef > 0``.
        inference_logprobs: ``[B, T]`` fp32 sampling log-probs; required for importance correction.
        entropy: ``[B, T]`` fp32 per-token entropy (with grad); required when ``cfg.entropy_coef > 0``.
        sequence_ids: ``[B, T]`` int64, which sequence each token belongs to (ids unique in the batch,
            any negative value for padding), where rows are packed with several sequences; None: each
            row is one sequence. Only the sequence-level quantities read it (GSPO's ratio, sequence
            importance weights).

    Returns:
        ``(loss, metrics)``: a scalar, and detached fp32 scalars under ``grpo/`` and ``rollout/``.
    """
    mask = loss_mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    if cfg.policy_loss == "gspo":
        tokens = sequence_sum(mask.to(log_ratio.dtype), sequence_ids).clamp(min=1)
        sequence_log_ratio = sequence_sum(log_ratio, sequence_ids) / tokens
        log_ratio = sequence_log_ratio.detach() + logprobs - logprobs.detach()
        log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    if cfg.dual_clip is not None:
        surrogate = torch.where(
            advantages < 0, torch.minimum(surrogate, -cfg.dual_clip * advantages), surrogate
        )

    metrics: dict[str, torch.Tensor] = {}
    if cfg.importance_correction != "none":
        if inference_logprobs is None:
            raise ValueError("grpo.importance_correction needs inference_logprobs")
        weight = truncated_importance_weight(old_logprobs, inference_logprobs, mask, cfg, sequence_ids)
        surrogate = surrogate * weight
        metrics["grpo/tis_weight_mean"] = _masked_mean(weight.expand_as(mask), mask)

    per_token = surrogate
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("grpo.kl_coef > 0 needs ref_logprobs")
        kl_ref = kl_estimate(logprobs, ref_logprobs, estimator=cfg.kl_estimator, clamp=cfg.kl_clamp)
        per_token = per_token + cfg.kl_coef * kl_ref
        metrics["grpo/kl_ref"] = _masked_mean(kl_ref, mask)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("grpo.entropy_coef > 0 needs entropy")
        per_token = per_token - cfg.entropy_coef * entropy
    if entropy is not None:
        metrics["grpo/entropy"] = _masked_mean(entropy, mask)

    weights = torch.where(mask, weights, torch.zeros_like(weights))
    loss = (per_token * weights).sum()
    metrics.update(_ratio_metrics(ratio, advantages, log_ratio, mask, cfg))
    metrics["grpo/pg_loss"] = (surrogate * weights).sum().detach()
    if inference_logprobs is not None:
        # With old_logprobs=inference the old log-probs *are* the inference ones (the metrics would be
        # 0 by construction): measure the engine against this pass's own log-probs instead, the
        # trainer's view of the sampling weights in a batch's first update (later updates of
        # grpo.updates_per_batch > 1 add the policy's own movement since then).
        trainer_logprobs = logprobs.detach() if cfg.old_logprobs == "inference" else old_logprobs
        metrics.update(rollout_mismatch_metrics(trainer_logprobs, inference_logprobs, mask))
    return loss, metrics


def rollout_mismatch_metrics(
    trainer_logprobs: torch.Tensor, inference_logprobs: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the inference engine's log-probs are from the trainer's for the same tokens.

    ``rollout/logprob_abs_diff`` is the mean absolute difference; ``rollout/kl`` estimates
    KL(pi_rollout || pi_trainer) with k3 (the tokens were sampled by the inference engine), without
    ``grpo.kl_clamp``: that bound protects the loss, and would hide a broken engine here.
    """
    diff = torch.where(loss_mask, trainer_logprobs - inference_logprobs, torch.zeros_like(trainer_logprobs))
    kl = kl_estimate(inference_logprobs, trainer_logprobs, estimator="k3", clamp=None)
    return {
        "rollout/logprob_abs_diff": _masked_mean(diff.abs(), loss_mask),
        "rollout/kl": _masked_mean(kl, loss_mask),
    }


def truncated_importance_weight(
    old_logprobs, inference_logprobs, mask, cfg: GRPOConfig, sequence_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """``min(pi_old / pi_rollout, cap)`` per token ``[B, T]`` (or per sequence: ``[B, 1]``, or ``[B, T]``
    with ``sequence_ids``), no gradient."""
    log_weight = torch.where(mask, old_logprobs - inference_logprobs, torch.zeros_like(old_logprobs))
    if cfg.importance_correction == "sequence":
        log_weight = sequence_sum(log_weight, sequence_ids)
    return torch.exp(log_weight.clamp(max=math.log(cfg.importance_cap))).detach()


def sequence_sum(values: torch.Tensor, sequence_ids: torch.Tensor | None) -> torch.Tensor:
    """Each token's sum of ``values`` over its sequence: ``[B, 1]`` per row without ids, else ``[B, T]``
    by id (padding, id < 0, sums with padding; its values are masked out wherever this is used)."""
    if sequence_ids is None:
        return values.sum(-1, keepdim=True)
    ids = sequence_ids.reshape(-1)
    ids = torch.where(ids >= 0, ids, ids.max().clamp(min=0) + 1)
    sums = values.new_zeros(int(ids.max()) + 1).index_add(0, ids, values.reshape(-1))
    return sums[ids].view_as(values)


def _ratio_metrics(ratio, advantages, log_ratio, mask, cfg: GRPOConfig) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1.0 - cfg.clip_low)
        clipped_high = (advantages > 0) & (ratio > 1.0 + cfg.clip_high)
        metrics = {
            "grpo/clip_frac_low": _masked_mean(clipped_low.float(), mask),
            "grpo/clip_frac_high": _masked_mean(clipped_high.float(), mask),
            # KL(pi_old || pi) with k3, for tokens sampled by the old policy.
            "grpo/approx_kl_old": _masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "grpo/ratio_mean": _masked_mean(ratio, mask),
            "grpo/ratio_max": ratio[mask].max() if mask.any() else torch.ones(()),
            "grpo/ratio_min": ratio[mask].min() if mask.any() else torch.ones(()),
        }
        if cfg.dual_clip is not None:
            metrics["grpo/dual_clip_frac"] = _masked_mean(
                ((advantages < 0) & (ratio > cfg.dual_clip)).float(), mask
            )
    return metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = values.detach().float()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)
