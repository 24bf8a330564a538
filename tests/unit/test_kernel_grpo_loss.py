"""``kernels.fused_grpo_loss`` (one Triton kernel, or two passes) against the fp64 spec.

Every variant of the objective is run on a batch that has ratios past both clip bounds, negative
advantages past the dual-clip bound, an all-equal group and untrained positions (see
``tests/kernel_reference.grpo_inputs``); loss, metrics and ``d loss / d logits`` must match.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atropos_megatron.config import GRPOConfig
from atropos_megatron.kernels import torch_ops, triton_ops
from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
from atropos_megatron.kernels.logprobs import VocabShard
from tests.kernel_reference import (
    DTYPE_TOLERANCES,
    FAR_REFERENCE,
    grpo_inputs,
    grpo_loss_fp64,
    logprobs_fp64,
    relative_error,
    with_far_reference,
)

BACKENDS = ("torch", "triton")
OBJECTIVES = {
    "clip-higher": dict(clip_low=0.2, clip_high=0.28),
    "dual-clip+kl-k3": dict(
        dual_clip=3.0, kl_coef=0.05, kl_estimator="k3", loss_aggregation="seq-mean-token-mean"
    ),
    "kl-k1+entropy": dict(
        kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01, loss_aggregation="seq-mean-token-sum"
    ),
    "kl-k2+tis-token": dict(
        kl_coef=0.1,
        kl_estimator="k2",
        importance_correction="token",
        loss_aggregation="seq-mean-token-sum-norm",
    ),
    "gspo+tis-sequence": dict(
        policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, importance_correction="sequence"
    ),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(torch_ops, "DEFAULT_CHUNK_TOKENS", 8)


def _run(inputs: dict, cfg: GRPOConfig, *, inplace=False, temperature=None, shard=None):
    leaf = inputs["logits"].clone().requires_grad_()
    produced = leaf.clone()
    kwargs = {k: v for k, v in inputs.items() if k != "logits"}
    loss, metrics = fused_grpo_loss(
        produced, **kwargs, cfg=cfg, temperature=temperature, shard=shard, inplace=inplace
    )
    loss.backward()
    return loss, metrics, leaf.grad, produced


@pytest.mark.parametrize("dtype_name", DTYPE_TOLERANCES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_metrics_and_gradient_match_fp64_spec(backend, objective, dtype_name, report):
    dtype, tolerance = DTYPE_TOLERANCES[dtype_name]
    aggregation = OBJECTIVES[objective].get("loss_aggregation", "token-mean")
    inputs = grpo_inputs(dtype=dtype, aggregation=aggregation)
    cfg = GRPOConfig(kernel=backend, **OBJECTIVES[objective])
    ref_loss, ref_metrics, ref_grad = grpo_loss_fp64(inputs, cfg)

    loss, metrics, grad, _ = _run(inputs, cfg)

    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-3)
    grad_err = relative_error(grad, ref_grad)
    report(
        f"{backend} {objective} {dtype_name}: relative error vs fp64: loss {loss_err:.1e}, grad {grad_err:.1e}"
    )
    assert loss_err < tolerance
    assert grad_err < tolerance
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        torch.testing.assert_close(
            metrics[name].double(), value.double(), atol=tolerance, rtol=tolerance, msg=name
        )


@pytest.mark.parametrize("dtype_name", DTYPE_TOLERANCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_k3_tokens_match_fp64_spec_and_get_no_kl_gradient(backend, dtype_name, report):
    """Tokens whose k3 exceeds grpo.kl_clamp (and one past the log-ratio clamp) contribute the clamp
    and no KL gradient, in the one-kernel Triton path and in the two-pass path alike."""
    dtype, tolerance = DTYPE_TOLERANCES[dtype_name]
    inputs = with_far_reference(grpo_inputs(dtype=dtype, seed=6))
    cfg = GRPOConfig(kernel=backend, kl_coef=0.1, entropy_coef=0.01)  # kl_clamp: verl's 10
    ref_loss, ref_metrics, ref_grad = grpo_loss_fp64(inputs, cfg)
    unclamped_loss, _, _ = grpo_loss_fp64(inputs, dataclasses.replace(cfg, kl_clamp=None))
    _, _, no_kl_grad = grpo_loss_fp64(inputs, dataclasses.replace(cfg, kl_coef=0.0))

    loss, metrics, grad, _ = _run(inputs, cfg)

    loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    grad_err = relative_error(grad, ref_grad)
    clamped = [(b, t) for (b, t), shift in FAR_REFERENCE.items() if shift > 3]  # k3(3) = 16.1 > 10
    kl_grad_on_clamped = max((grad[b, t] - no_kl_grad[b, t]).abs().max().item() for b, t in clamped)
    report(
        f"{backend} k3-clamp {dtype_name}: loss {loss.item():.6f} (fp64 {ref_loss.item():.6f}, unclamped "
        f"{unclamped_loss.item():.4f}), relative error loss {loss_err:.1e} grad {grad_err:.1e}; on clamped "
        f"tokens max |grad - grad without KL| {kl_grad_on_clamped:.1e}"
    )
    assert unclamped_loss.item() - ref_loss.item() > 1.0, "the inputs do not reach the clamp"
    assert loss_err < tolerance and grad_err < tolerance
    assert metrics["grpo/kl_ref"].item() == pytest.approx(ref_metrics["grpo/kl_ref"].item(), rel=tolerance)
    # The spec gives those tokens exactly no KL gradient; the kernel's gradient there is the rest's alone.
    assert all(torch.equal(ref_grad[b, t], no_kl_grad[b, t]) for b, t in clamped)
    assert kl_grad_on_clamped < tolerance * grad.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_old_logprobs_measure_rollout_mismatch_against_the_current_policy(backend):
    """old_logprobs=inference: old == inference, so rollout/* must come from the loss pass's log-probs."""
    inputs = grpo_inputs(seed=8)
    inputs["old_logprobs"] = inputs["inference_logprobs"]
    cfg = GRPOConfig(kernel=backend, old_logprobs="inference")
    _, ref_metrics, _ = grpo_loss_fp64(inputs, cfg)
    _, metrics, _, _ = _run(inputs, cfg)

    current, _ = logprobs_fp64(inputs["logits"], inputs["labels"])
    mask = inputs["loss_mask"]
    expected = (current - inputs["inference_logprobs"].double())[mask].abs().mean()
    spec_value = ref_metrics["rollout/logprob_abs_diff"].item()  # metrics are fp32
    assert spec_value == pytest.approx(expected.item(), rel=1e-6)
    assert expected > 0.1
    for name in ("rollout/logprob_abs_diff", "rollout/kl"):
        assert metrics[name].item() == pytest.approx(ref_metrics[name].item(), rel=1e-5), name


def test_the_clip_regions_are_all_exercised():
    """The inputs reach both clip bounds and the dual-clip bound (else the tests above prove little)."""
    cfg = GRPOConfig(kernel="torch", dual_clip=3.0, clip_high=0.28)
    _, metrics, _ = grpo_loss_fp64(grpo_inputs(), cfg)
    assert metrics["grpo/clip_frac_low"] > 0
    assert metrics["grpo/clip_frac_high"] > 0
    assert metrics["grpo/dual_clip_frac"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_untrained_tokens_and_zero_advantage_groups_get_no_gradient(backend):
    inputs = grpo_inputs()
    _, _, grad, _ = _run(inputs, GRPOConfig(kernel=backend))
    assert torch.all(grad[~inputs["loss_mask"]] == 0)
    assert torch.all(grad[1] == 0)  # all-equal group: advantage 0 and no KL or entropy term
    assert grad[0][inputs["loss_mask"][0]].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_writes_the_gradient_into_the_logits_buffer(backend):
    inputs = grpo_inputs(seed=1)
    cfg = GRPOConfig(kernel=backend, kl_coef=0.1, entropy_coef=0.01)
    _, _, expected, _ = _run(inputs, cfg)
    _, _, grad, produced = _run(inputs, cfg, inplace=True)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(produced.detach(), grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_scales_with_the_upstream_gradient(backend):
    """Megatron back-propagates ``loss / micro_batches``: the precomputed gradient must follow."""
    inputs = grpo_inputs(seed=2)
    cfg = GRPOConfig(kernel=backend)
    _, _, expected, _ = _run(inputs, cfg)
    leaf = inputs["logits"].clone().requires_grad_()
    loss, _ = fused_grpo_loss(leaf.clone(), **{k: v for k, v in inputs.items() if k != "logits"}, cfg=cfg)
    (loss * 0.25).backward()
    torch.testing.assert_close(leaf.grad, expected * 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_mode_the_logits_are_left_untouched(backend):
    inputs = grpo_inputs(seed=3)
    logits = inputs["logits"].clone().requires_grad_()
    before = logits.detach().clone()
    with torch.no_grad():
        loss, metrics = fused_grpo_loss(
            logits, **{k: v for k, v in inputs.items() if k != "logits"}, cfg=GRPOConfig(kernel=backend),
            inplace=True,
        )  # fmt: skip
    assert not loss.requires_grad and torch.equal(logits.detach(), before)
    ref_loss, _, _ = grpo_loss_fp64(inputs, GRPOConfig())
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    assert "grpo/entropy" in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_padding_and_transposed_layout(backend):
    """Per-sequence temperatures, TP padding columns and Megatron's ``[S, B, V]`` order at once."""
    inputs = grpo_inputs(vocab=104, seed=4)
    inputs["labels"] = torch.where(inputs["loss_mask"], inputs["labels"].clamp(max=96), -100)
    temperature = torch.tensor([[0.7], [1.0], [1.3], [0.9], [1.1], [0.6]])
    cfg = GRPOConfig(kernel=backend, kl_coef=0.05, entropy_coef=0.01)
    reference = dict(inputs, logits=inputs["logits"].clone())
    reference["logits"][..., 97:] = 40.0  # garbage in the padding must not count
    ref_loss, _, ref_grad = grpo_loss_fp64(reference, cfg, temperature=temperature, vocab_size=97)

    sbv = reference["logits"].transpose(0, 1).contiguous().requires_grad_()
    loss, _ = fused_grpo_loss(
        sbv.clone().transpose(0, 1), **{k: v for k, v in inputs.items() if k != "logits"}, cfg=cfg,
        temperature=temperature, shard=VocabShard(vocab_size=97), inplace=True,
    )  # fmt: skip
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    assert relative_error(sbv.grad.transpose(0, 1), ref_grad) < 1e-5
    assert torch.all(sbv.grad[..., 97:] == 0)


def test_one_kernel_and_two_pass_paths_agree():
    """Triton's single kernel and the two-pass path (used under TP) give the same loss and gradient."""
    inputs = grpo_inputs(seed=5)
    cfg = GRPOConfig(kernel="triton", dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    one_kernel = _run(inputs, cfg)
    two_pass = _run(inputs, dataclasses.replace(cfg, kernel="torch"))
    torch.testing.assert_close(one_kernel[0], two_pass[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one_kernel[2], two_pass[2], atol=1e-7, rtol=1e-4)


def test_missing_inputs_are_named():
    inputs = grpo_inputs()
    inputs.pop("ref_logprobs")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="ref_logprobs"):
            fused_grpo_loss(
                inputs["logits"], **{k: v for k, v in inputs.items() if k != "logits"},
                cfg=GRPOConfig(kernel=backend, kl_coef=0.1),
            )  # fmt: skip
    with pytest.raises(ValueError, match="labels"):
        fused_grpo_loss(
            inputs["logits"][0], **{k: v for k, v in inputs.items() if k != "logits"}, cfg=GRPOConfig()
        )


@pytest.mark.parametrize("objective", ["dual-clip+kl-k3", "kl-k2+tis-token", "gspo+tis-sequence"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_old_logprobs_the_pass_own_are_pi_old(backend, objective):
    """``old_logprobs=None`` (on-policy, ``grpo.old_logprobs: auto``) is the spec with pi_old = the
    policy's own log-probs as a constant: ratio exactly 1, the gradient of a recomputed pi_old."""
    inputs = grpo_inputs(seed=9, aggregation=OBJECTIVES[objective].get("loss_aggregation", "token-mean"))
    cfg = GRPOConfig(kernel=backend, **OBJECTIVES[objective])
    current, _ = logprobs_fp64(inputs["logits"], inputs["labels"])
    recomputed = dict(inputs, old_logprobs=torch.where(inputs["loss_mask"], current, 0.0).float())
    ref_loss, ref_metrics, ref_grad = grpo_loss_fp64(recomputed, cfg)

    loss, metrics, grad, _ = _run(dict(inputs, old_logprobs=None), cfg)

    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(abs(ref_loss.item()), 1e-3)
    assert relative_error(grad, ref_grad) < 1e-5
    assert metrics["grpo/ratio_max"].item() == metrics["grpo/ratio_min"].item() == 1.0
    for name in ("grpo/pg_loss", "rollout/logprob_abs_diff"):
        assert metrics[name].item() == pytest.approx(ref_metrics[name].item(), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_sequence_terms_follow_sequence_ids(backend):
    """GSPO and sequence importance weights over rows holding two sequences each (``sequence_ids``)."""
    inputs = grpo_inputs(seed=10)
    batch, seq = inputs["labels"].shape
    half = torch.arange(seq) >= seq // 2
    inputs["sequence_ids"] = (2 * torch.arange(batch)[:, None] + half).long()
    cfg = GRPOConfig(kernel=backend, **OBJECTIVES["gspo+tis-sequence"])
    ref_loss, ref_metrics, ref_grad = grpo_loss_fp64(inputs, cfg)
    row_loss, _, _ = grpo_loss_fp64({k: v for k, v in inputs.items() if k != "sequence_ids"}, cfg)

    loss, metrics, grad, _ = _run(inputs, cfg)

    assert abs(row_loss.item() - ref_loss.item()) > 1e-3, "the ids do not change the objective: void test"
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(abs(ref_loss.item()), 1e-3)
    assert relative_error(grad, ref_grad) < 1e-5
    for name, value in ref_metrics.items():
        torch.testing.assert_close(metrics[name].double(), value.double(), atol=1e-5, rtol=1e-5, msg=name)
