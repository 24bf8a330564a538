"""Log-probs, KL estimators, aggregation weights and the GRPO loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from atropos_megatron.algo.grpo import grpo_token_loss
from atropos_megatron.algo.kl import kl_estimate
from atropos_megatron.algo.logprobs import token_logprobs
from atropos_megatron.algo.reduce import aggregation_weights
from atropos_megatron.config import GRPOConfig

# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_match_fp64_log_softmax_with_temperature_and_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=gen)
    labels = torch.tensor([0, 3, 10, 7, 7])
    logprobs, entropy = token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    ref = torch.log_softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(logprobs.double(), ref[torch.arange(5), labels], rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy.double(), -(ref.exp() * ref).sum(-1), rtol=0, atol=1e-6)


def test_padded_vocab_columns_are_ignored():
    logits = torch.tensor([[0.0, 0.0, 50.0]])  # column 2 is padding
    logprobs, _ = token_logprobs(logits, torch.tensor([0]), vocab_size=2)
    assert logprobs.item() == pytest.approx(math.log(0.5))


def test_per_sequence_temperatures_broadcast():
    logits = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])  # [B=2, T=1, V=2]
    logprobs, _ = token_logprobs(logits, torch.tensor([[1], [1]]), temperature=torch.tensor([[1.0], [0.5]]))
    assert logprobs[0, 0].item() == pytest.approx(-math.log1p(math.exp(-1.0)))
    assert logprobs[1, 0].item() == pytest.approx(-math.log1p(math.exp(-2.0)))


def test_bf16_logits_are_scored_in_fp32():
    logits = torch.randn(3, 7).bfloat16()
    logprobs, _ = token_logprobs(logits, torch.tensor([1, 2, 3]))
    assert logprobs.dtype == torch.float32


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [("k1", math.log(2)), ("k2", 0.5 * math.log(2) ** 2), ("k3", 0.5 + math.log(2) - 1)],
)
def test_kl_estimators(estimator, expected):
    value = kl_estimate(torch.tensor([0.0]), torch.tensor([math.log(0.5)]), estimator=estimator)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_identical_policies():
    lp = torch.tensor([-1.0, -2.0])
    for estimator in ("k1", "k2", "k3"):
        assert kl_estimate(lp, lp, estimator=estimator).abs().max().item() == 0.0


def test_k3_value_is_clamped_like_verl_with_no_gradient_beyond():
    # log-ratio 6: k3 = e^6 - 1 - 6 = 396.43, d k3 / d logp = -(e^6 - 1) = -402.43 (verl: 10 and 0).
    logp = torch.tensor([-7.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.5])  # the second token's k3 (0.1065) is inside the clamp
    clamped = kl_estimate(logp, ref, estimator="k3")
    clamped.sum().backward()
    assert clamped.tolist() == pytest.approx([10.0, math.exp(-0.5) - 1 + 0.5], rel=1e-6)
    assert logp.grad.tolist() == pytest.approx([0.0, -math.expm1(-0.5)], rel=1e-6)

    free_logp = logp.detach().requires_grad_()
    free = kl_estimate(free_logp, ref, estimator="k3", clamp=None)
    free.sum().backward()
    assert free[0].item() == pytest.approx(math.expm1(6.0) - 6.0, rel=1e-6)
    assert free_logp.grad[0].item() == pytest.approx(-math.expm1(6.0), rel=1e-6)


@pytest.mark.parametrize(("estimator", "expected"), [("k1", -6.0), ("k2", 18.0)])
def test_kl_clamp_leaves_k1_and_k2_alone(estimator, expected):
    # verl clamps only k3's value; k1 and k2 keep only the +-20 log-ratio guard.
    value = kl_estimate(torch.tensor([-7.0]), torch.tensor([-1.0]), estimator=estimator, clamp=1.0)
    assert value.item() == pytest.approx(expected)


def test_loss_uses_grpo_kl_clamp():
    lp = torch.tensor([[-7.0]], requires_grad=True)
    ref = torch.tensor([[-1.0]])
    for kl_clamp, value, grad in ((10.0, 10.0, 0.0), (None, math.expm1(6.0) - 6.0, -math.expm1(6.0))):
        lp.grad = None
        cfg = GRPOConfig(kl_coef=0.1, kl_clamp=kl_clamp)
        loss, metrics = _loss(lp, lp.detach(), torch.zeros(1, 1), cfg, ref_logprobs=ref)
        loss.backward()
        assert loss.item() == pytest.approx(0.1 * value, rel=1e-6)
        assert metrics["grpo/kl_ref"].item() == pytest.approx(value, rel=1e-6)
        assert lp.grad.item() == pytest.approx(0.1 * grad, rel=1e-6, abs=0.0)


# ----------------------------------------------------------------------------- aggregation

MASK = torch.tensor([[True, True, False], [True, False, False]])  # 2 + 1 trained tokens


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", [[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]),
        ("seq-mean-token-mean", [[1 / 4, 1 / 4, 0], [1 / 2, 0, 0]]),
        ("seq-mean-token-sum", [[1 / 2, 1 / 2, 0], [1 / 2, 0, 0]]),
        ("seq-mean-token-sum-norm", [[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]]),
    ],
)
def test_aggregation_weights(mode, expected):
    torch.testing.assert_close(aggregation_weights(MASK, mode), torch.tensor(expected))


def test_global_counts_make_micro_batches_add_up():
    full = aggregation_weights(MASK, "token-mean")
    halves = [aggregation_weights(MASK[i : i + 1], "token-mean", global_tokens=3) for i in range(2)]
    torch.testing.assert_close(torch.cat(halves), full)


# ----------------------------------------------------------------------------- GRPO loss


def _loss(logprobs, old, adv, cfg, **kwargs):
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    weights = aggregation_weights(mask, cfg.loss_aggregation)
    return grpo_token_loss(logprobs, old, adv, mask, weights, cfg=cfg, **kwargs)


def test_on_policy_loss_is_minus_mean_advantage_with_ratio_one():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    loss, metrics = _loss(lp, lp.detach(), adv, GRPOConfig())
    assert loss.item() == pytest.approx(0.5)  # -mean(A) = -(1 + 1 - 2 - 2) / 4
    assert metrics["grpo/ratio_mean"].item() == 1.0
    assert metrics["grpo/approx_kl_old"].item() == 0.0
    assert metrics["grpo/clip_frac_low"].item() == metrics["grpo/clip_frac_high"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 4)  # d(-r A / 4)/d logp = -A / 4 at r = 1


def test_clip_high_and_clip_low_stop_the_gradient():
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.28)
    old = torch.zeros(1, 4)
    ratio = torch.tensor([[1.5, 1.1, 0.5, 0.9]])
    lp = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = _loss(lp, old, adv, cfg)
    # per token: -min(rA, clip(r)A): -1.28, -1.1, 0.8, 0.9 ; mean = -0.17
    assert loss.item() == pytest.approx((-1.28 - 1.1 + 0.8 + 0.9) / 4, rel=1e-6)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 2].item() == 0.0  # clipped: no gradient
    assert lp.grad[0, 1].item() == pytest.approx(-1.1 / 4, rel=1e-6)
    assert metrics["grpo/clip_frac_high"].item() == 0.25
    assert metrics["grpo/clip_frac_low"].item() == 0.25


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    cfg = GRPOConfig(dual_clip=3.0)
    lp = torch.tensor([[math.log(5.0)]], requires_grad=True)
    loss, metrics = _loss(lp, torch.zeros(1, 1), torch.tensor([[-1.0]]), cfg)
    assert loss.item() == pytest.approx(3.0)  # min(max(5, 1.2) * 1, 3 * 1)
    assert metrics["grpo/dual_clip_frac"].item() == 1.0


def test_gspo_uses_the_length_normalised_sequence_ratio():
    cfg = GRPOConfig(policy_loss="gspo", clip_low=0.5, clip_high=0.5, loss_aggregation="seq-mean-token-mean")
    lp = torch.tensor([[math.log(1.2), math.log(1.0 / 1.2) + math.log(1.1) * 2]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    loss, metrics = _loss(lp, torch.zeros(1, 2), adv, cfg)
    # mean log-ratio = log(1.1): every token carries ratio 1.1
    assert loss.item() == pytest.approx(-1.1, rel=1e-6)
    assert metrics["grpo/ratio_min"].item() == pytest.approx(1.1, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.full((1, 2), -1.1 / 2))


def test_kl_penalty_and_entropy_bonus_add_to_the_loss():
    cfg = GRPOConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    lp = torch.tensor([[-1.0]], requires_grad=True)
    loss, metrics = _loss(
        lp,
        lp.detach(),
        torch.tensor([[0.0]]),
        cfg,
        ref_logprobs=torch.tensor([[-1.5]]),
        entropy=torch.tensor([[2.0]]),
    )
    assert loss.item() == pytest.approx(0.1 * 0.5 - 0.01 * 2.0)
    assert metrics["grpo/kl_ref"].item() == pytest.approx(0.5)
    assert metrics["grpo/entropy"].item() == pytest.approx(2.0)


@pytest.mark.parametrize(("mode", "expected"), [("token", [1.5, 2.0]), ("sequence", [2.0, 2.0])])
def test_truncated_importance_weights(mode, expected):
    cfg = GRPOConfig(importance_correction=mode, importance_cap=2.0)
    lp = torch.zeros(1, 2, requires_grad=True)
    inference = torch.tensor([[-math.log(1.5), -math.log(3.0)]])  # pi_old / pi_rollout = 1.5, 3.0
    loss, metrics = _loss(
        lp, torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), cfg, inference_logprobs=inference
    )
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert metrics["rollout/logprob_abs_diff"].item() == pytest.approx((math.log(1.5) + math.log(3.0)) / 2)


def test_rollout_mismatch_with_inference_old_logprobs_measures_the_current_policy():
    # old_logprobs=inference: old *is* the inference log-probs, so comparing them would always give 0.
    current = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    inference = torch.tensor([[-1.5, -1.0]])
    adv = torch.tensor([[1.0, -1.0]])
    expected_kl = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-1.0) - 1 + 1.0)) / 2  # k3, log q - log p
    _, metrics = _loss(
        current, inference, adv, GRPOConfig(old_logprobs="inference"), inference_logprobs=inference
    )
    assert metrics["rollout/logprob_abs_diff"].item() == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["rollout/kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    # recompute: the trainer's old log-probs are the reference point (unchanged by further updates).
    old = torch.tensor([[-1.25, -1.5]])
    _, metrics = _loss(current, old, adv, GRPOConfig(), inference_logprobs=inference)
    assert metrics["rollout/logprob_abs_diff"].item() == pytest.approx((0.25 + 0.5) / 2)


def test_rollout_kl_metric_is_not_clamped():
    # A broken engine must show: k3 of log pi_trainer - log pi_rollout = 6 is 396, not kl_clamp's 10.
    lp = torch.tensor([[-1.0]])
    _, metrics = _loss(lp, lp, torch.zeros(1, 1), GRPOConfig(), inference_logprobs=torch.tensor([[-7.0]]))
    assert metrics["rollout/kl"].item() == pytest.approx(math.expm1(6.0) - 6.0, rel=1e-6)


def test_untrained_tokens_contribute_nothing_even_when_garbage():
    cfg = GRPOConfig()
    lp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])
    mask = torch.tensor([[True, False]])
    loss, _ = grpo_token_loss(
        lp, old, torch.tensor([[1.0, 5.0]]), mask, aggregation_weights(mask, "token-mean"), cfg=cfg
    )
    assert loss.item() == -1.0
    loss.backward()
    assert torch.isfinite(lp.grad).all()


def test_missing_inputs_for_enabled_terms_are_errors():
    lp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(lp, lp, lp, GRPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="inference_logprobs"):
        _loss(lp, lp, lp, GRPOConfig(importance_correction="token"))


@pytest.mark.parametrize(
    "objective",
    [dict(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4), dict(importance_correction="sequence")],
    ids=["gspo", "tis-sequence"],
)
def test_sequence_level_terms_of_packed_rows_are_per_sequence(objective):
    """Two sequences packed in one row with ``sequence_ids`` (and a padding tail) give the loss, metrics
    and gradients of the same sequences in rows of their own: the sequence ratio never mixes them."""
    gen = torch.Generator().manual_seed(4)
    lengths, width = (5, 3), 10
    padded_mask = torch.tensor([[True] * 5, [False, True, True, False, False]])  # a prompt token, padding
    lp = -torch.rand(2, 5, generator=gen) - 0.1
    old = lp + 0.3 * torch.randn(2, 5, generator=gen)
    inference = old + 0.2 * torch.randn(2, 5, generator=gen)
    adv = torch.tensor([[1.0] * 5, [-0.7] * 5])
    cfg = GRPOConfig(**objective)

    def packed(x, fill=0.0):
        return torch.cat([x[0, : lengths[0]], x[1, : lengths[1]], torch.full((2,), fill, dtype=x.dtype)])[
            None
        ]

    ids = torch.tensor([[0] * 5 + [1] * 3 + [-1] * 2])
    weights = aggregation_weights(padded_mask, "token-mean")
    leaf_padded, leaf_packed = lp.clone().requires_grad_(), packed(lp).requires_grad_()
    expected, expected_metrics = grpo_token_loss(
        leaf_padded, old, adv, padded_mask, weights, cfg=cfg, inference_logprobs=inference
    )
    got, metrics = grpo_token_loss(
        leaf_packed, packed(old), packed(adv), packed(padded_mask, False), packed(weights), cfg=cfg,
        inference_logprobs=packed(inference), sequence_ids=ids,
    )  # fmt: skip
    expected.backward()
    got.backward()
    assert got.shape == () and leaf_packed.shape == (1, width)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(leaf_packed.grad, packed(leaf_padded.grad))
    for name, value in expected_metrics.items():
        torch.testing.assert_close(metrics[name], value, msg=name)
    # Without the ids the row counts as one sequence: a different loss, which is what they prevent.
    mixed, _ = grpo_token_loss(
        packed(lp), packed(old), packed(adv), packed(padded_mask, False), packed(weights), cfg=cfg,
        inference_logprobs=packed(inference),
    )  # fmt: skip
    assert abs(mixed.item() - expected.item()) > 1e-4
