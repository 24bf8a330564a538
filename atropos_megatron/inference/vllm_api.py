"""vLLM-protocol request parsing and response shapes (``serve --protocol vllm``), pure of HTTP.

Two surfaces, as ``docs/vllm.md`` decides:

- ``POST /generate`` in the shape atroposlib 0.4.0's ``VLLMServer`` posts and reads (the shape of
  Atropos's ``example_trainer/vllm_api_server.py``): ``{"prompt": {"prompt_token_ids": [...]} | str,
  "logprobs": k, <vLLM SamplingParams fields>}`` -> ``{"text", "prompt", "finish_reasons"}`` plus,
  when ``logprobs`` is set, ``"logprobs"`` (per completion, per token ``[{token_id: logprob, ...}]``),
  ``"prompt_token_ids"`` and ``"token_ids"``;
- error bodies in vLLM's ``ErrorResponse`` shape ``{"error": {"message", "type", "param", "code"}}``.

Log-probs follow vLLM's default ``logprobs_mode="raw_logprobs"`` (log_softmax of the unscaled logits,
whatever the temperature): the server runs its engine with ``return_original_logprob=True``.
"""

from __future__ import annotations

from typing import Any

from atropos_megatron.inference.generation import GenerateRequest, SampleOutput
from atropos_megatron.inference.native_api import RequestError, build_request
from atropos_megatron.inference.sampling import SamplingParams, SamplingParamsError

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
VLLM_DEFAULT_MAX_TOKENS = 16  # vLLM SamplingParams.max_tokens default

# vLLM SamplingParams field -> (our field, converter). Fields not listed are refused by name.
_MAPPED = {
    "n": "n",
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_new_tokens",
    "seed": "sampling_seed",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "include_stop_str_in_output": "no_stop_trim",
}
# Accepted only at vLLM's neutral value (the reference server does not implement them).
_NEUTRAL = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "prompt_logprobs": None,
    "stream": False,
    "detokenize": True,
    "bad_words": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "structured_outputs": None,
}


def error_json(message: str, code: int = 400, err_type: str | None = None) -> dict[str, Any]:
    """vLLM's ``ErrorResponse`` body (``entrypoints/serve/engine/protocol.py``)."""
    default = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
    return {"error": {"message": message, "type": err_type or default.get(code, "Error"), "param": None,
                      "code": code}}  # fmt: skip


def parse_generate(body: Any, engine) -> tuple[GenerateRequest, int | None]:
    """A ``/generate`` body -> the request and its ``logprobs`` count (None: no log-probs asked)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, dict):
        if set(prompt) - {"prompt_token_ids"}:
            raise RequestError(f"unsupported prompt field(s) {sorted(set(prompt) - {'prompt_token_ids'})}")
        ids = prompt.get("prompt_token_ids")
        if not isinstance(ids, list):
            raise RequestError("prompt.prompt_token_ids must be a list of token ids")
    elif isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    else:
        raise RequestError("prompt is required: a string or {'prompt_token_ids': [...]}")
    values: dict[str, Any] = {"max_new_tokens": VLLM_DEFAULT_MAX_TOKENS}
    logprobs = body.get("logprobs")
    for key, value in body.items():
        if key in ("prompt", "logprobs"):
            continue
        if key in _NEUTRAL:
            if value is not None and value != _NEUTRAL[key]:
                raise RequestError(f"{key} is not supported by the reference server")
        elif key in _MAPPED:
            if value is not None:
                values[_MAPPED[key]] = _convert(key, value)
        else:
            raise RequestError(f"unknown sampling parameter {key!r}")
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS
    ):
        raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {logprobs!r}")
    try:
        params = SamplingParams(**values)
    except (SamplingParamsError, TypeError, ValueError) as exc:
        raise RequestError(str(exc)) from exc
    request = build_request(
        ids, params, engine, return_logprob=logprobs is not None, top_logprobs_num=logprobs or 0
    )
    return request, logprobs


def _convert(key: str, value: Any) -> Any:
    if key == "stop":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise RequestError("stop must be a string or a list of strings")
        return tuple(value)
    if key == "stop_token_ids":
        if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
            raise RequestError("stop_token_ids must be a list of integers")
        return tuple(value)
    if key == "top_k":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError("top_k must be an integer")
        return -1 if value == 0 else value  # vLLM: 0 or -1 both mean the whole vocabulary
    if key in ("temperature", "top_p", "min_p"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(f"{key} must be a number")
        return float(value)
    if key in ("n", "max_tokens", "min_tokens", "seed"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{key} must be an integer")
        return value
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be a boolean")
    return value


def generate_json(
    request: GenerateRequest, samples: list[SampleOutput], logprobs: int | None, engine
) -> dict:
    """The response of Atropos's ``vllm_api_server.py`` ``/generate`` (non-streaming)."""
    out: dict[str, Any] = {
        "text": [s.text for s in samples],
        "prompt": engine.decode(request.input_ids, skip_special_tokens=False),
        "finish_reasons": [finish_reason(s) for s in samples],
    }
    if logprobs is not None:
        out["logprobs"] = [[[_position(token, lp, top)] for token, lp, top in _positions(s)] for s in samples]
        out["prompt_token_ids"] = list(request.input_ids)
        out["token_ids"] = [list(s.output_ids) for s in samples]
    return out


def finish_reason(sample: SampleOutput) -> str:
    """vLLM's ``CompletionOutput.finish_reason``: "stop" (EOS, stop id or string), "length" or "abort"."""
    return sample.finish.type


def _positions(sample: SampleOutput):
    tops = sample.output_top_logprobs or [[] for _ in sample.output_ids]
    return zip(sample.output_ids, sample.output_logprobs, tops, strict=True)


def _position(token: int, logprob: float, top: list[tuple[float, int]]) -> dict[int, float]:
    """vLLM's per-position ``{token_id: logprob}``: the sampled token first, then the top-k not yet in."""
    entry = {int(token): float(logprob)}
    for lp, tid in top:
        entry.setdefault(int(tid), float(lp))
    return entry
