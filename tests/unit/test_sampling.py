"""SGLang sampling semantics: params parsing, logprob scaling, truncation, stop rules."""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.inference.sampling import (
    FinishReason,
    SamplingParams,
    SamplingParamsError,
    check_stop,
    compute_logprobs,
    finished_text,
    parse_sampling_params,
    sample_tokens,
)


def decode(ids):
    return " ".join(f"w{i}" for i in ids)


def test_defaults_and_coercion():
    params = parse_sampling_params({"stop": "w9", "temperature": 0, "n": 2, "presence_penalty": 0.0})
    assert params.max_new_tokens == 128 and params.greedy and params.n == 2 and params.stop == ("w9",)
    assert parse_sampling_params(None) == SamplingParams()
    assert parse_sampling_params({"max_new_tokens": None}).max_new_tokens == 128  # null means default


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"bogus": 1}, "unknown sampling_params field 'bogus'"),
        ({"repetition_penalty": 1.2}, "not supported by the reference server"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n must"),
        ({"max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"),
        ({"max_new_tokens": "5"}, "integer"),
        ({"stop": [1]}, "stop"),
        ({"ignore_eos": 1}, "boolean"),
    ],
)
def test_invalid_params_name_the_field(raw, error):
    with pytest.raises(SamplingParamsError, match=error):
        parse_sampling_params(raw)


def test_logprobs_are_temperature_scaled_unless_greedy_or_original():
    logits = torch.randn(3, 11)
    temps = torch.tensor([0.0, 0.5, 2.0])
    got = compute_logprobs(logits, temps, original=False)
    assert torch.allclose(got[0], torch.log_softmax(logits[0], -1))
    assert torch.allclose(got[1], torch.log_softmax(logits[1] / 0.5, -1))
    assert torch.allclose(got[2], torch.log_softmax(logits[2] / 2.0, -1))
    assert torch.allclose(compute_logprobs(logits, temps, original=True), torch.log_softmax(logits, -1))


def test_greedy_and_degenerate_truncations_pick_the_argmax():
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
    ]
    gens = [None] + [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(sample_tokens(logits, params, gens), logits.argmax(-1))


def test_sampling_respects_truncation_and_seed():
    logits = torch.tensor([[3.0, 2.9, 2.8, -1.0, -2.0]])
    params = [SamplingParams(top_k=2)]
    draws = {int(sample_tokens(logits, params, [torch.Generator().manual_seed(s)])[0]) for s in range(200)}
    assert draws == {0, 1}
    top_p = [SamplingParams(top_p=0.5)]  # probs ~ .35 .32 .29: the first two reach 0.5
    draws = {int(sample_tokens(logits, top_p, [torch.Generator().manual_seed(s)])[0]) for s in range(200)}
    assert draws == {0, 1}
    seeded = [
        int(sample_tokens(logits, [SamplingParams()], [torch.Generator().manual_seed(7)])[0])
        for _ in range(3)
    ]
    assert len(set(seeded)) == 1


def test_stop_rules_in_sglang_order():
    params = SamplingParams(stop_token_ids=(9,), stop=("w4 w5",), min_new_tokens=1)
    stop = lambda ids, p=params, m=10: check_stop(p, ids, (1,), max_new_tokens=m, decode=decode)  # noqa: E731
    assert stop([1]) == FinishReason("stop", matched=1)
    assert stop([3, 9]) == FinishReason("stop", matched=9)
    assert stop([4, 5]) == FinishReason("stop", matched="w4 w5")
    assert stop([3, 3], m=2) == FinishReason("length", length=2)
    assert stop([3]) is None
    assert check_stop(SamplingParams(ignore_eos=True), [1], (1,), max_new_tokens=5, decode=decode) is None
    late = SamplingParams(min_new_tokens=3)
    assert check_stop(late, [1], (1,), max_new_tokens=5, decode=decode) is None
    assert FinishReason("length", length=4).to_json() == {"type": "length", "length": 4}
    assert FinishReason("abort", message="m").to_json() == {"type": "abort", "message": "m"}


def test_text_trims_the_matched_stop_unless_no_stop_trim():
    params = SamplingParams(stop=("w5",))
    assert finished_text(params, [4, 5, 6], FinishReason("stop", matched="w5"), decode) == "w4 "
    assert finished_text(params, [4, 9], FinishReason("stop", matched=9), decode) == "w4"
    keep = SamplingParams(no_stop_trim=True)
    assert finished_text(keep, [4, 9], FinishReason("stop", matched=9), decode) == "w4 w9"
