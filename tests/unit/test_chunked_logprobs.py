"""The chunked torch path equals the algo/ spec (fp64 reference) in values and gradients."""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.algo.logprobs import token_logprobs
from atropos_megatron.kernels.chunked_logprobs import chunked_token_logprobs

# (dtype, relative tolerance) against an fp64 reference on the same inputs: error / max |reference|.
CASES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


def _inputs(dtype, tokens=37, vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    return logits, labels


@pytest.mark.parametrize(("dtype", "rtol"), CASES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_tokens", [1, 8, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_match_fp64_reference(dtype, rtol, chunk_tokens, temperature, report):
    logits, labels = _inputs(dtype)
    upstream_lp = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(1))
    upstream_h = torch.randn(labels.shape[0], generator=torch.Generator().manual_seed(2))

    # The reference is the spec's formula evaluated in fp64 (token_logprobs itself computes in fp32).
    ref_logits = logits.double().requires_grad_()
    scaled = torch.log_softmax(ref_logits / temperature, -1)
    ref_lp = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ref_h = -(scaled.exp() * scaled).sum(-1)
    ((ref_lp * upstream_lp).sum() + (ref_h * upstream_h).sum()).backward()

    test_logits = logits.clone().requires_grad_()
    lp, h = chunked_token_logprobs(
        test_logits, labels, temperature=temperature, return_entropy=True, chunk_tokens=chunk_tokens
    )
    ((lp * upstream_lp).sum() + (h * upstream_h).sum()).backward()

    value_err = max(_relative_error(lp, ref_lp), _relative_error(h, ref_h))
    grad_err = _relative_error(test_logits.grad, ref_logits.grad)
    if chunk_tokens == 8:
        report(
            f"{dtype} T={temperature}: relative error vs fp64: values {value_err:.1e}, grads {grad_err:.1e}"
        )
    assert lp.dtype == torch.float32 and test_logits.grad.dtype == dtype
    assert value_err < rtol
    assert grad_err < rtol


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


def test_without_entropy_only_logprobs_carry_gradient():
    logits, labels = _inputs(torch.float32, tokens=5, vocab=7)
    logits.requires_grad_()
    lp, h = chunked_token_logprobs(logits, labels, chunk_tokens=2)
    assert h is None
    lp.sum().backward()
    ref = logits.detach().clone().requires_grad_()
    token_logprobs(ref, labels)[0].sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs"),
    [
        (torch.zeros(3, 4, 5), torch.zeros(3, dtype=torch.long), {}),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), {}),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), {"temperature": 0.0}),
    ],
)
def test_bad_shapes_and_arguments_are_rejected(logits, labels, kwargs):
    with pytest.raises(ValueError):
        chunked_token_logprobs(logits, labels, **kwargs)


def test_inplace_backward_writes_the_same_gradient_into_the_logits_buffer():
    logits, labels = _inputs(torch.float32, tokens=9, vocab=13)
    expected = logits.clone().requires_grad_()
    lp, h = chunked_token_logprobs(expected, labels, return_entropy=True, chunk_tokens=4)
    (lp.sum() + 0.5 * h.sum()).backward()

    hidden = logits.clone().requires_grad_()
    produced = hidden * 1.0  # a non-leaf, like the output layer's logits inside the model
    lp, h = chunked_token_logprobs(
        produced, labels, return_entropy=True, chunk_tokens=4, inplace_backward=True
    )
    (lp.sum() + 0.5 * h.sum()).backward()
    torch.testing.assert_close(hidden.grad, expected.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(produced.detach(), expected.grad, rtol=0, atol=1e-6)  # the buffer now holds it
