"""The compiled Triton kernels on a CUDA device, at a real vocabulary size, against fp64 (skipped on CPU).

The CPU tests run the same kernels interpreted with tiny blocks; here they run compiled, with the
production block size and Qwen2's V = 151936 (not a multiple of the 4096-column slice).
"""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.config import GRPOConfig
from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
from atropos_megatron.kernels.logprobs import fused_token_logprobs
from tests.kernel_reference import (
    DTYPE_TOLERANCES,
    grpo_inputs,
    grpo_loss_fp64,
    logprobs_fp64,
    relative_error,
)

pytestmark = pytest.mark.gpu
VOCAB = 151_936


@pytest.mark.parametrize("dtype_name", DTYPE_TOLERANCES)
def test_token_logprobs_on_cuda_match_fp64(dtype_name, report):
    dtype, tolerance = DTYPE_TOLERANCES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, VOCAB, device="cuda", generator=gen) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (256,), device="cuda", generator=gen)
    up = torch.randn(256, device="cuda", generator=gen)

    reference = logits.double().requires_grad_()
    ref_lp, ref_h = logprobs_fp64(reference, labels, temperature=0.7)
    ((ref_lp * up).sum() + ref_h.sum()).backward()
    leaf = logits.clone().requires_grad_()
    lp, h = fused_token_logprobs(leaf, labels, temperature=0.7, return_entropy=True, backend="triton")
    ((lp * up).sum() + h.sum()).backward()

    value_err = max(relative_error(lp, ref_lp), relative_error(h, ref_h))
    grad_err = relative_error(leaf.grad, reference.grad)
    report(f"cuda {dtype_name} V={VOCAB}: values {value_err:.1e}, grads {grad_err:.1e}")
    assert value_err < tolerance and grad_err < tolerance


@pytest.mark.parametrize("dtype_name", DTYPE_TOLERANCES)
def test_one_kernel_grpo_loss_on_cuda_matches_fp64(dtype_name, report):
    dtype, tolerance = DTYPE_TOLERANCES[dtype_name]
    inputs = {k: v.cuda() for k, v in grpo_inputs(vocab=VOCAB, dtype=dtype).items()}
    cfg = GRPOConfig(kernel="triton", clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01)
    ref_loss, _, ref_grad = grpo_loss_fp64(inputs, cfg)

    leaf = inputs["logits"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "logits"}
    loss, _ = fused_grpo_loss(leaf.clone(), **rest, cfg=cfg, inplace=True)
    loss.backward()

    loss_err = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    grad_err = relative_error(leaf.grad, ref_grad)
    report(f"cuda {dtype_name} V={VOCAB}: loss {loss_err:.1e}, grads {grad_err:.1e}")
    assert loss_err < tolerance and grad_err < tolerance
