"""SGLang's OpenAI routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Requests become :class:`GenerateRequest` objects (SGLang maps them onto ``/generate`` the same way)
and finished samples become the JSON SGLang 0.5.x returns (notes: sglang-protocol.md sections
4.1-4.2): legacy completion logprobs with ``text_offset`` -1, chat ``logprobs.content`` entries with
UTF-8 ``bytes``, ``matched_stop``, ``usage`` and ``metadata.weight_version``; a bad request gets SGLang's
``ErrorResponse``; ``return_routed_experts`` gives the first sample's routing in the response-level
``sglext`` (SGLang's layout). Unknown fields are ignored, as SGLang's pydantic models do; streaming is
refused (not implemented here). LoRA selection (``model="<served>:<adapter>"``) lives in ``lora_api``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from atropos_megatron.inference.generation import GenerateRequest, SampleOutput
from atropos_megatron.inference.native_api import (
    RequestError,
    build_request,
    routed_experts_json,
    routed_experts_options,
)
from atropos_megatron.inference.sampling import SamplingParamsError, parse_sampling_params

# OpenAI request field -> SGLang sampling param.
_SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "n": "n",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "min_tokens": "min_new_tokens",
    "seed": "sampling_seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "logit_bias": "logit_bias",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf",
}


def _sampling(body: dict, max_tokens: Any) -> dict[str, Any]:
    raw = {sg: body[oa] for oa, sg in _SAMPLING_FIELDS.items() if body.get(oa) is not None}
    raw["max_new_tokens"] = max_tokens
    if body.get("stream"):
        raise RequestError("streaming is not supported by the reference server")
    return raw


def parse_completion(body: Any, engine) -> list[GenerateRequest]:
    """``/v1/completions``: one request per prompt (a string, a token list, or a list of either)."""
    if not isinstance(body, dict) or "prompt" not in body:
        raise RequestError("a completion request needs 'prompt'")
    logprobs = body.get("logprobs")
    if logprobs is not None and body.get("echo"):
        raise RequestError(
            "Echo is not compatible with logprobs. To compute logprobs of input prompt, use /generate"
        )
    if body.get("echo"):
        raise RequestError("echo is not supported by the reference server")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise RequestError("logprobs must be a non-negative integer")
    raw = _sampling(body, body.get("max_tokens", 16))
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [engine.tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [engine.tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list):
        prompts = [prompt]
    else:
        raise RequestError("prompt must be a string, a list of strings or token ids")
    params = _params(raw)
    routed = routed_experts_options(body)
    return [
        build_request(
            ids, params, engine, return_logprob=logprobs is not None, top_logprobs_num=logprobs or 0, **routed
        )
        for ids in prompts
    ]


def parse_chat(body: Any, engine) -> GenerateRequest:
    """``/v1/chat/completions``: the tokenizer's chat template with a generation prompt."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise RequestError("a chat completion request needs a non-empty 'messages' list")
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
        raise RequestError("top_logprobs must be a non-negative integer")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = _params(_sampling(body, max_tokens))
    try:
        text = engine.tokenizer.apply_chat_template(
            body["messages"],
            add_generation_prompt=True,
            tokenize=False,
            **(body.get("chat_template_kwargs") or {}),
        )
    except Exception as exc:  # no template, bad roles, template errors
        raise RequestError(f"cannot apply the chat template: {exc}") from exc
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    want = bool(body.get("logprobs"))
    top_logprobs_num = (top or 0) if want else 0
    routed = routed_experts_options(body)
    return build_request(
        ids, params, engine, return_logprob=want, top_logprobs_num=top_logprobs_num, **routed
    )


def _params(raw: dict[str, Any]):
    try:
        return parse_sampling_params(raw)
    except SamplingParamsError as exc:
        raise RequestError(str(exc)) from exc


def _usage(requests: list[GenerateRequest], samples: list[list[SampleOutput]]) -> dict[str, Any]:
    prompt = sum(len(r.input_ids) for r in requests)
    completion = sum(len(s.output_ids) for group in samples for s in group)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
    }


def _envelope(kind: str, model: str, choices: list, requests, samples) -> dict[str, Any]:
    versions = [s.weight_version for group in samples for s in group]
    envelope = {
        "id": uuid.uuid4().hex,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(requests, samples),
        "metadata": {"weight_version": versions[0] if versions else None},
    }
    # SGLang's response-level ``sglext`` holds the first sample's routing only (serving_completions.py,
    # serving_chat.py: "from first ret_item"); the other samples' are not returned on these routes.
    routed = routed_experts_json(samples[0][0], requests[0]) if samples and samples[0] else None
    if routed:
        envelope["sglext"] = {"routed_experts": routed}
    return envelope


def completion_json(model: str, requests, samples, engine) -> dict[str, Any]:
    """The ``text_completion`` object; choice ``i * n + j`` is sample ``j`` of prompt ``i``."""
    choices = []
    for request, group in zip(requests, samples, strict=True):
        for sample in group:
            logprobs = None
            if request.return_logprob:
                tokens = [engine.decode([t], skip_special_tokens=False) for t in sample.output_ids]
                top = [
                    {engine.decode([t], skip_special_tokens=False): lp for lp, t in entry}
                    for entry in sample.output_top_logprobs
                ]
                logprobs = {
                    "text_offset": [-1] * len(tokens),
                    "token_logprobs": sample.output_logprobs,
                    "tokens": tokens,
                    "top_logprobs": top,
                }
            choices.append(
                {
                    "index": len(choices),
                    "text": sample.text,
                    "logprobs": logprobs,
                    "finish_reason": sample.finish.type,
                    "matched_stop": sample.finish.matched,
                }
            )
    return _envelope("text_completion", model, choices, requests, samples)


def chat_json(model: str, request: GenerateRequest, samples: list[SampleOutput], engine) -> dict[str, Any]:
    """The ``chat.completion`` object: one choice per sample."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = engine.decode([token], skip_special_tokens=False)
        return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": logprob}

    choices = []
    for index, sample in enumerate(samples):
        logprobs = None
        if request.return_logprob:
            tops = sample.output_top_logprobs or [[] for _ in sample.output_ids]
            logprobs = {
                "content": [
                    {**entry(t, lp), "top_logprobs": [entry(tt, tlp) for tlp, tt in top]}
                    for t, lp, top in zip(sample.output_ids, sample.output_logprobs, tops, strict=True)
                ]
            }
        choices.append(
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": sample.text,
                    "reasoning_content": None,
                    "tool_calls": None,
                },
                "logprobs": logprobs,
                "finish_reason": sample.finish.type,
                "matched_stop": sample.finish.matched,
            }
        )
    return _envelope("chat.completion", model, choices, [request], [samples])


def error_json(message: str, code: int = 400) -> dict[str, Any]:
    """SGLang's OpenAI ``ErrorResponse`` (``serving_base.create_error_response``) for a bad request."""
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": code}


def models_json(engine) -> dict[str, Any]:
    name = engine.options.served_model_name
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "sglang",
                "root": name,
                "parent": None,
                "max_model_len": engine.context_length,
            }
        ],
    }
