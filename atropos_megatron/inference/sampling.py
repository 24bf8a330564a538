"""SGLang sampling semantics: parse ``sampling_params``, sample next tokens, report logprobs, stop rules.

Pure functions over logits; no model, no HTTP. Follows SGLang (0.5.x) where it is observable:

- ``temperature < 1e-6`` is greedy (argmax), and its logprobs are ``log_softmax(logits)``;
- otherwise the token is drawn after top-k, top-p and min-p truncation, but the reported logprob is
  ``log_softmax(logits / temperature)[token]``: temperature-scaled, taken *before* truncation
  (SGLang's default; ``return_original_logprob=True`` mirrors ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` and
  reports ``log_softmax(logits)`` instead);
- an unknown sampling parameter is an error; penalties, grammars and logit bias are accepted only at
  their neutral values (the reference server does not implement them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS: a temperature below it means greedy
# Parameters SGLang accepts that the reference server does not implement: allowed at these values only.
NEUTRAL_ONLY: dict[str, Any] = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "stream_interval": None,
}


class SamplingParamsError(ValueError):
    """A ``sampling_params`` dict that SGLang would reject (or the reference server cannot honour)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """SGLang's ``sampling_params`` for one request (all its ``n`` samples share them)."""

    max_new_tokens: int | None = 128  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
            (
                self.max_new_tokens is None or self.max_new_tokens >= 0,
                f"max_new_tokens must be >= 0, got {self.max_new_tokens}",
            ),
            (
                self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)


_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams)}
_NUMBERS: dict[str, type] = {"temperature": float, "top_p": float, "min_p": float}
_INTS = ("max_new_tokens", "top_k", "n", "min_new_tokens", "sampling_seed")
_BOOLS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def parse_sampling_params(raw: dict[str, Any] | None) -> SamplingParams:
    """Validate a JSON ``sampling_params`` object; raises :class:`SamplingParamsError` naming the field."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise SamplingParamsError("sampling_params must be an object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in NEUTRAL_ONLY:
            if value is not None and value != NEUTRAL_ONLY[key]:
                raise SamplingParamsError(f"sampling_params.{key} is not supported by the reference server")
        elif key not in _FIELDS:
            raise SamplingParamsError(f"unknown sampling_params field {key!r}")
        elif value is not None:
            values[key] = _coerce(key, value)
    return SamplingParams(**values)


def _coerce(key: str, value: Any) -> Any:
    if key in _NUMBERS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SamplingParamsError(f"sampling_params.{key} must be a number")
        return float(value)
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SamplingParamsError(f"sampling_params.{key} must be an integer")
        return value
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise SamplingParamsError(f"sampling_params.{key} must be a boolean")
        return value
    if key == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise SamplingParamsError("sampling_params.stop must be a non-empty string or a list of them")
        return tuple(stops)
    if key == "stop_token_ids":
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise SamplingParamsError("sampling_params.stop_token_ids must be a list of integers")
        return tuple(value)
    raise AssertionError(key)


def compute_logprobs(logits: torch.Tensor, temperatures: torch.Tensor, *, original: bool) -> torch.Tensor:
    """Reported logprobs: ``log_softmax(logits / T)`` per row (``T = 1`` when greedy or ``original``).

    Args:
        logits: [B, V] fp32.
        temperatures: [B] fp32, the requests' temperatures (0 for greedy rows).
    Returns: [B, V] fp32.
    """
    if original:
        return torch.log_softmax(logits, dim=-1)
    scale = torch.where(temperatures < GREEDY_EPS, torch.ones_like(temperatures), temperatures)
    return torch.log_softmax(logits / scale[:, None], dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row: argmax for greedy rows, else a draw after top-k / top-p / min-p truncation.

    Args:
        logits: [B, V] fp32 (already masked for ``min_new_tokens``).
        params: B sampling params (rows of one request repeat the same object).
        generators: B generators (a seeded one per row makes ``sampling_seed`` reproducible).
    Returns: [B] int64.
    """
    tokens = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_k == -1 and p.top_p >= 1.0 and p.min_p <= 0.0:  # no truncation: skip the O(V log V) sort
            tokens[row] = torch.multinomial(probs, 1, generator=gen)[0]
            continue
        sorted_probs, order = probs.sort(descending=True)
        keep = torch.ones_like(sorted_probs, dtype=torch.bool)
        if p.top_k != -1:
            keep[p.top_k :] = False
        if p.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p (the first always stays)
            keep &= (sorted_probs.cumsum(0) - sorted_probs) <= p.top_p
        if p.min_p > 0.0:
            keep &= sorted_probs >= p.min_p * sorted_probs[0]
        kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(kept / kept.sum(), 1, generator=gen)
        tokens[row] = order[choice[0]]
    return tokens


def mask_stop_tokens(logits: torch.Tensor, row: int, stop_ids: Sequence[int]) -> None:
    """Forbid ``stop_ids`` in ``logits[row]`` (in place): ``min_new_tokens`` not reached yet."""
    ids = [t for t in stop_ids if 0 <= t < logits.shape[-1]]
    if ids:
        logits[row, ids] = float("-inf")


@dataclass(frozen=True)
class FinishReason:
    """SGLang's ``meta_info.finish_reason``: stop (matched id or string), length, or abort."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        return {"type": "abort", "message": self.message}


def check_stop(
    params: SamplingParams,
    output_ids: Sequence[int],
    eos_ids: Sequence[int],
    *,
    max_new_tokens: int,
    decode: Callable[[Sequence[int]], str],
) -> FinishReason | None:
    """Whether a sequence is finished after appending ``output_ids[-1]`` (SGLang's order of checks).

    ``max_new_tokens`` is the effective limit (the request's, capped by the context length).
    """
    count = len(output_ids)
    if count >= params.min_new_tokens and count > 0:
        last = output_ids[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids):
            return FinishReason("stop", matched=last)
        if params.stop:
            text = decode(output_ids)
            for stop in params.stop:
                if stop in text:
                    return FinishReason("stop", matched=stop)
    if count >= max_new_tokens:
        return FinishReason("length", length=max_new_tokens)
    return None


def finished_text(
    params: SamplingParams,
    output_ids: Sequence[int],
    finish: FinishReason | None,
    decode: Callable[[Sequence[int]], str],
) -> str:
    """The response ``text``: the matched stop token or string is trimmed unless ``no_stop_trim``."""
    if finish is None or finish.type != "stop" or params.no_stop_trim:
        return decode(output_ids)
    if isinstance(finish.matched, int):
        return decode(output_ids[:-1])
    text = decode(output_ids)
    return text[: text.find(finish.matched)] if finish.matched in text else text
