"""vLLM 0.33.0's token-in, token-out route on ``serve --protocol vllm``: parsing and replies, pure of HTTP.

Stock ``vllm serve`` has no ``/generate``; its token route is the "scale-out" ``POST
/inference/v1/generate``, mounted only with ``--enable-scale-out`` (without it every scale-out path
answers 403 :data:`DISABLED_MESSAGE`), guarded by ``--api-key`` like ``/v1`` (docs/vllm.md §3, §9).
Verified against the 0.33.0 wheel: ``entrypoints/scale_out/token_in_token_out/{protocol,serving,
api_router}.py``, ``entrypoints/scale_out/factories.py``, ``entrypoints/common/cli_args.py``
(``enable_scale_out``), ``sampling_params.py``, ``v1/engine/{logprobs,output_processor}.py``,
``v1/sample/sampler.py`` (ranks), ``v1/core/sched/utils.py`` (stop reasons) and
``entrypoints/serve/exception_handling/`` (error bodies).

- Request: ``{"token_ids": [ids >= 0, at least one], "sampling_params": {SamplingParams field names},
  "model"?, "request_id"?, "return_token_ids"?, "output_mode"?: "tokens", "stream"?: false, ...}``;
  unknown keys are dropped silently, at both levels, as vLLM's pydantic models drop them. An omitted
  (or null) ``max_tokens`` is the rest of the context, not SamplingParams' 16 (no generation-config
  defaults: the reference server has none). ``logprobs``/``prompt_logprobs``: None none, 0 the
  token's own, k also the top k, -1 the vocabulary; at most ``--max-logprobs`` (20).
- Reply (``GenerateTokensResponse.model_dump()``, every key, nulls included): ``request_id``
  (``generate-tokens-<X-Request-Id or request_id>``), ``model``, ``created``, ``usage``,
  ``prompt_logprobs`` (``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``),
  ``prompt_token_ids`` (with ``return_token_ids``), ``output_mode`` and ``choices`` in index order:
  ``index``, ``finish_reason`` (stop, length, abort), ``stop_reason`` (the stop string or stop token
  id; null on EOS, length and abort), ``token_ids`` (every generated token, stop ones included),
  ``routed_experts`` (``--enable-return-routed-experts``: base64 ``.npy``), ``weight_versions`` and
  ``logprobs`` (``{"content": [{"token_id", "logprob", "rank", "top_logprobs": [...]}]}``, one entry
  per token, the token itself first in ``top_logprobs``).
- Log-probs are vLLM's default ``raw_logprobs`` (log_softmax of the unscaled logits, before the
  ``min_tokens`` mask): the server runs its engine with ``return_original_logprob=True``; with
  ``--logprobs-mode processed_logprobs`` they are after temperature and the mask (vLLM's
  renormalisation over top-k/top-p/min-p is not mirrored: refused by name). Prompt log-probs are raw
  in both modes. A rank is vLLM's: how many vocabulary entries have
  a log-prob >= the token's (``batched_count_greater_than``); top-k entries are ranked 1..k.
- Errors are vLLM's ``ErrorResponse`` ``{"error": {"message", "type", "param", "code"}}``: a body that
  fails the request schema is 400 "Bad Request" with ``param`` the field's location; a value
  SamplingParams rejects is 400 "BadRequestError" with vLLM's ``parameter``; an unknown ``model`` 404.
  Whatever this engine cannot honour (penalties, logit bias, structured outputs, ``output_mode``
  text/derender, ``stream``, multimodal input, ...) is refused with a 400 naming the field unless it
  is at vLLM's neutral value; fields without an effect here (cache salt, priority, KV transfer
  parameters, watermarking, ...) are accepted and ignored, as vLLM ignores them without the feature.
- Not mirrored: streaming, ``output_mode`` text/derender; with the flag, the other scale-out paths
  (``/inference/v1/abort_requests``, render/derender: 404 here); generation-config defaults for
  ``max_tokens``; ``n`` is capped by ``--max-batch`` where vLLM caps it by ``max_num_seqs``; with
  ``min_tokens`` > 0, stop strings are searched in the whole text here, in the text after the first
  ``min_tokens`` tokens in vLLM; error messages are ours (same status, type and ``param``), except the
  403's, which is vLLM's text.
"""

from __future__ import annotations

import base64
import enum
import functools
import io
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from atropos_megatron.inference.generation import GenerateRequest, SampleOutput
from atropos_megatron.inference.native_api import RequestError, build_request
from atropos_megatron.inference.sampling import SamplingParams

ROUTE = "/inference/v1/generate"
SCALE_OUT_PATHS = (
    "/inference/v1/generate",
    "/inference/v1/abort_requests",
    "/v1/chat/completions/render",
    "/v1/messages/render",
    "/v1/completions/render",
    "/v1/responses/render",
    "/v1/chat/completions/derender",
    "/v1/completions/derender",
)
"""Every POST path vLLM 0.33 registers as scale-out (``factories.register_scale_out_api_routers``): all
answer 403 without ``--enable-scale-out``. With it, this server implements the first only."""
DISABLED_MESSAGE = (
    "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them."
)
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
SAMPLING_DEFAULT_MAX_TOKENS = 16  # SamplingParams.max_tokens: what its own checks see when omitted
MIN_TEMPERATURE = 1e-2  # vLLM raises a positive temperature below this to it (numerical safety)
LOGPROB_FLOOR = -9999.0  # -inf and NaN log-probs on the wire (the OpenAI shapes' floor)

# SamplingParams fields this engine does not implement: accepted at vLLM's neutral value only.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "structured_outputs": (None,),
    "logprob_token_ids": (None,),
    "prompt_logprob_token_ids": (None,),
    "prompt_logprob_start": (None,),
    "thinking_token_budget": (None,),
    "repetition_detection": (None,),
    "trace_decode_token_ids": (None,),
}


class ScaleOutError(Exception):
    """A refused request: its HTTP status and vLLM's error body."""

    def __init__(self, message: str, *, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.body = status, error_json(message, status, err_type, param)


def error_json(message: str, code: int = 400, err_type: str | None = None, param: str | None = None) -> dict:
    """vLLM's ``ErrorResponse`` body (``entrypoints/serve/engine/protocol.py``)."""
    default = {
        400: "BadRequestError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        500: "InternalServerError",
    }
    return {"error": {"message": message, "type": err_type or default.get(code, "Error"), "param": param,
                      "code": code}}  # fmt: skip


def disabled_json() -> dict:
    """The 403 every scale-out path answers on a server without ``--enable-scale-out``."""
    return error_json(DISABLED_MESSAGE, 403, "PermissionDeniedError")


# ----- the request schema (our pydantic models of vLLM's GenerateRequest and SamplingParams fields)
class _OutputKind(enum.IntEnum):  # vLLM's RequestOutputKind; the route overrides it
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    watermarking: bool | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = SAMPLING_DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprob_token_ids: list[list[StrictInt]] | None = None
    prompt_logprob_start: int | None = None
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: _OutputKind = _OutputKind.CUMULATIVE
    stream_interval: int | None = None
    skip_clone: bool = False
    output_text_buffer_length: int = 0
    structured_outputs: dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    repetition_detection: dict[str, Any] | None = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: list[int] | None = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    token_ids: list[int] = Field(min_length=1)
    token_offsets: list[tuple[int, int]] | None = None
    features: dict[str, Any] | None = None
    content_parts: list[dict[str, Any]] | None = None
    sampling_params: _Sampling
    model: str | None = None
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: dict[str, Any] | None = None
    return_token_ids: bool | None = None
    output_mode: Literal["tokens", "text", "derender"] = "tokens"
    parse_context: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    priority: int = Field(default=0, ge=-(2**63), le=2**63 - 1)
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None

    @field_validator("token_ids")
    @classmethod
    def _non_negative(cls, ids: list[int]) -> list[int]:
        if any(t < 0 for t in ids):
            raise ValueError("token_ids must not contain negative values")
        return ids


@dataclass(frozen=True)
class ParsedGenerate:
    """A validated ``/inference/v1/generate`` request and what its reply needs."""

    request: GenerateRequest
    request_id: str  # the body's (or a random one); the reply prefixes it
    model: str | None  # as sent: None or "" is the served model
    logprobs: int | None  # per output token: None none, else the top-k count (-1 resolved)
    prompt_logprobs: int | None
    return_token_ids: bool
    detokenize: bool
    ignore_eos: bool
    routed_experts_start: int


def parse_generate(body: Any, engine, known_model: Callable[[str], bool] | None = None) -> ParsedGenerate:
    """A JSON body -> the engine request; raises :class:`ScaleOutError` with vLLM's status and body.

    Checks run in vLLM's order: the schema, SamplingParams' own checks, ``model`` (``known_model``;
    default: the served name; none or "" is always the served model), then the engine's (``n`` against
    the batch, log-prob counts, vocabulary, context); what the reference engine cannot honour after.
    """
    try:
        parsed = _Body.model_validate(body)
    except ValidationError as exc:
        raise _schema_error(exc.errors(include_url=False)) from None
    sp, provided = parsed.sampling_params, parsed.sampling_params.model_fields_set
    temperature, logprobs, prompt_logprobs = _check_sampling(sp)
    served = engine.options.served_model_name
    if parsed.model and parsed.model != served and not (known_model and known_model(parsed.model)):
        raise model_not_found(parsed.model, served)
    if sp.n > engine.options.max_batch:  # the reference engine's max_num_seqs: samples decoded together
        raise ScaleOutError(
            f"sampling_params.n is {sp.n}, above the {engine.options.max_batch} samples this server decodes "
            "together (--max-batch, its max_num_seqs)"
        )
    _refuse_unsupported(parsed, provided)
    logprobs = _logprob_count(logprobs, "logprobs", engine)
    prompt_logprobs = _logprob_count(prompt_logprobs, "prompt_logprobs", engine)
    ids = parsed.token_ids
    max_tokens = sp.max_tokens if "max_tokens" in provided else None
    if max_tokens is None:  # omitted or null: the rest of the context (serving.py, input_processor.py)
        max_tokens = max(engine.context_length - len(ids), 0)
        if sp.min_tokens > max_tokens:
            raise ScaleOutError(
                f"min_tokens ({sp.min_tokens}) exceeds max_tokens, which defaults to the {max_tokens} "
                "tokens left in the context", param="min_tokens"
            )  # fmt: skip
    bad_stops = [t for t in sp.stop_token_ids or () if not 0 <= t < engine.vocab_size]
    if bad_stops:
        raise ScaleOutError(
            f"stop_token_ids {bad_stops} are outside the vocabulary [0, {engine.vocab_size})",
            param="stop_token_ids",
        )
    if not 0 <= sp.routed_experts_prompt_start <= len(ids):
        raise ScaleOutError(
            f"routed_experts_prompt_start must be in [0, {len(ids)}] (the prompt length), got "
            f"{sp.routed_experts_prompt_start}", param="routed_experts_prompt_start"
        )  # fmt: skip
    stops = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or ())
    stop_ids = list(dict.fromkeys(sp.stop_token_ids or ()))
    greedy = temperature == 0.0
    processed = engine.options.vllm_logprobs_mode == "processed_logprobs"
    if processed and not greedy and logprobs is not None:
        truncating = [name for name, value, off in (("top_k", sp.top_k, (0, -1)), ("top_p", sp.top_p, (1.0,)),
                      ("min_p", sp.min_p, (0.0,))) if value not in off]  # fmt: skip
        if truncating:
            raise ScaleOutError(
                f"{truncating[0]} with --logprobs-mode processed_logprobs is not supported by the reference "
                "server: vLLM renormalises processed log-probs over the kept tokens, this server reports "
                "them after temperature only", param=truncating[0],
            )  # fmt: skip
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if greedy else sp.top_p,
        top_k=-1 if greedy or sp.top_k in (0, -1) else sp.top_k,
        min_p=0.0 if greedy else sp.min_p,
        stop=tuple(stops),
        stop_token_ids=tuple(stop_ids),
        n=sp.n,
        ignore_eos=sp.ignore_eos,
        min_new_tokens=sp.min_tokens,
        skip_special_tokens=sp.skip_special_tokens,
        spaces_between_special_tokens=sp.spaces_between_special_tokens,
        no_stop_trim=sp.include_stop_str_in_output,
        sampling_seed=None if sp.seed in (None, -1) else sp.seed,
    )
    wanted = logprobs is not None or prompt_logprobs is not None
    try:
        request = build_request(
            list(ids),
            params,
            engine,
            return_logprob=wanted,
            logprob_start_len=0 if prompt_logprobs is not None else -1,
            top_logprobs_num=max(logprobs or 0, prompt_logprobs or 0),
            logprob_ranks=wanted,
            # raw_logprobs come before vLLM's min_tokens logits processor, processed ones after it;
            # prompt log-probs are raw in both modes (v1/sample/sampler.py, docs/vllm.md §9)
            unmasked_logprobs=not processed,
            raw_input_logprobs=True,
            return_routed_experts=engine.routing is not None,
            routed_experts_start_len=sp.routed_experts_prompt_start,
        )
    except RequestError as exc:  # vLLM: the renderer's vocabulary check, the input processor's length
        raise ScaleOutError(str(exc), param="token_ids") from None
    return ParsedGenerate(
        request=request,
        request_id=parsed.request_id,
        model=parsed.model,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        return_token_ids=bool(parsed.return_token_ids),
        detokenize=sp.detokenize,
        ignore_eos=sp.ignore_eos,
        routed_experts_start=sp.routed_experts_prompt_start,
    )


def _check_sampling(sp: _Sampling) -> tuple[float, int | None, int | None]:
    """SamplingParams' own checks (its ``__post_init__``): (temperature, logprobs, prompt_logprobs)."""

    def fail(message: str, param: str | None) -> ScaleOutError:
        return ScaleOutError(message, param=param)

    temperature = MIN_TEMPERATURE if 0 < sp.temperature < MIN_TEMPERATURE else sp.temperature
    if sp.n < 1:
        raise fail(f"n must be at least 1, got {sp.n}", None)
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= getattr(sp, name) <= 2.0:
            raise fail(f"{name} must be in [-2, 2], got {getattr(sp, name)}", None)
    if not math.isfinite(sp.repetition_penalty) or sp.repetition_penalty <= 0.0:
        raise fail(f"repetition_penalty must be a finite number > 0, got {sp.repetition_penalty}", None)
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
        raise fail(f"temperature must be a finite number in [0, 2], got {temperature}", "temperature")
    if not 0.0 < sp.top_p <= 1.0:
        raise fail(f"top_p must be in (0, 1], got {sp.top_p}", "top_p")
    if sp.top_k < -1:
        raise fail(f"top_k must be 0 (or -1: the whole vocabulary) or at least 1, got {sp.top_k}", None)
    if not 0.0 <= sp.min_p <= 1.0:
        raise fail(f"min_p must be in [0, 1], got {sp.min_p}", None)
    if sp.max_tokens is not None and sp.max_tokens < 1:
        raise fail(f"max_tokens must be at least 1, got {sp.max_tokens}", "max_tokens")
    if sp.min_tokens < 0:
        raise fail(f"min_tokens must be >= 0, got {sp.min_tokens}", None)
    if sp.max_tokens is not None and sp.min_tokens > sp.max_tokens:  # 16 when omitted, as in vLLM
        raise fail(f"min_tokens ({sp.min_tokens}) must be <= max_tokens ({sp.max_tokens})", None)
    if sp.stream_interval is not None and sp.stream_interval < 1:
        raise fail(f"stream_interval must be at least 1, got {sp.stream_interval}", "stream_interval")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(sp, name)
        if value is not None and value < -1:
            raise fail(f"{name} must be >= 0, or -1 for the whole vocabulary, got {value}", name)
    stops = [sp.stop] if isinstance(sp.stop, str) else sp.stop or []
    if any(not s for s in stops):
        raise fail("stop must not contain an empty string", None)
    if stops and not sp.detokenize:
        raise fail("stop strings need detokenize=true", None)
    if any(not w for w in sp.bad_words or ()):
        raise fail("bad_words must not contain an empty string", None)
    if temperature == 0.0 and sp.n > 1:
        raise fail(f"greedy sampling (temperature 0) takes n=1, got n={sp.n}", None)
    return temperature, sp.logprobs, sp.prompt_logprobs


def _refuse_unsupported(parsed: _Body, provided: set[str]) -> None:
    if parsed.output_mode != "tokens":
        raise ScaleOutError(
            f"output_mode {parsed.output_mode!r} is not supported by the reference server (only 'tokens')",
            param="output_mode",
        )
    if parsed.stream:
        raise ScaleOutError("stream=true is not supported by the reference server", param="stream")
    for name in ("features", "content_parts"):
        if getattr(parsed, name) is not None:
            raise ScaleOutError(
                f"{name} (multimodal input) is not supported by the reference server", param=name
            )
    for name, neutral in _UNSUPPORTED.items():
        if name in provided and getattr(parsed.sampling_params, name) not in neutral:
            raise ScaleOutError(
                f"sampling_params.{name} is not supported by the reference server (only {neutral[0]!r})",
                param=name,
            )


def _logprob_count(value: int | None, name: str, engine) -> int | None:
    if value is None:
        return None
    count = engine.vocab_size if value == -1 else value
    if count > MAX_LOGPROBS:
        raise ScaleOutError(f"{name} asks for {count} log-probs; the most is {MAX_LOGPROBS} (--max-logprobs)",
                            param=name)  # fmt: skip
    return count


_PYDANTIC_KINDS = frozenset(
    ("function-wrap", "function-after", "function-before", "function-plain", "json-or-python",
     "lax-or-strict", "chain", "default", "nullable", "tagged-union", "union", "call", "arguments",
     "is-instance", "is-subclass", "callable", "str", "int", "float", "bool", "bytes", "bytearray", "list",
     "tuple", "dict", "set", "frozenset", "complex", "none", "nonetype")
)  # fmt: skip
"""pydantic's schema kinds, which appear in an error location for a union branch: not field names."""


def _clean_loc(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    kept = [p for p in parts if not any(c in p for c in "[]{}()") and p.lower() not in _PYDANTIC_KINDS]
    return ".".join(kept or parts)


def _summary(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, list | tuple | dict | set):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


def _schema_error(errors: list[dict[str, Any]]) -> ScaleOutError:
    """FastAPI's validation errors as vLLM's handler words them: each error with its cleaned location
    (``body.<field>``) and a size-bounded input, ``param`` the first error's location."""
    located = [{**e, "loc": ("body", *e["loc"])} for e in errors]
    lines = [str({**e, "loc": _clean_loc(e["loc"]), "input": _summary(e.get("input"))}) for e in located[:10]]
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {line}\n" for line in lines)
    if len(errors) > 10:
        message += f"  ...and {len(errors) - 10} more {label}\n"
    first = located[0]["loc"] if located else ("body",)
    # vLLM's sampling_params is a union (a SamplingParams instance or an object of its fields): its
    # first error is the instance branch's, located at the field itself.
    param = "body.sampling_params" if tuple(first[:2]) == ("body", "sampling_params") else _clean_loc(first)
    return ScaleOutError(message.rstrip(), err_type="Bad Request", param=param)


def validated(model: type[BaseModel], body: Any) -> Any:
    """``body`` as ``model``; a body that fails its schema raises vLLM's 400 (as :func:`parse_generate`)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _schema_error(exc.errors(include_url=False)) from None


def content_type_error() -> ScaleOutError:
    """vLLM's ``validate_json_request``: a body that is not ``application/json`` is a 400."""
    return ScaleOutError("1 validation error:\n  the request body must be sent as Content-Type: application/json",
                         err_type="Bad Request")  # fmt: skip


def json_error(exc: Exception) -> ScaleOutError:
    return _schema_error([{"type": "json_invalid", "loc": (), "msg": "JSON decode error", "input": {},
                           "ctx": {"error": str(exc)}}])  # fmt: skip


def model_not_found(model: str, served: str) -> ScaleOutError:
    return ScaleOutError(f"The model `{model}` does not exist (this server serves `{served}`).", status=404,
                         err_type="NotFoundError", param="model")  # fmt: skip


# ----- the reply
def generate_json(
    parsed: ParsedGenerate, samples: list[SampleOutput], engine, *, request_id: str, model: str, created: int
) -> dict[str, Any]:
    """``GenerateTokensResponse.model_dump()`` for the finished ``samples`` (in index order)."""
    prompt = parsed.request.input_ids
    choices = [_choice(i, s, parsed, engine) for i, s in enumerate(samples)]
    completion = sum(len(s.output_ids) for s in samples)
    return {
        "request_id": f"generate-tokens-{request_id}",
        "model": model,
        "created": created,
        "usage": {
            "prompt_tokens": len(prompt),
            "total_tokens": len(prompt) + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },  # fmt: skip
        "prompt_logprobs": _prompt_logprobs(parsed, samples[0], engine)
        if parsed.prompt_logprobs is not None
        else None,
        "prompt_token_id_logprobs": None,
        "prompt_token_ids": list(prompt) if parsed.return_token_ids else None,
        "mm_placeholders": None,
        "metrics": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "output_mode": "tokens",
        "choices": choices,
    }


def _choice(index: int, sample: SampleOutput, parsed: ParsedGenerate, engine) -> dict[str, Any]:
    count = len(sample.output_ids)
    return {
        "index": index,
        "finish_reason": sample.finish.type,
        "stop_reason": stop_reason(sample, parsed, engine),
        "token_ids": list(sample.output_ids),
        "routed_experts": _routed_experts(sample, parsed, engine),
        "sampling_mask": None,
        "weight_versions": [{"version": sample.weight_version, "start": 0, "end": count}] if count else [],
        "logprobs": _logprobs(sample, parsed.logprobs) if parsed.logprobs is not None else None,
    }


def stop_reason(sample: SampleOutput, parsed: ParsedGenerate, engine) -> int | str | None:
    """vLLM's ``stop_reason``: the stop string, or the stop token id (a requested one, or an extra EOS id of
    the generation config); None for the tokenizer's EOS (checked first), length and abort."""
    finish = sample.finish
    if finish.type != "stop":
        return None
    if isinstance(finish.matched, int) and not parsed.ignore_eos and finish.matched == _primary_eos(engine):
        return None
    return finish.matched


def _primary_eos(engine) -> int | None:
    eos = getattr(engine.tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _clamp(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


def _entries(token: int, logprob: float, rank: int | None, top: Sequence[tuple[float, int]], k: int):
    """The engine's candidates at one position, vLLM's way: the token first, then the top k ranked 1..k;
    a token also in the top k keeps its first place and takes the top-k entry's values."""
    entries: dict[int, tuple[float, int | None]] = {int(token): (float(logprob), rank)}
    for place, (lp, tid) in enumerate(top[:k], start=1):
        entries[int(tid)] = (float(lp), place)
    return entries


def _logprobs(sample: SampleOutput, k: int) -> dict[str, Any]:
    tops = sample.output_top_logprobs or [[] for _ in sample.output_ids]
    ranks = sample.output_ranks or [None] * len(sample.output_ids)
    content = []
    for token, lp, rank, top in zip(sample.output_ids, sample.output_logprobs, ranks, tops, strict=True):
        entries = _entries(token, lp, rank, top, k)
        own, own_rank = entries[int(token)]  # the top-k entry's values when the token is among them
        content.append(
            {
                "token_id": int(token),
                "logprob": _clamp(own),
                "rank": own_rank or None,
                "top_logprobs": [
                    {"token_id": tid, "logprob": _clamp(v), "rank": r or None}
                    for tid, (v, r) in entries.items()
                ],
            }  # fmt: skip
        )
    return {"content": content}


def _prompt_logprobs(parsed: ParsedGenerate, sample: SampleOutput, engine) -> list[dict[str, Any] | None]:
    """``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``: one per prompt token."""
    prompt, k = parsed.request.input_ids, parsed.prompt_logprobs or 0
    if not sample.input_logprobs:  # aborted before its prefill: vLLM's list holds only position 0's null
        return [None]
    tops = sample.input_top_logprobs
    if len(tops) != len(sample.input_logprobs):  # no top-k asked of the engine
        tops = [None] * len(sample.input_logprobs)
    out: list[dict[str, Any] | None] = []
    for j, (lp, rank, top) in enumerate(zip(sample.input_logprobs, sample.input_ranks, tops, strict=True)):
        if lp is None:
            out.append(None)
            continue
        entries = _entries(prompt[j], lp, rank, top or [], k)
        # vLLM decodes against the prompt tokens already reported: the last four, position 0 never.
        context = list(prompt[max(1, j - 4) : j])
        words = decoded_tokens(engine.tokenizer, list(entries), context) if parsed.detokenize else None
        out.append({
            str(tid): {"logprob": LOGPROB_FLOOR if v == float("-inf") else v, "rank": r,
                       "decoded_token": None if words is None else words[i]}
            for i, (tid, (v, r)) in enumerate(entries.items())
        })  # fmt: skip
    return out


def decoded_tokens(tokenizer, ids: Sequence[int], context: Sequence[int]) -> list[str]:
    """Each id decoded alone, as vLLM's log-prob processor does (``convert_ids_list_to_tokens``): a
    SentencePiece piece keeps its leading spaces, and a piece ending in U+FFFD (half a UTF-8 character
    from byte fallback) is decoded after the preceding tokens in ``context`` instead."""
    marker = _space_marker(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(ids)) if marker is not None else [None] * len(ids)
    out = []
    for tid, piece in zip(ids, pieces, strict=True):
        text = tokenizer.decode([tid]) or ""
        if marker is not None and piece:
            markers = len(piece) - len(piece.lstrip(marker))
            text = " " * max(markers - (len(text) - len(text.lstrip(" "))), 0) + text
        if text.endswith("\ufffd"):
            text = _after_context(tokenizer, tid, list(context))
        out.append(text)
    return out


def _after_context(tokenizer, tid: int, context: list[int]) -> str:
    """The text ``tid`` completes after up to four context tokens, or "" if it completes none."""
    for size in range(1, min(len(context), 4) + 1):
        before = context[-size:]
        full = tokenizer.decode([*before, tid])
        if full.endswith("\ufffd"):
            continue
        clean = len(before)  # the context's tokens that are whole characters on their own
        while clean > 0 and tokenizer.decode([before[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        prefix = tokenizer.decode(before[:clean]) if clean else ""
        if full.startswith(prefix):
            return full[len(prefix) :]
        common = next(
            (i for i, (a, b) in enumerate(zip(prefix, full, strict=False)) if a != b),
            min(len(prefix), len(full)),
        )
        return full[common:]
    return ""


@functools.lru_cache(maxsize=4)
def _space_marker(tokenizer) -> str | None:
    """The Metaspace replacement character of a SentencePiece-style tokenizer (its decode strips leading
    spaces), or None. Cached per tokenizer: reading it serializes the whole tokenizer (megabytes for a
    150k vocabulary), and every prompt position asks."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except Exception:
        return None
    for step in [pre, *(pre.get("pretokenizers") or [])]:
        if isinstance(step, dict) and step.get("type") == "Metaspace":
            return step.get("replacement", "\u2581")
    return None


def _routed_experts(sample: SampleOutput, parsed: ParsedGenerate, engine) -> str | None:
    """vLLM's ``routed_experts``: base64 ``.npy`` of ``[prompt + output - 1 - start, layers, top_k]``
    (uint8 up to 256 experts, else uint16); None without ``--enable-return-routed-experts``."""
    if sample.routed_experts is None:
        return None
    import numpy as np

    config = engine.model.config
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    rows = sample.routed_experts[parsed.routed_experts_start :].numpy()
    buffer = io.BytesIO()
    np.save(buffer, rows.astype(np.uint8 if experts <= 256 else np.uint16), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
