"""SGLang's native ``POST /generate``: parse ``GenerateReqInput`` JSON, build the response dicts.

Shapes follow SGLang 0.5.x (notes: sglang-protocol.md section 1.8): one dict per sample, a list when
the request is batched or ``n > 1``. Logprob entries are ``[logprob, token_id, text_or_null]``.
``return_routed_experts`` adds ``meta_info.routed_experts`` on a server started with
``--enable-return-routed-experts`` (``routed_experts.py``), and nothing without the flag. No
model here: :func:`parse_generate` turns JSON into :class:`GenerateRequest` objects and
:func:`sample_json` turns one finished sample back into JSON.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from atropos_megatron.inference.generation import GenerateRequest, SampleOutput
from atropos_megatron.inference.routed_experts import encode_routed_experts
from atropos_megatron.inference.sampling import SamplingParams, SamplingParamsError, parse_sampling_params


class RequestError(ValueError):
    """A request SGLang would answer with HTTP 400; the message says which field is wrong."""


# GenerateReqInput fields the reference server does not implement: accepted only at these values.
_IGNORED_AT_DEFAULT: dict[str, Any] = {
    "rid": ...,  # any value: ids are generated per sample
    "stream": False,
    "return_hidden_states": False,
    "lora_id": ...,  # internal: SGLang overwrites it with the adapter's id
    "image_data": None,
    "audio_data": None,
    "video_data": None,
    "input_embeds": None,
    "session_params": None,
    "custom_logit_processor": None,
    "token_ids_logprob": None,
    "log_metrics": ...,
    "data_parallel_rank": None,
    "priority": None,
    "bootstrap_host": None,
    "bootstrap_port": None,
    "bootstrap_room": None,
    "extra_key": None,
    "no_logs": ...,
}
_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len"}
_FIELDS |= {"top_logprobs_num", "return_text_in_logprobs", "lora_path"}
_FIELDS |= {"return_routed_experts", "routed_experts_start_len"}


@dataclass(frozen=True)
class ParsedGenerate:
    requests: list[GenerateRequest]
    batched: bool  # the input was a list of prompts: always answer with a list
    lora_path: Any = None  # adapter name(s) as sent: resolved by the LoRA service (lora_api)


def parse_generate(body: Any, engine) -> ParsedGenerate:
    """Validate a ``/generate`` body against the engine's tokenizer, vocabulary and context length."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, value in body.items():
        if key in _IGNORED_AT_DEFAULT:
            default = _IGNORED_AT_DEFAULT[key]
            if default is not ... and value is not None and value != default:
                message = "streaming" if key == "stream" else key
                raise RequestError(f"{message} is not supported by the reference server")
        elif key not in _FIELDS:
            raise RequestError(f"unknown field {key!r}")
    prompts, batched = _prompts(body, engine)
    raw_params = body.get("sampling_params")
    if isinstance(raw_params, list):
        if len(raw_params) != len(prompts):
            raise RequestError("sampling_params as a list needs one entry per prompt")
    else:
        raw_params = [raw_params] * len(prompts)
    options = {**_logprob_options(body), **routed_experts_options(body)}
    requests = []
    for ids, raw in zip(prompts, raw_params, strict=True):
        try:
            params = parse_sampling_params(raw)
        except SamplingParamsError as exc:
            raise RequestError(str(exc)) from exc
        requests.append(build_request(ids, params, engine, **options))
    return ParsedGenerate(requests, batched or len(requests) > 1, body.get("lora_path"))


def build_request(ids: list[int], params: SamplingParams, engine, **options: Any) -> GenerateRequest:
    """Check token ids against the vocabulary and context length (shared with the /v1 routes)."""
    if not ids:
        raise RequestError("the prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < engine.vocab_size]
    if bad:
        raise RequestError(f"token ids out of the vocabulary [0, {engine.vocab_size}): {bad[:5]}")
    if len(ids) >= engine.context_length:
        raise RequestError(f"the prompt has {len(ids)} tokens; the context length is {engine.context_length}")
    start = options.get("routed_experts_start_len", 0)
    if options.get("return_routed_experts") and start > len(ids):  # SGLang's scheduler, word for word
        raise RequestError(
            f"recv_req.routed_experts_start_len={start} is higher than the number of input tokens "
            f"len(req.origin_input_ids)={len(ids)}. Please use a smaller routed_experts_start_len."
        )
    return GenerateRequest(input_ids=list(ids), params=params, **options)


def _prompts(body: dict, engine) -> tuple[list[list[int]], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("give exactly one of 'text' and 'input_ids'")
    if input_ids is not None:
        if isinstance(input_ids, list) and input_ids and all(isinstance(x, list) for x in input_ids):
            return input_ids, True
        if not isinstance(input_ids, list):
            raise RequestError("input_ids must be a list of token ids (or a list of such lists)")
        return [input_ids], False
    if isinstance(text, str):
        return [engine.tokenizer.encode(text)], False
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [engine.tokenizer.encode(t) for t in text], True
    raise RequestError("text must be a string or a list of strings")


def _logprob_options(body: dict) -> dict[str, Any]:
    options = {
        "return_logprob": body.get("return_logprob", False),
        "logprob_start_len": body.get("logprob_start_len", -1),
        "top_logprobs_num": body.get("top_logprobs_num", 0),
        "return_text_in_logprobs": body.get("return_text_in_logprobs", False),
    }
    for key in ("return_logprob", "return_text_in_logprobs"):
        if not isinstance(options[key], bool):
            raise RequestError(f"{key} must be a boolean")
    for key in ("logprob_start_len", "top_logprobs_num"):
        value = options[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (-1 if key == "logprob_start_len" else 0)
        ):
            raise RequestError(f"{key} must be an integer >= {-1 if key == 'logprob_start_len' else 0}")
    return options


def routed_experts_options(body: dict) -> dict[str, Any]:
    """``return_routed_experts`` and ``routed_experts_start_len`` (also on the /v1 routes).

    SGLang checks the start only for requests that ask (its scheduler aborts them with HTTP 400); a
    server without ``--enable-return-routed-experts`` answers them without the field.
    """
    options = {
        "return_routed_experts": body.get("return_routed_experts", False),
        "routed_experts_start_len": body.get("routed_experts_start_len", 0),
    }
    if not isinstance(options["return_routed_experts"], bool):
        raise RequestError("return_routed_experts must be a boolean")
    start = options["routed_experts_start_len"]
    if isinstance(start, bool) or not isinstance(start, int):
        raise RequestError("routed_experts_start_len must be an integer")
    if options["return_routed_experts"] and start < 0:
        raise RequestError(
            f"recv_req.routed_experts_start_len={start} is lower than 0. "
            "Please use a non-negative routed_experts_start_len."
        )
    return options


def routed_experts_json(sample: SampleOutput, request: GenerateRequest) -> str | None:
    """``meta_info["routed_experts"]`` of a sample: rows ``[start, prompt + output - 1)``, or None."""
    if not request.return_routed_experts or sample.routed_experts is None:
        return None
    start = min(request.routed_experts_start_len, sample.routed_experts.shape[0])
    return encode_routed_experts(sample.routed_experts[start:])


def sample_json(
    sample: SampleOutput, request: GenerateRequest, engine, *, e2e_latency_s: float
) -> dict[str, Any]:
    """One sample as SGLang returns it: ``{"text", "output_ids", "meta_info"}``."""
    meta: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "finish_reason": sample.finish.to_json(),
        "prompt_tokens": len(request.input_ids),
        "weight_version": sample.weight_version,
        "completion_tokens": len(sample.output_ids),
        "cached_tokens": 0,
    }
    if request.return_logprob:
        text = _token_text(engine, request.return_text_in_logprobs)
        start = min(request.logprob_start_len, len(request.input_ids) - 1)
        prompt_tail = request.input_ids[start:] if request.logprob_start_len >= 0 else []
        meta["input_token_logprobs"] = [
            [lp, tok, text(tok)] for lp, tok in zip(sample.input_logprobs, prompt_tail, strict=True)
        ]
        meta["output_token_logprobs"] = [
            [lp, tok, text(tok)] for lp, tok in zip(sample.output_logprobs, sample.output_ids, strict=True)
        ]
        if request.top_logprobs_num > 0:
            meta["input_top_logprobs"] = [
                None if top is None else [[lp, tok, text(tok)] for lp, tok in top]
                for top in sample.input_top_logprobs
            ]
            meta["output_top_logprobs"] = [
                [[lp, tok, text(tok)] for lp, tok in top] for top in sample.output_top_logprobs
            ]
    routed = routed_experts_json(sample, request)
    if routed is not None:
        meta["routed_experts"] = routed
    meta["e2e_latency"] = e2e_latency_s
    return {"text": sample.text, "output_ids": sample.output_ids, "meta_info": meta}


def _token_text(engine, enabled: bool):
    if not enabled:
        return lambda _token: None
    return lambda token: engine.decode([token], skip_special_tokens=False)
