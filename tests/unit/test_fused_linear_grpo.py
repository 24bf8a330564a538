"""``kernels.fused_linear_grpo_loss`` (hidden states + output weight, chunked) against the fp64 spec.

The reference multiplies ``h @ W^T`` in fp64 and evaluates the spec (``algo.grpo``) on those logits
under autograd: loss, every metric, ``d/dh`` and ``d/dW`` must match, for chunk sizes that divide the
trained tokens, that do not, and that exceed them, with per-sequence temperatures, padded
vocabulary rows (which must get no gradient and count for nothing), with and without a KL reference.
"""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.algo.grpo import grpo_token_loss
from atropos_megatron.config import GRPOConfig
from atropos_megatron.kernels import torch_ops, triton_ops
from atropos_megatron.kernels.fused_linear_grpo import default_chunk_tokens, fused_linear_grpo_loss
from atropos_megatron.kernels.logprobs import VocabShard
from tests.kernel_reference import grpo_inputs, logprobs_fp64, relative_error

VOCAB, PADDED, HIDDEN = 97, 104, 24
TEMPERATURE = torch.tensor([[0.7], [1.0], [1.3], [0.9], [1.1], [0.6]])
OBJECTIVES = {
    "clip-higher, no reference": dict(clip_low=0.2, clip_high=0.28),
    "dual-clip+kl-k3+entropy": dict(
        dual_clip=3.0,
        kl_coef=0.05,
        kl_estimator="k3",
        entropy_coef=0.01,
        loss_aggregation="seq-mean-token-mean",
    ),  # fmt: skip
    "kl-k2+tis-token": dict(
        kl_coef=0.1,
        kl_estimator="k2",
        importance_correction="token",
        loss_aggregation="seq-mean-token-sum-norm",
    ),  # fmt: skip
    "gspo+tis-sequence": dict(
        policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, importance_correction="sequence"
    ),
}
CHUNKS = {"5 (ragged)": 5, "8": 8, "1000 (> T)": 1000, "default": None}


def linear_inputs(*, seed=0, aggregation="token-mean", dtype=torch.float32, padded=PADDED, vocab=VOCAB):
    """``grpo_inputs``' batch (clip regions, dual clip, an all-equal group, untrained tokens) with the
    logits made by ``h @ W^T``: old/ref/inference log-probs keep their offsets from the current policy.
    Rows of ``W`` past ``vocab`` are padding, filled with large values that must not count."""
    base = grpo_inputs(vocab=vocab, seed=seed, aggregation=aggregation)
    gen = torch.Generator().manual_seed(seed + 100)
    batch, seq = base["labels"].shape
    hidden = torch.randn(batch, seq, HIDDEN, generator=gen)
    weight = torch.randn(padded, HIDDEN, generator=gen) * (2.0 / HIDDEN**0.5)
    weight[vocab:] = 3.0  # padding rows: logits far above the real ones
    mask = base["loss_mask"]
    before, _ = logprobs_fp64(base["logits"], base["labels"])
    after, _ = logprobs_fp64(hidden.double() @ weight.double().T, base["labels"], vocab_size=vocab)
    inputs = {k: v for k, v in base.items() if k != "logits"}
    for key in ("old_logprobs", "ref_logprobs", "inference_logprobs"):
        moved = (base[key].double() - before + after).float()
        inputs[key] = torch.where(mask, moved, 0.0) if key == "old_logprobs" else moved
    return hidden.to(dtype), weight.to(dtype), inputs


def reference_fp64(hidden, weight, inputs, cfg, *, temperature, vocab_size=VOCAB):
    """``(loss, metrics, dh, dW)`` of the spec on ``h @ W^T`` in fp64."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    logprobs, entropy = logprobs_fp64(
        h @ w.T, inputs["labels"], temperature=temperature, vocab_size=vocab_size
    )
    ref = inputs.get("ref_logprobs")
    loss, metrics = grpo_token_loss(
        logprobs, inputs["old_logprobs"].double(), inputs["advantages"].double(), inputs["loss_mask"],
        inputs["weights"].double(), cfg=cfg, ref_logprobs=ref.double() if ref is not None else None,
        inference_logprobs=inputs["inference_logprobs"].double(), entropy=entropy,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


def run_fused(hidden, weight, inputs, cfg, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(h, w, **inputs, cfg=cfg, **kwargs)
    loss.backward()
    return loss.detach(), metrics, h.grad, w.grad


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(torch_ops, "DEFAULT_CHUNK_TOKENS", 4)  # nested chunks inside a fused chunk


def _check(result, reference, tolerance, report=None, label=""):
    loss, metrics, dh, dw = result
    ref_loss, ref_metrics, ref_dh, ref_dw = reference
    errors = {
        "loss": abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-3),
        "dh": relative_error(dh, ref_dh),
        "dW": relative_error(dw, ref_dw),
    }
    if report is not None:
        report(f"{label}: relative error vs fp64: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for name, error in errors.items():
        assert error < tolerance, name
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        torch.testing.assert_close(
            metrics[name].double(), value.double(), atol=tolerance, rtol=tolerance, msg=name
        )


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_metrics_and_both_gradients_match_fp64_spec(objective, chunk, report):
    overrides = OBJECTIVES[objective]
    hidden, weight, inputs = linear_inputs(aggregation=overrides.get("loss_aggregation", "token-mean"))
    cfg = GRPOConfig(kernel="torch", **overrides)
    if cfg.kl_coef == 0:
        inputs["ref_logprobs"] = None  # no reference model at all
    reference = reference_fp64(hidden, weight, inputs, cfg, temperature=TEMPERATURE)

    result = run_fused(
        hidden, weight, inputs, cfg, temperature=TEMPERATURE, shard=VocabShard(vocab_size=VOCAB),
        chunk_tokens=CHUNKS[chunk],
    )  # fmt: skip

    _check(result, reference, 1e-5, report, f"{objective}, chunk {chunk}")
    assert torch.all(result[3][VOCAB:] == 0), "padding rows got a gradient"
    if cfg.kl_coef == 0:
        assert "grpo/kl_ref" not in result[1]


def test_triton_backend_interpreted_matches_fp64_spec(report):
    """The per-chunk passes through the Triton kernels (compiled on CUDA; interpreted here)."""
    hidden, weight, inputs = linear_inputs(seed=3)
    cfg = GRPOConfig(kernel="triton", dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01)
    reference = reference_fp64(hidden, weight, inputs, cfg, temperature=TEMPERATURE)
    result = run_fused(
        hidden, weight, inputs, cfg, temperature=TEMPERATURE, shard=VocabShard(vocab_size=VOCAB),
        chunk_tokens=16,
    )  # fmt: skip
    _check(result, reference, 1e-5, report, "triton")


def test_bf16_within_the_bf16_bar(report):
    hidden, weight, inputs = linear_inputs(seed=4, dtype=torch.bfloat16)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.05, entropy_coef=0.01)
    reference = reference_fp64(hidden, weight, inputs, cfg, temperature=TEMPERATURE)
    result = run_fused(
        hidden, weight, inputs, cfg, temperature=TEMPERATURE, shard=VocabShard(vocab_size=VOCAB),
        chunk_tokens=8,
    )  # fmt: skip
    assert result[2].dtype == result[3].dtype == torch.bfloat16
    _check(result, reference, 1e-2, report, "bf16")


def test_untrained_tokens_get_no_hidden_gradient():
    hidden, weight, inputs = linear_inputs(seed=1)
    _, _, dh, _ = run_fused(hidden, weight, inputs, GRPOConfig(kernel="torch"), chunk_tokens=8)
    mask = inputs["loss_mask"]
    assert torch.all(dh[~mask] == 0)
    assert torch.all(dh[1] == 0)  # all-equal group: advantage 0, no KL or entropy term
    assert dh[0][mask[0]].abs().sum() > 0


def test_gradients_scale_with_the_upstream_gradient():
    """Megatron back-propagates ``loss / micro_batches`` (times the loss scale)."""
    hidden, weight, inputs = linear_inputs(seed=2)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.1)
    _, _, dh, dw = run_fused(hidden, weight, inputs, cfg, chunk_tokens=8)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, w, **inputs, cfg=cfg, chunk_tokens=8)
    (loss * 0.25).backward()
    torch.testing.assert_close(h.grad, dh * 0.25)
    torch.testing.assert_close(w.grad, dw * 0.25)


def test_tied_embedding_gradient_accumulates_with_the_embedding():
    """``W`` as the input embedding too: its gradient is the embedding's plus the loss head's."""
    hidden, weight, inputs = linear_inputs(seed=5)
    cfg = GRPOConfig(kernel="torch", entropy_coef=0.01)
    _, _, _, head_dw = run_fused(hidden, weight, inputs, cfg, chunk_tokens=8)
    ids = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    up = torch.randn(6, 9, HIDDEN, generator=torch.Generator().manual_seed(1))
    embedding_only = weight.clone().requires_grad_()
    (torch.nn.functional.embedding(ids, embedding_only) * up).sum().backward()

    tied = weight.clone().requires_grad_()
    embedded = torch.nn.functional.embedding(ids, tied)
    loss, _ = fused_linear_grpo_loss(hidden, tied, **inputs, cfg=cfg, chunk_tokens=8)
    ((embedded * up).sum() + loss).backward()
    torch.testing.assert_close(tied.grad, embedding_only.grad + head_dw)


def test_megatron_sbh_layout_and_frozen_weight():
    """Megatron's ``[S, B, H]`` hidden states as a transposed view; a frozen W gets no gradient."""
    hidden, weight, inputs = linear_inputs(seed=6)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.05)
    _, _, expected_dh, _ = run_fused(hidden, weight, inputs, cfg, chunk_tokens=8)
    sbh = hidden.transpose(0, 1).contiguous().requires_grad_()
    frozen = weight.clone()
    loss, _ = fused_linear_grpo_loss(sbh.transpose(0, 1), frozen, **inputs, cfg=cfg, chunk_tokens=8)
    loss.backward()
    torch.testing.assert_close(sbh.grad.transpose(0, 1), expected_dh)
    assert frozen.grad is None


def test_without_grad_mode_only_the_forward_runs():
    hidden, weight, inputs = linear_inputs(seed=7)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.05, entropy_coef=0.01)
    ref_loss, ref_metrics, _, _ = reference_fp64(hidden, weight, inputs, cfg, temperature=1.0)
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        loss, metrics = fused_linear_grpo_loss(
            h, weight, **inputs, cfg=cfg, shard=VocabShard(vocab_size=VOCAB), chunk_tokens=8
        )
    assert not loss.requires_grad and h.grad is None
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    assert set(metrics) == set(ref_metrics)


def test_no_trained_tokens_gives_zero_loss_and_gradients():
    hidden, weight, inputs = linear_inputs(seed=8)
    inputs = dict(inputs, loss_mask=torch.zeros_like(inputs["loss_mask"]))
    inputs["weights"] = torch.zeros_like(inputs["weights"])
    loss, _, dh, dw = run_fused(hidden, weight, inputs, GRPOConfig(kernel="torch"))
    assert loss.item() == 0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_default_chunk_matches_the_activations_size():
    assert default_chunk_tokens(4096, 1024, 32768) == 128  # 128 x 32768 = 4096 x 1024
    assert default_chunk_tokens(10, 8, 100_000) == 16  # floor
    assert default_chunk_tokens(1 << 20, 8192, 1024) == 1024  # ceiling


def test_shape_errors_are_named():
    hidden, weight, inputs = linear_inputs()
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_grpo_loss(hidden[:, :-1], weight, **inputs, cfg=GRPOConfig())
    with pytest.raises(ValueError, match="weight"):
        fused_linear_grpo_loss(hidden, weight[:, :-1], **inputs, cfg=GRPOConfig())
    with pytest.raises(ValueError, match="ref_logprobs"):
        fused_linear_grpo_loss(hidden, weight, **dict(inputs, ref_logprobs=None), cfg=GRPOConfig(kl_coef=0.1))


def test_without_old_logprobs_the_pass_own_are_pi_old():
    """``old_logprobs=None`` (on-policy): pi_old is the policy's own log-probs as a constant."""
    hidden, weight, inputs = linear_inputs(seed=3)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.05, importance_correction="token")
    current, _ = logprobs_fp64(
        (hidden.double() @ weight.double().T), inputs["labels"], temperature=TEMPERATURE, vocab_size=VOCAB
    )
    recomputed = dict(inputs, old_logprobs=torch.where(inputs["loss_mask"], current, 0.0).float())
    reference = reference_fp64(hidden, weight, recomputed, cfg, temperature=TEMPERATURE)

    result = run_fused(
        hidden, weight, dict(inputs, old_logprobs=None), cfg, temperature=TEMPERATURE,
        shard=VocabShard(vocab_size=VOCAB), chunk_tokens=8,
    )  # fmt: skip

    _check(result, reference, 1e-5)
    assert result[1]["grpo/ratio_max"].item() == result[1]["grpo/ratio_min"].item() == 1.0


@pytest.mark.parametrize("temperature", ["per-sequence", "1"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_kept_chunk_matches_fp64_spec(backend, objective, temperature):
    """``single_chunk_bytes`` large enough: one chunk, whose pass-1 logits the gradient pass reuses
    (left scaled and shifted by the torch statistics) instead of recomputing them."""
    overrides = OBJECTIVES[objective]
    hidden, weight, inputs = linear_inputs(
        seed=5, aggregation=overrides.get("loss_aggregation", "token-mean")
    )
    cfg = GRPOConfig(kernel=backend, **overrides)
    temperature = TEMPERATURE if temperature == "per-sequence" else 1.0
    reference = reference_fp64(hidden, weight, inputs, cfg, temperature=temperature)

    result = run_fused(
        hidden, weight, inputs, cfg, temperature=temperature, shard=VocabShard(vocab_size=VOCAB),
        chunk_tokens=4, single_chunk_bytes=1 << 30,
    )  # fmt: skip

    _check(result, reference, 1e-5)


def test_one_kept_chunk_in_bf16_within_the_bf16_bar():
    hidden, weight, inputs = linear_inputs(seed=4, dtype=torch.bfloat16)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.05, entropy_coef=0.01)
    reference = reference_fp64(hidden, weight, inputs, cfg, temperature=TEMPERATURE)
    result = run_fused(
        hidden, weight, inputs, cfg, temperature=TEMPERATURE, shard=VocabShard(vocab_size=VOCAB),
        single_chunk_bytes=1 << 30,
    )  # fmt: skip
    _check(result, reference, 1e-2)
