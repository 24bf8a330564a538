"""vLLM 0.33's token route ``/inference/v1/generate`` on the reference server, pure parts (``vllm_api``):
the request's defaults and checks against a stand-in engine (an omitted ``max_tokens`` is the rest of the
context, which the tiny model's 16k context makes too long to generate in a test), the reply built from
finished samples (candidates, ranks, clamping, stop reasons, weight versions), and the decoding of
log-prob tokens."""

from __future__ import annotations

import argparse
import types

import pytest

from atropos_megatron.inference import vllm_api
from atropos_megatron.inference.generation import SampleOutput
from atropos_megatron.inference.sampling import FinishReason


class _Tokenizer:
    """Bytes per id, decoded as UTF-8 with replacement: id 3 is the first half of "é", id 4 its second."""

    eos_token_id = 1
    pieces = {0: b"<unk>", 1: b"", 2: b"a", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b" b"}

    def decode(self, ids, skip_special_tokens=False):
        return b"".join(self.pieces.get(i, b"?") for i in ids).decode("utf-8", errors="replace")


def _engine(context_length=64, vocab_size=100, max_batch=16, logprobs_mode="raw_logprobs"):
    options = types.SimpleNamespace(
        served_model_name="tiny", max_batch=max_batch, vllm_logprobs_mode=logprobs_mode
    )
    return types.SimpleNamespace(options=options, context_length=context_length, vocab_size=vocab_size,
                                 routing=None, tokenizer=_Tokenizer())  # fmt: skip


def _parse(sampling, engine=None, **body):
    return vllm_api.parse_generate(
        {"token_ids": [2, 5, 7], "sampling_params": sampling, **body}, engine or _engine()
    )


def test_an_omitted_or_null_max_tokens_is_the_rest_of_the_context():
    assert _parse({}).request.params.max_new_tokens == 61  # 64 - 3, not SamplingParams' 16
    assert _parse({"max_tokens": None}).request.params.max_new_tokens == 61
    assert _parse({"max_tokens": 5}).request.params.max_new_tokens == 5
    # SamplingParams checks min_tokens against its own default 16 before the route fills max_tokens in
    with pytest.raises(vllm_api.ScaleOutError, match=r"max_tokens \(16\)"):
        _parse({"min_tokens": 20})
    assert _parse({"min_tokens": 20, "max_tokens": None}).request.params.min_new_tokens == 20
    with pytest.raises(vllm_api.ScaleOutError, match="61 tokens left"):
        _parse({"min_tokens": 62, "max_tokens": None})


def test_logprobs_modes_pick_what_the_engine_reports():
    raw = _parse({"logprobs": 0, "prompt_logprobs": 0, "min_tokens": 2, "top_p": 0.9}).request
    assert raw.unmasked_logprobs and raw.raw_input_logprobs  # raw: before the min_tokens mask
    processed = _engine(logprobs_mode="processed_logprobs")
    request = _parse({"logprobs": 0, "prompt_logprobs": 0, "min_tokens": 2}, processed).request
    assert not request.unmasked_logprobs and request.raw_input_logprobs  # prompt log-probs stay raw
    # vLLM renormalises processed log-probs over top-k/top-p/min-p; this server does not, so it refuses
    for field, value in (("top_p", 0.9), ("top_k", 5), ("min_p", 0.1)):
        with pytest.raises(vllm_api.ScaleOutError, match=f"{field} with --logprobs-mode processed_logprobs"):
            _parse({"logprobs": 0, field: value}, processed)
        _parse({field: value}, processed)  # no log-probs asked: nothing to misreport
        _parse({"logprobs": 0, "temperature": 0, field: value}, processed)  # greedy: no truncation


def test_sampling_fields_map_as_vllm_reads_them():
    params = _parse({"temperature": 0.001, "top_k": 0, "seed": -1, "stop": "x", "stop_token_ids": [9, 9, 4],
                     "include_stop_str_in_output": True, "min_tokens": 2, "n": 3}).request.params  # fmt: skip
    assert (
        params.temperature == 0.01 and params.top_k == -1 and params.sampling_seed is None
    )  # 0 < T < 0.01: 0.01
    assert params.stop == ("x",) and params.stop_token_ids == (9, 4) and params.no_stop_trim and params.n == 3
    greedy = _parse({"temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 7}).request.params
    assert (greedy.temperature, greedy.top_p, greedy.top_k, greedy.sampling_seed) == (0.0, 1.0, -1, 7)
    parsed = _parse(
        {"logprobs": 2, "prompt_logprobs": 5, "detokenize": False, "unknown": [1]}, return_token_ids=True
    )
    request = parsed.request
    assert (request.return_logprob, request.logprob_start_len, request.top_logprobs_num) == (True, 0, 5)
    assert request.logprob_ranks and (parsed.logprobs, parsed.prompt_logprobs) == (2, 5)
    assert parsed.return_token_ids and not parsed.detokenize
    none = _parse({})
    assert (none.request.return_logprob, none.logprobs, none.prompt_logprobs) == (False, None, None)
    # accepted without an effect here, as vLLM ignores them without the feature
    _parse({"watermarking": True, "output_kind": 2, "extra_args": {"a": 1}, "presence_penalty": 0, "bad_words": []},
           cache_salt="s", priority=3, kv_transfer_params={"x": 1}, stream=False, parse_context={})  # fmt: skip


@pytest.mark.parametrize(
    ("sampling", "body", "param"),
    [
        ({"logprobs": -1}, {}, "logprobs"),  # the vocabulary (100) > --max-logprobs 20
        ({"top_k": -2}, {}, None),
        ({"top_p": 0}, {}, "top_p"),
        ({"max_tokens": 0}, {}, "max_tokens"),
        ({"stop": [""]}, {}, None),
        ({"stop": "x", "detokenize": False}, {}, None),
        ({"n": 17}, {}, None),
        ({"stop_token_ids": [100]}, {}, "stop_token_ids"),
        ({"routed_experts_prompt_start": 4}, {}, "routed_experts_prompt_start"),
        ({"repetition_penalty": 1.1}, {}, "repetition_penalty"),
        ({"structured_outputs": {"json": {}}}, {}, "structured_outputs"),
        ({}, {"content_parts": [{"type": "image_url"}]}, "content_parts"),
        ({}, {"token_ids": [2] * 64}, "token_ids"),  # no room left in the context
    ],
)
def test_refusals_carry_vllms_parameter(sampling, body, param):
    with pytest.raises(vllm_api.ScaleOutError) as error:
        _parse(sampling, **body)
    assert error.value.status == 400 and error.value.body["error"]["param"] == param


def test_schema_errors_are_fastapis_400_with_the_fields_location():
    with pytest.raises(vllm_api.ScaleOutError) as error:
        vllm_api.parse_generate({"token_ids": [1, "x"], "sampling_params": {"stop": 3}}, _engine())
    body = error.value.body["error"]
    assert (body["type"], body["param"], body["code"]) == ("Bad Request", "body.token_ids.1", 400)
    assert (
        body["message"].startswith("3 validation errors:")
        and "'loc': 'body.sampling_params.stop'" in body["message"]
    )
    with pytest.raises(vllm_api.ScaleOutError) as error:
        vllm_api.parse_generate({"token_ids": [1], "sampling_params": {}, "model": "x"}, _engine(),
                                known_model=lambda name: name == "y")  # fmt: skip
    assert (error.value.status, error.value.body["error"]["type"]) == (404, "NotFoundError")
    assert vllm_api.parse_generate({"token_ids": [1], "sampling_params": {}, "model": "y"}, _engine(),
                                   known_model=lambda name: name == "y").model == "y"  # fmt: skip
    assert vllm_api.disabled_json()["error"] == {
        "message": "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them.",
        "type": "PermissionDeniedError", "param": None, "code": 403}  # fmt: skip


def test_the_reply_is_generate_tokens_response():
    engine = _engine()
    parsed = _parse({"logprobs": 1, "prompt_logprobs": 1, "n": 2, "stop_token_ids": [1]}, request_id="q")
    nan, inf = float("nan"), float("-inf")
    samples = [
        SampleOutput(output_ids=[9, 1], text="", finish=FinishReason("stop", matched=1), output_logprobs=[-0.5, inf],
                     output_top_logprobs=[[(-0.5, 9), (-1.0, 8)], [(-0.1, 2), (-0.2, 3)]], output_ranks=[1, 0],
                     input_logprobs=[None, -2.0, -3.0], input_top_logprobs=[None, [(-1.0, 4)], [(-3.0, 7)]],
                     input_ranks=[None, 2, 1], weight_version="v7"),
        SampleOutput(output_ids=[], text="", finish=FinishReason("abort"), output_logprobs=[], weight_version="v7",
                     input_logprobs=[None, -2.0, nan], input_top_logprobs=[None, [(-1.0, 4)], [(-3.0, 7)]],
                     input_ranks=[None, 2, 0]),
    ]  # fmt: skip
    reply = vllm_api.generate_json(parsed, samples, engine, request_id="q", model="tiny", created=5)
    assert (reply["request_id"], reply["model"], reply["created"]) == ("generate-tokens-q", "tiny", 5)
    assert reply["usage"]["prompt_tokens"] == 3 and reply["usage"]["completion_tokens"] == 2
    assert reply["prompt_token_ids"] is None  # return_token_ids not set
    first, second = reply["choices"]
    # stop token 1 is the tokenizer's EOS: vLLM checks EOS first, so no stop_reason
    assert (first["finish_reason"], first["stop_reason"]) == ("stop", None)
    assert first["weight_versions"] == [{"version": "v7", "start": 0, "end": 2}]
    assert first["logprobs"]["content"] == [
        {"token_id": 9, "logprob": -0.5, "rank": 1, "top_logprobs": [{"token_id": 9, "logprob": -0.5, "rank": 1}]},
        {"token_id": 1, "logprob": -9999.0, "rank": None,
         "top_logprobs": [{"token_id": 1, "logprob": -9999.0, "rank": None}, {"token_id": 2, "logprob": -0.1, "rank": 1}]},
    ]  # fmt: skip
    assert (second["finish_reason"], second["stop_reason"], second["token_ids"]) == ("abort", None, [])
    assert second["weight_versions"] == [] and second["logprobs"] == {"content": []}
    assert reply["prompt_logprobs"] == [
        None,
        {"5": {"logprob": -2.0, "rank": 2, "decoded_token": " b"}, "4": {"logprob": -1.0, "rank": 1, "decoded_token": ""}},
        {"7": {"logprob": -3.0, "rank": 1, "decoded_token": "?"}},
    ]  # fmt: skip
    eos_ignored = _parse({"stop_token_ids": [1], "ignore_eos": True})
    assert vllm_api.stop_reason(samples[0], eos_ignored, engine) == 1  # a stop token, not the EOS, then
    by_string = SampleOutput(output_ids=[2], text="", finish=FinishReason("stop", matched="a"))
    assert vllm_api.stop_reason(by_string, parsed, engine) == "a"


def test_decoded_tokens_complete_byte_fallback_pieces_from_the_preceding_tokens():
    tokenizer = _Tokenizer()
    assert vllm_api.decoded_tokens(tokenizer, [2, 5], context=[]) == ["a", " b"]
    assert vllm_api.decoded_tokens(tokenizer, [4], context=[2, 3]) == [
        "é"
    ]  # half of "é" after its first half
    assert vllm_api.decoded_tokens(tokenizer, [3], context=[2]) == [""]  # still incomplete: empty


def test_serve_refuses_the_flag_without_the_vllm_protocol():
    from atropos_megatron.inference.http_server import serve

    assert serve(argparse.Namespace(protocol="sglang", enable_scale_out=True)) == 2


def test_routed_experts_are_vllms_base64_npy_from_the_prompt_start():
    import base64
    import io

    import numpy as np
    import torch

    engine = _engine()
    engine.model = types.SimpleNamespace(config=types.SimpleNamespace(num_experts=8))
    parsed = _parse({"routed_experts_prompt_start": 1})
    routing = torch.arange(16, dtype=torch.int32).reshape(4, 2, 2) % 8  # prompt 3 + output 2 - 1 rows
    sample = SampleOutput(output_ids=[1, 2], text="", finish=FinishReason("length"), routed_experts=routing)
    array = np.load(io.BytesIO(base64.b64decode(vllm_api._routed_experts(sample, parsed, engine))))
    assert array.dtype == np.uint8 and array.tolist() == routing[1:].tolist()  # uint8: <= 256 experts
    assert (
        vllm_api._routed_experts(SampleOutput(output_ids=[], text="", finish=sample.finish), parsed, engine)
        is None
    )
