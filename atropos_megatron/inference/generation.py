"""Decode one batch of requests with an HF causal LM and a KV cache (left padding + attention mask).

One call runs a static batch to completion: every sample of every request in it (``n`` rows per
request) is prefilled together and decoded step by step until each row stops. Between steps it calls
``gate``, which is how the engine pauses, aborts and detects a weight change (then the batch is
restarted from the prompts, so no result mixes two weight versions). With ``ctx.routing`` and a
request that asks, the routers' choices for every fed token are recorded too (``routed_experts.py``).
No scheduling, no HTTP here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from atropos_megatron.inference.routed_experts import RoutingRecorder, RoutingSpec
from atropos_megatron.inference.sampling import (
    FinishReason,
    SamplingParams,
    check_stop,
    compute_logprobs,
    finished_text,
    mask_stop_tokens,
    sample_tokens,
)

if TYPE_CHECKING:
    from atropos_megatron.inference.lora_adapters import LoraAdapter


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One ``/generate`` prompt (its ``n`` samples run as ``n`` rows)."""

    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only; k >= 0: input logprobs from position k
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    logprob_ranks: bool = False  # also each reported token's vocabulary rank (vLLM's: entries with lp >= its)
    unmasked_logprobs: bool = False  # output logprobs before the min_new_tokens mask (vLLM's raw_logprobs)
    raw_input_logprobs: bool = False  # prompt logprobs of the unscaled logits whatever the engine reports
    adapter: LoraAdapter | None = None  # the LoRA adapter its rows run (held until it finishes); None: base
    return_routed_experts: bool = False  # record each fed token's experts (needs the engine's routing)
    routed_experts_start_len: int = 0  # the routing returned covers positions [start, len - 1)


@dataclass(kw_only=True)
class SampleOutput:
    """One finished sample: what ``meta_info`` reports about it."""

    output_ids: list[int]
    text: str
    finish: FinishReason
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)  # from logprob_start_len on
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_ranks: list[int] = field(default_factory=list)  # with ``logprob_ranks``: per output token
    input_ranks: list[int | None] = field(default_factory=list)  # with ``logprob_ranks``: per input logprob
    weight_version: str = "default"
    routed_experts: torch.Tensor | None = None
    """int32 ``[prompt + output - 1, num_layers, top_k]``: every fed token's experts (when asked and
    finished, not aborted)."""


@dataclass(frozen=True)
class GateDecision:
    """What the engine says before each forward pass."""

    restart: bool = False  # the weights changed: start over from the prompts
    aborts: dict[int, str] = field(default_factory=dict)  # request index -> abort message


@dataclass
class _Row:
    request: int
    params: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int
    top_k: int = 0  # top logprobs to report per output token
    ranks_wanted: bool = False
    unmasked: bool = False  # its logprobs are taken before the min_new_tokens mask
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[float, int]]] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    routing: list[torch.Tensor] = field(default_factory=list)  # [positions, L, k] per pass that fed it


@dataclass(frozen=True, kw_only=True)
class DecodeContext:
    """What decoding needs from the engine besides the model."""

    eos_ids: tuple[int, ...]
    context_length: int
    original_logprob: bool
    decode: Callable[[Sequence[int], bool], str]  # (ids, skip_special_tokens) -> text
    make_generator: Callable[[GenerateRequest, int], torch.Generator | None]  # (request, sample index)
    routing: RoutingSpec | None = None  # the model's routers (--enable-return-routed-experts); None: off


def generate_batch(
    model: torch.nn.Module,
    requests: Sequence[GenerateRequest],
    ctx: DecodeContext,
    gate: Callable[[], GateDecision],
) -> list[list[SampleOutput]] | None:
    """Run ``requests`` to completion; one list of ``n`` samples per request, or None to restart."""
    device = next(model.parameters()).device
    rows = [
        _Row(
            index,
            req.params,
            ctx.make_generator(req, sample),
            _max_new_tokens(req, ctx.context_length),
            top_k=req.top_logprobs_num if req.return_logprob else 0,
            ranks_wanted=req.return_logprob and req.logprob_ranks,
            unmasked=req.unmasked_logprobs,
        )
        for index, req in enumerate(requests)
        for sample in range(req.params.n)
    ]
    prompts = [requests[row.request].input_ids for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    need_input = any(r.return_logprob and r.logprob_start_len >= 0 for r in requests)
    temperatures = torch.tensor([row.params.temperature for row in rows], device=device)

    cache = None
    cache_arg = _cache_argument(model)
    step_ids, step_positions = ids, positions
    for row in rows:  # max_new_tokens=0: finished before any forward pass
        row.finish = check_stop(row.params, [], (), max_new_tokens=row.max_new_tokens, decode=lambda _: "")
    input_lp: dict[int, tuple[list, list, list]] = {}
    capture = ctx.routing is not None and any(r.return_routed_experts for r in requests)
    recorder = RoutingRecorder(ctx.routing) if capture else None
    while True:
        decision = gate()
        if decision.restart:
            return None
        for row in rows:
            if row.finish is None and row.request in decision.aborts:
                row.finish = FinishReason("abort", message=decision.aborts[row.request])
        # SGLang prefills a max_new_tokens=0 request too: its prompt's routing exists.
        prefill_owed = (
            capture and cache is None and any(r.finish is None or r.finish.type != "abort" for r in rows)
        )
        if all(row.finish is not None for row in rows) and not prefill_owed:
            break
        fed = [cache is None or row.finish is None for row in rows]  # rows whose tokens are real
        with torch.inference_mode(), recorder or contextlib.nullcontext():
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                use_cache=True,
                logits_to_keep=0 if cache is None and need_input else 1,
                **{cache_arg: cache},
            )
        if recorder is not None:
            _keep_routing(rows, recorder.take(*step_ids.shape), fed, prompts if cache is None else None)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        logits = out.logits.float()
        if step_ids is ids and need_input:
            input_lp = _input_logprobs(requests, rows, logits, temperatures, width, ctx)
        last = logits[:, -1].clone()
        tokens = _sample_step(rows, last, temperatures, ctx)
        step_ids = tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return _outputs(requests, rows, input_lp, ctx)


def _keep_routing(rows: list[_Row], step: torch.Tensor, fed: list[bool], prompts) -> None:
    """Append each fed row's positions of one pass (``step``: ``[rows, seq, L, k]``) to its routing.

    The prefill (``prompts`` given) feeds every row its left-padded prompt; a decode step feeds each
    row the token it sampled last, which belongs to the sample only while the row is unfinished.
    """
    for i, row in enumerate(rows):
        if fed[i]:
            row.routing.append(step[i, step.shape[1] - len(prompts[i]) :] if prompts is not None else step[i])


def _cache_argument(model: torch.nn.Module) -> str:
    # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns); 5.0-5.23 need the old.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _max_new_tokens(req: GenerateRequest, context_length: int) -> int:
    room = context_length - len(req.input_ids)
    return room if req.params.max_new_tokens is None else min(req.params.max_new_tokens, room)


def _sample_step(
    rows: list[_Row], last: torch.Tensor, temperatures: torch.Tensor, ctx: DecodeContext
) -> torch.Tensor:
    """Sample one token for every row, record it for unfinished rows, and apply the stop rules.

    Rows below ``min_new_tokens`` cannot stop: their EOS and stop ids are masked before sampling, and
    before their logprobs too unless the request asks for ``unmasked_logprobs``.
    """
    masked = [
        i for i, r in enumerate(rows) if r.finish is None and len(r.output_ids) < r.params.min_new_tokens
    ]
    unmasked = [i for i in masked if rows[i].unmasked]
    before = last[unmasked].clone() if unmasked else None
    for i in masked:
        mask_stop_tokens(last, i, [*ctx.eos_ids, *rows[i].params.stop_token_ids])
    logprobs = compute_logprobs(last, temperatures, original=ctx.original_logprob)
    if before is not None:
        logprobs[unmasked] = compute_logprobs(before, temperatures[unmasked], original=ctx.original_logprob)
    tokens = sample_tokens(last, [row.params for row in rows], [row.generator for row in rows])
    top_k = max((row.top_k for row in rows), default=0)
    top = logprobs.topk(top_k, dim=-1) if top_k else None
    for i, row in enumerate(rows):
        if row.finish is not None:
            continue
        token = int(tokens[i])
        row.output_ids.append(token)
        row.logprobs.append(float(logprobs[i, token]))
        if row.ranks_wanted:
            row.ranks.append(int((logprobs[i] >= logprobs[i, token]).sum()))
        if top is not None and row.top_k:
            k = row.top_k
            row.top.append(list(zip(top.values[i, :k].tolist(), top.indices[i, :k].tolist(), strict=True)))
        row.finish = check_stop(
            row.params,
            row.output_ids,
            ctx.eos_ids,
            max_new_tokens=row.max_new_tokens,
            decode=lambda ids, p=row.params: ctx.decode(ids, p.skip_special_tokens),
        )
    return tokens


def _input_logprobs(requests, rows, logits, temperatures, width, ctx) -> dict[int, tuple[list, list, list]]:
    """Prompt logprobs per request from the prefill logits, from ``logprob_start_len`` on.

    Position ``j``'s logprob is ``log p(prompt[j] | prompt[:j])``; position 0 has none (null). With
    ``logprob_ranks``, also ``prompt[j]``'s rank there: how many vocabulary entries have a log-prob >= its.
    """
    result: dict[int, tuple[list, list, list]] = {}
    first_row = {}
    for i, row in enumerate(rows):
        first_row.setdefault(row.request, i)
    for index, req in enumerate(requests):
        if not (req.return_logprob and req.logprob_start_len >= 0):
            continue
        i = first_row[index]
        prompt = req.input_ids
        pad = width - len(prompt)
        original = ctx.original_logprob or req.raw_input_logprobs
        lp = compute_logprobs(logits[i, pad:], temperatures[i].expand(len(prompt)), original=original)
        start = min(req.logprob_start_len, len(prompt) - 1)
        values: list[float | None] = []
        tops: list = []
        ranks: list[int | None] = []
        for j in range(start, len(prompt)):
            if j == 0:
                values.append(None)
                tops.append(None)
                ranks.append(None)
                continue
            values.append(float(lp[j - 1, prompt[j]]))
            if req.top_logprobs_num:
                top = lp[j - 1].topk(req.top_logprobs_num)
                tops.append(list(zip(top.values.tolist(), top.indices.tolist(), strict=True)))
            if req.logprob_ranks:
                ranks.append(int((lp[j - 1] >= lp[j - 1, prompt[j]]).sum()))
        result[index] = (values, tops, ranks if req.logprob_ranks else [])
    return result


def _outputs(requests, rows, input_lp, ctx) -> list[list[SampleOutput]]:
    outputs: list[list[SampleOutput]] = [[] for _ in requests]
    for row in rows:
        assert row.finish is not None
        values, tops, ranks = input_lp.get(row.request, ([], [], []))
        decode = lambda ids, p=row.params: ctx.decode(ids, p.skip_special_tokens)  # noqa: E731
        routed = None
        if requests[row.request].return_routed_experts and row.routing and row.finish.type != "abort":
            # Prompt + one per decode step = prompt + output - 1 rows (prompt rows, cut to prompt - 1, when
            # nothing was sampled: SGLang returns [0, seqlen - 1) and the last token is never fed).
            expected = len(requests[row.request].input_ids) + len(row.output_ids) - 1
            routed = torch.cat(row.routing)[:expected]
            assert routed.shape[0] == expected, f"routed experts: {routed.shape[0]} rows, expected {expected}"
        outputs[row.request].append(
            SampleOutput(
                output_ids=row.output_ids,
                text=finished_text(row.params, row.output_ids, row.finish, decode),
                finish=row.finish,
                output_logprobs=row.logprobs,
                output_top_logprobs=row.top,
                input_logprobs=values,
                input_top_logprobs=tops,
                output_ranks=row.ranks,
                input_ranks=ranks,
                routed_experts=routed,
            )
        )
    return outputs
