"""Atropos's ``/generate`` on stock ``vllm serve``: the translation the bridge's proxies do, pure of HTTP.

atroposlib 0.4.0's ``server_type: vllm`` (``VLLMServer``) posts ``{base_url minus /v1}/generate`` in the
shape of Atropos's own example server: ``{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0,
<SamplingParams fields>}``, and reads ``logprobs`` (per completion, per token ``[{"<id>": logprob}]``,
the sampled token first), ``finish_reasons`` and, for ``get_logprobs``, ``prompt_logprobs``. Stock
``vllm serve`` 0.33 has no such route; its token-in, token-out route is ``POST /inference/v1/generate``
(``--enable-scale-out``), which takes ``{"token_ids", "sampling_params"}`` and answers
``choices[i].{token_ids, finish_reason, logprobs.content[j].{token_id, logprob, top_logprobs}}``
(``vllm/entrypoints/scale_out/token_in_token_out/{protocol,serving}.py`` in the 0.33.0 wheel;
docs/vllm.md §9). :func:`to_scale_out` and :func:`to_atropos` map one onto the other, so environments
keep ``server_type: vllm`` and their token ids and (raw) log-probs reach the trainer, with no code of
ours inside vLLM.

Two rules keep a cut or misread sample out of training: a choice vLLM ended with ``abort`` (a
``/pause?mode=abort`` during the request) makes the whole reply a 503, which atroposlib retries; and
any reply that is not 0.33's shape (an older release answered string tokens here) is refused by field
name rather than guessed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ATROPOS_ROUTE = "/generate"
SCALE_OUT_ROUTE = "/inference/v1/generate"

SAMPLING_FIELDS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start", "logprob_token_ids",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
    "thinking_token_budget", "repetition_detection",
})  # fmt: skip
"""vLLM 0.33.0's public ``SamplingParams`` fields a request may set (``sampling_params.py``), less those
the route sets itself (``output_kind``) or that describe the engine, not the sample (``skip_clone``,
``stream_interval``, ``watermarking``, ...). The route drops unknown keys silently
(``v1/serial_utils.PydanticMsgspecMixin``), so the translator refuses them instead: a sampling
parameter an environment believes it set must not vanish."""

IGNORED_FIELDS = frozenset({"model"})
"""Keys atroposlib may leave in the body that are not sampling parameters (it drops ``model`` itself;
a caller's own is the served model in any case)."""

FINISH_REASONS = {"stop": "stop", "length": "length", "repetition": "stop"}
"""vLLM's finish reason -> Atropos's. atroposlib builds openai's ``Choice``/``CompletionChoice`` from
it, whose pydantic literals accept ``stop`` and ``length`` only; ``repetition`` (vLLM's repetition
detection stopped the sample) is a stop. ``abort`` is not mapped: see :class:`GenerationAborted`."""


class TranslationError(ValueError):
    """The environment's request cannot be sent to vLLM; answered 400 with this message."""


class GenerationAborted(RuntimeError):
    """vLLM aborted a sample (paused with ``mode=abort`` during the request); answered 503, retried by
    atroposlib (three tries), so a cut sample is never trained on."""


class UnexpectedReply(RuntimeError):
    """vLLM's reply is not 0.33's shape; answered 502 with the field that differs."""


@dataclass(frozen=True)
class ScaleOutRequest:
    """One translated request: vLLM's body, and what the reply's translation needs back."""

    body: dict[str, Any]
    prompt_ids: list[int]
    logprobs: int | None  # sampling_params.logprobs (None: the environment asked for none)
    prompt_logprobs: int | None


def to_scale_out(request: Any, *, adapter: str | None = None) -> ScaleOutRequest:
    """Atropos's ``/generate`` body -> ``/inference/v1/generate``'s, raising :class:`TranslationError`;
    ``adapter``: the LoRA adapter to run it with (vLLM's ``model``), None for the base model."""
    if not isinstance(request, dict):
        raise TranslationError("the request body must be a JSON object")
    prompt = request.get("prompt")
    if not isinstance(prompt, dict) or set(prompt) != {"prompt_token_ids"}:
        raise TranslationError(
            "prompt must be {'prompt_token_ids': [...]}: vLLM's token route takes token ids (atroposlib's "
            "VLLMServer always sends them; a text prompt would need the server's tokenizer)"
        )
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise TranslationError(
            "prompt.prompt_token_ids must be a non-empty list of token ids (integers >= 0)"
        )
    if request.get("stream"):
        raise TranslationError("stream is not supported: atroposlib reads one whole reply")
    unknown = sorted(set(request) - SAMPLING_FIELDS - IGNORED_FIELDS - {"prompt", "stream"})
    if unknown:
        raise TranslationError(
            f"unknown sampling parameter(s) {unknown}: not a field of vLLM 0.33's SamplingParams, which "
            "vLLM would drop without a word"
        )
    sampling = {key: value for key, value in request.items() if key in SAMPLING_FIELDS}
    for key in ("logprobs", "prompt_logprobs"):
        value = sampling.get(key)
        if value is not None and (not _is_int(value) or value < -1):
            raise TranslationError(f"{key} must be an integer >= -1 or null, got {value!r}")
    body = {"token_ids": list(ids), "sampling_params": sampling, "return_token_ids": True}
    if adapter is not None:
        body["model"] = adapter
    return ScaleOutRequest(body, list(ids), sampling.get("logprobs"), sampling.get("prompt_logprobs"))


def to_atropos(reply: Any, request: ScaleOutRequest) -> dict[str, Any]:
    """vLLM's reply -> the one atroposlib reads: ``finish_reasons``, ``token_ids``,
    ``prompt_token_ids`` and, where asked, ``logprobs`` and ``prompt_logprobs``.

    Raises :class:`GenerationAborted` for an aborted choice and :class:`UnexpectedReply` for any other
    shape than 0.33's. ``text`` is left out: atroposlib does not read it, and the bridge has no
    tokenizer.
    """
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
        raise UnexpectedReply(
            "no choices in vLLM's reply (expected vLLM 0.33's /inference/v1/generate shape)"
        )
    choices = sorted(reply["choices"], key=lambda choice: _field(choice, "index", int, "choices[]"))
    finish_reasons, token_ids, logprobs = [], [], []
    for choice in choices:
        where = f"choices[{choice['index']}]"
        reason = _field(choice, "finish_reason", str, where)
        if reason == "abort":
            raise GenerationAborted(
                f"vLLM aborted {where} (its generation was paused with mode=abort): retry the request"
            )
        if reason not in FINISH_REASONS:
            raise UnexpectedReply(f"{where}.finish_reason {reason!r} is not one of vLLM 0.33's")
        ids = _field(choice, "token_ids", list, where)
        if not all(_is_int(t) for t in ids):
            raise UnexpectedReply(
                f"{where}.token_ids must be integers (vLLM 0.33's shape; older releases differ)"
            )
        finish_reasons.append(FINISH_REASONS[reason])
        token_ids.append(ids)
        if request.logprobs is not None:
            logprobs.append(_positions(choice, ids, where))
    out: dict[str, Any] = {
        "finish_reasons": finish_reasons,
        "token_ids": token_ids,
        "prompt_token_ids": request.prompt_ids,
    }
    if request.logprobs is not None:
        out["logprobs"] = logprobs
    if request.prompt_logprobs is not None:
        out["prompt_logprobs"] = _prompt_positions(reply.get("prompt_logprobs"), len(request.prompt_ids))
    return out


def _positions(choice: dict, ids: list[int], where: str) -> list[list[dict[str, float]]]:
    """``[[{"<sampled id>": logprob, "<top id>": logprob, ...}] per token]``, sampled token first."""
    content = _field(_field(choice, "logprobs", dict, where), "content", list, f"{where}.logprobs")
    if len(content) != len(ids):
        raise UnexpectedReply(f"{where}: {len(content)} log-probs for {len(ids)} tokens")
    positions = []
    for j, (entry, token) in enumerate(zip(content, ids, strict=True)):
        at = f"{where}.logprobs.content[{j}]"
        if _field(entry, "token_id", int, at) != token:
            raise UnexpectedReply(
                f"{at}.token_id {entry['token_id']} is not the token sampled there ({token})"
            )
        position = {str(token): _logprob(entry, at)}
        for k, top in enumerate(entry.get("top_logprobs") or []):
            position.setdefault(
                str(_field(top, "token_id", int, f"{at}.top_logprobs[{k}]")), _logprob(top, at)
            )
        positions.append([position])
    return positions


def _prompt_positions(entries: Any, length: int) -> list[dict[str, float] | None]:
    """vLLM's ``[None | {id: {logprob, rank, decoded_token}}]`` -> ``[None | {id: logprob}]``."""
    if not isinstance(entries, list) or len(entries) != length:
        raise UnexpectedReply(
            f"prompt_logprobs must be a list of {length} positions, got {type(entries).__name__}"
        )
    out: list[dict[str, float] | None] = []
    for j, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, dict):
            raise UnexpectedReply(f"prompt_logprobs[{j}] must be an object of {{id: {{logprob, ...}}}}")
        out.append(
            {str(token): _logprob(value, f"prompt_logprobs[{j}][{token}]") for token, value in entry.items()}
        )
    return out


def _logprob(entry: Any, where: str) -> float:
    value = _field(entry, "logprob", float, where)
    if math.isnan(value):
        raise UnexpectedReply(f"{where}.logprob is NaN")
    return float(value)


def _field(obj: Any, name: str, kind: type, where: str) -> Any:
    """``obj[name]``, checked to be ``kind`` (int excludes bool; float accepts int)."""
    value = obj.get(name) if isinstance(obj, dict) else None
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise UnexpectedReply(f"{where}.{name} missing or not a {kind.__name__} (expected vLLM 0.33's shape)")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
