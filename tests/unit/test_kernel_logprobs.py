"""``kernels.fused_token_logprobs`` (Triton, interpreted on CPU, and chunked torch) against fp64.

Blocks are made small (32 columns, 8 tokens) so that V = 101 spans several vocabulary slices with a
ragged last one and T several chunks: the online log-sum-exp merging is what is under test.
"""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.kernels import torch_ops, triton_ops
from atropos_megatron.kernels.backends import resolve_backend
from atropos_megatron.kernels.logprobs import VocabShard, fused_token_logprobs
from tests.kernel_reference import DTYPE_TOLERANCES, logprobs_fp64, relative_error

BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(torch_ops, "DEFAULT_CHUNK_TOKENS", 8)


def _inputs(dtype, shape=(37,), vocab=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    return logits, labels


def _upstream(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _check_against_fp64(backend, logits, labels, *, temperature=1.0, vocab_size=None, inplace=False):
    """Values and gradients (upstream on both outputs) of the kernel and of the fp64 spec."""
    up_lp, up_h = _upstream(labels.shape, 1), _upstream(labels.shape, 2)
    reference = logits.double().requires_grad_()
    ref_lp, ref_h = logprobs_fp64(reference, labels, temperature=temperature, vocab_size=vocab_size)
    ((ref_lp * up_lp).sum() + (ref_h * up_h).sum()).backward()

    leaf = logits.clone().requires_grad_()
    produced = leaf.clone()  # a non-leaf, like the output layer's logits inside the model
    shard = VocabShard(vocab_size=vocab_size)
    lp, h = fused_token_logprobs(
        produced, labels, temperature=temperature, shard=shard, return_entropy=True, backend=backend,
        inplace_backward=inplace,
    )  # fmt: skip
    ((lp * up_lp).sum() + (h * up_h).sum()).backward()
    assert lp.dtype == torch.float32 and leaf.grad.dtype == logits.dtype
    return max(relative_error(lp, ref_lp), relative_error(h, ref_h)), relative_error(
        leaf.grad, reference.grad
    )


@pytest.mark.parametrize("dtype_name", DTYPE_TOLERANCES)
@pytest.mark.parametrize("temperature", [1.0, 0.6, "per-token"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_fp64(backend, dtype_name, temperature, report):
    dtype, tolerance = DTYPE_TOLERANCES[dtype_name]
    logits, labels = _inputs(dtype)
    if temperature == "per-token":
        temperature = 0.5 + torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    value_err, grad_err = _check_against_fp64(backend, logits, labels, temperature=temperature)
    if not isinstance(temperature, torch.Tensor) and temperature == 0.6:
        report(
            f"{backend} {dtype_name}: relative error vs fp64: values {value_err:.1e}, grads {grad_err:.1e}"
        )
    assert value_err < tolerance
    assert grad_err < tolerance


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocabulary_columns_are_ignored_and_get_zero_gradient(backend):
    logits, labels = _inputs(torch.float32, vocab=104)
    labels = labels.clamp(max=96)
    logits[:, 97:] = 50.0  # would dominate the softmax if the padding were counted
    value_err, grad_err = _check_against_fp64(backend, logits, labels, vocab_size=97)
    assert value_err < 1e-5 and grad_err < 1e-5

    leaf = logits.clone().requires_grad_()
    fused_token_logprobs(leaf, labels, shard=VocabShard(vocab_size=97), backend=backend)[0].sum().backward()
    assert torch.all(leaf.grad[:, 97:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_into_the_logits_buffer(backend):
    logits, labels = _inputs(torch.float32, vocab=53)
    _, expected_err = _check_against_fp64(backend, logits, labels, temperature=0.8)

    leaf = logits.clone().requires_grad_()
    produced = leaf.clone()
    lp, h = fused_token_logprobs(
        produced, labels, temperature=0.8, return_entropy=True, backend=backend, inplace_backward=True
    )
    ((lp * _upstream(labels.shape, 1)).sum() + (h * _upstream(labels.shape, 2)).sum()).backward()
    torch.testing.assert_close(produced.detach(), leaf.grad, rtol=0, atol=0)  # the buffer holds it
    reference = logits.double().requires_grad_()
    ref_lp, ref_h = logprobs_fp64(reference, labels, temperature=0.8)
    ((ref_lp * _upstream(labels.shape, 1)).sum() + (ref_h * _upstream(labels.shape, 2)).sum()).backward()
    assert relative_error(leaf.grad, reference.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_megatron_sequence_first_layout_is_read_through_a_transposed_view(backend):
    """``[S, B, V]`` logits transposed to ``[B, S, V]`` without a copy give the same results."""
    logits_sbv, labels_sb = _inputs(torch.float32, shape=(11, 3), vocab=45)
    value_err, grad_err = _check_against_fp64(backend, logits_sbv.transpose(0, 1), labels_sb.t())
    assert value_err < 1e-5 and grad_err < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_what_reaches_the_loss_carries_gradient(backend):
    logits, labels = _inputs(torch.float32, vocab=29)
    for use_logprobs in (True, False):
        leaf = logits.clone().requires_grad_()
        lp, h = fused_token_logprobs(leaf, labels, return_entropy=True, backend=backend)
        (lp.sum() if use_logprobs else h.sum()).backward()
        reference = logits.double().requires_grad_()
        ref_lp, ref_h = logprobs_fp64(reference, labels)
        (ref_lp.sum() if use_logprobs else ref_h.sum()).backward()
        assert relative_error(leaf.grad, reference.grad) < 1e-5
    lp, h = fused_token_logprobs(logits, labels, backend=backend)
    assert h is None and not lp.requires_grad


def test_labels_outside_the_vocabulary_do_not_crash_and_get_no_label_gradient():
    """An id no shard owns gets ``-lse`` and only the ``-p`` part of the gradient (row sum -1, not 0)."""
    logits, labels = _inputs(torch.float32, vocab=31)
    labels[:3] = torch.tensor([-100, 31, 10_000])
    for backend in BACKENDS:
        leaf = logits.clone().requires_grad_()
        lp, _ = fused_token_logprobs(leaf, labels, backend=backend)
        lp.sum().backward()
        torch.testing.assert_close(lp[:3], -torch.logsumexp(logits[:3], -1))
        torch.testing.assert_close(
            leaf.grad.sum(-1), torch.tensor([-1.0] * 3 + [0.0] * 34), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs"),
    [
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), {}),
        (torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long), {}),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), {"temperature": 0.0}),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), {"backend": "cuda"}),
    ],
)
def test_bad_shapes_and_arguments_are_rejected(logits, labels, kwargs):
    with pytest.raises(ValueError):
        fused_token_logprobs(logits, labels, **kwargs)


def test_auto_backend_is_torch_on_cpu_and_triton_refuses_without_a_driver(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # interpreted in tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="grpo.kernel=auto or torch"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_columns_at_minus_inf_give_the_entropy_of_the_rest(backend):
    """Logits at -inf (a vocabulary mask) have probability 0: log-probs, entropy and gradients equal
    those of the remaining columns alone, with no NaN from ``0 * -inf``."""
    logits, labels = _inputs(torch.float32, vocab=40)
    labels = labels % 30  # labels among the kept columns
    masked = logits.clone()
    masked[:, 30:] = float("-inf")
    leaf = masked.clone().requires_grad_()
    lp, h = fused_token_logprobs(leaf.clone(), labels, return_entropy=True, backend=backend)
    ((lp * _upstream(labels.shape, 1)).sum() + (h * _upstream(labels.shape, 2)).sum()).backward()
    reference = logits[:, :30].double().requires_grad_()
    ref_lp, ref_h = logprobs_fp64(reference, labels)
    ((ref_lp * _upstream(labels.shape, 1)).sum() + (ref_h * _upstream(labels.shape, 2)).sum()).backward()
    assert relative_error(lp, ref_lp) < 1e-5 and relative_error(h, ref_h) < 1e-5
    assert relative_error(leaf.grad[:, :30], reference.grad) < 1e-5
    assert torch.all(leaf.grad[:, 30:] == 0)
