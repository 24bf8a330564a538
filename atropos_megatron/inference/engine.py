"""The reference server's engine: model + tokenizer, one generation worker, pause and update rules.

One worker thread takes queued requests as a static batch (up to ``max_batch`` rows; the ``n``
samples of a request are rows of one batch; with LoRA at most ``max_loras_per_batch`` distinct
adapters, the base model counting as one) and decodes it to completion (``generation.py``), each row
with its request's adapter (``lora_runtime``). Batches never overlap, so a forward pass never races a
weight copy. Weight updates follow SGLang's ordering:

- not paused: an update waits until the running batch finished (no new batch starts meanwhile);
- paused (``pause(mode)``): the worker is frozen between two decode steps and updates run at once;
  ``abort`` finishes every running and queued request with ``finish_reason`` abort instead;
- on ``resume()`` a frozen batch whose weights changed meanwhile restarts from its prompts, so every
  returned sample was generated under one weight version (stricter than SGLang, which continues
  ``in_place``/``retract`` requests with their old partial tokens under the new weights).

Not production: TP=1, no paged attention, no prefix cache, no continuous batching.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from atropos_megatron.inference.generation import (
    DecodeContext,
    GateDecision,
    GenerateRequest,
    SampleOutput,
    generate_batch,
)
from atropos_megatron.inference.lora_options import LoraOptions
from atropos_megatron.inference.lora_runtime import LoraRuntime
from atropos_megatron.inference.routed_experts import routing_spec
from atropos_megatron.inference.sampling import FinishReason, finished_text
from atropos_megatron.logs import FirstTimeInfo

logger = logging.getLogger(__name__)
PAUSE_MODES = ("abort", "retract", "in_place")
PAUSE_ABORT_MESSAGE = "Abort in pause_generation."
T = TypeVar("T")


@dataclass
class _Job:
    request: GenerateRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abort_message: str | None = None
    arrived_paused: bool = False  # SGLang holds such requests before its scheduler, outside the cache


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    model_path: str
    served_model_name: str
    tokenizer_path: str | None = None  # SGLang's --tokenizer-path; default: model_path
    weight_version: str = "default"
    max_batch: int = 16  # rows (samples) per batch; one request is never split
    seed: int = 0
    return_original_logprob: bool = False  # SGLANG_RETURN_ORIGINAL_LOGPROB=1: unscaled logprobs
    vllm_logprobs_mode: str = "raw_logprobs"  # --protocol vllm: vLLM's --logprobs-mode (raw or processed)
    lora: LoraOptions | None = None  # --enable-lora and its limits; None: LoRA off
    enable_return_routed_experts: bool = False  # requests may ask for their routing (MoE models only)


class Engine:
    """Owns the model; ``submit`` queues requests, control methods pause/abort/update between steps."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, options: EngineOptions) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options
        self.device = next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 4096))
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.eos_ids = _eos_ids(model, tokenizer)
        self.lora = LoraRuntime(model, options.lora.target_modules) if options.lora else None
        # The routers stay the same modules across weight updates (weights are copied in place).
        self.routing = routing_spec(model) if options.enable_return_routed_experts else None
        self._rng = random.Random(options.seed)
        self._restart_log = FirstTimeInfo()  # retract pauses restart requests on every update
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._in_step = False
        self._paused = False
        self._updating = False
        self._updates_waiting = 0
        self._epoch = 0  # incremented by every weight change
        self._weight_version = options.weight_version
        self._stopped = False
        self._tickets = _TicketLock()
        self._worker = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._worker.start()

    # ----- requests
    def submit(self, request: GenerateRequest) -> concurrent.futures.Future[list[SampleOutput]]:
        """Queue a request; the future gets its ``n`` samples (raises nothing: errors are in results)."""
        return self.submit_many([request])[0]

    def submit_many(
        self, requests: Sequence[GenerateRequest]
    ) -> list[concurrent.futures.Future[list[SampleOutput]]]:
        """Queue requests together: the prompts of one batched request start in one batch if they fit."""
        jobs = [_Job(request) for request in requests]
        with self._cond:
            for job in jobs:
                job.arrived_paused = self._paused
                self._queue.append(job)
            self._cond.notify_all()
        return [job.future for job in jobs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def weight_version(self) -> str:
        return self._weight_version

    @property
    def ready(self) -> bool:
        return not self._stopped

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def busy(self) -> bool:
        """Requests are running (possibly frozen) or queued: SGLang refuses to flush its cache then.

        Requests that arrived during a pause do not count: SGLang makes them wait before they reach
        its scheduler, so a flush between updates succeeds with them waiting.
        """
        with self._cond:
            waiting = [job for job in self._queue if not (self._paused and job.arrived_paused)]
            return bool(self._active or waiting)

    @property
    def update_waiting(self) -> bool:
        """A weight update is waiting for the running batch to finish (it runs before the next one)."""
        with self._cond:
            return self._updates_waiting > 0

    @property
    def has_running(self) -> bool:
        with self._cond:
            return bool(self._active)

    # ----- control
    def pause(self, mode: str) -> None:
        """Freeze generation between decode steps; ``abort`` also aborts running and queued requests."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cond:
            self._paused = True
            if mode == "abort":
                self._abort_locked(PAUSE_ABORT_MESSAGE)
            self._cond.notify_all()
            # Return only once the model is quiescent (and, for abort, the aborted batch was answered).
            self._cond.wait_for(lambda: not self._in_step and (mode != "abort" or not self._active))

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def abort_all(self, message: str = "Abort all requests.") -> None:
        with self._cond:
            self._abort_locked(message)
            self._cond.notify_all()

    def set_weight_version(self, version: str) -> None:
        with self._cond:
            self._weight_version = version

    def take_ticket(self) -> int:
        """Call in arrival order (on the event loop); ``ordered(ticket)`` then admits in that order."""
        return self._tickets.take()

    def ordered(self, ticket: int) -> contextlib.AbstractContextManager[None]:
        """Hold the update turn of ``ticket``: updates, group joins and receives run one at a time."""
        return self._tickets.turn(ticket)

    def run_quiescent(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a weight change) with no decode step running.

        Not paused: waits for the running batch to finish (holding new batches back). Paused: runs at
        once (the worker is frozen between steps). The epoch advances after ``fn`` even if it raised,
        since a failed update may have touched something; a frozen batch then restarts.
        """
        with self._cond:
            self._updates_waiting += 1
            self._cond.wait_for(lambda: (self._paused and not self._in_step) or not self._active)
            self._updates_waiting -= 1
            self._updating = True
        try:
            return fn()
        finally:
            with self._cond:
                self._updating = False
                self._epoch += 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._abort_locked("Server shutting down.")
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ----- worker
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (self._queue and self._can_start_locked()))
                if self._stopped:
                    return
                jobs = self._take_batch_locked()
                self._active = jobs
            try:
                self._run_batch(jobs)
            except Exception as exc:  # a model error fails these requests, never the worker
                logger.exception("generation failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._active = []
                    self._in_step = False
                    self._cond.notify_all()

    def _can_start_locked(self) -> bool:
        return not (self._paused or self._updating or self._updates_waiting)

    def _take_batch_locked(self) -> list[_Job]:
        """Queued jobs in order while they fit: ``max_batch`` rows, ``max_loras_per_batch`` adapters."""
        jobs = [self._queue.popleft()]
        rows = jobs[0].request.params.n
        max_adapters = self.options.lora.max_loras_per_batch if self.options.lora else 1
        adapters = {_adapter_id(jobs[0])}  # the base model counts as one, as in SGLang
        while self._queue and rows + self._queue[0].request.params.n <= self.options.max_batch:
            if len(adapters | {_adapter_id(self._queue[0])}) > max_adapters:
                break
            adapters.add(_adapter_id(self._queue[0]))
            rows += self._queue[0].request.params.n
            jobs.append(self._queue.popleft())
        return jobs

    def _run_batch(self, jobs: list[_Job]) -> None:
        ctx = DecodeContext(
            eos_ids=self.eos_ids,
            context_length=self.context_length,
            original_logprob=self.options.return_original_logprob,
            decode=self.decode,
            make_generator=self._make_generator,
            routing=self.routing,
        )
        while True:
            with self._cond:
                epoch, version = self._epoch, self._weight_version
            with self._lora_rows(jobs):
                outputs = generate_batch(
                    self.model, [j.request for j in jobs], ctx, functools.partial(self._gate, jobs, epoch)
                )
            if outputs is not None:
                break
            logger.log(
                self._restart_log.level(),
                "weights changed while %d request(s) were paused: restarting them",
                len(jobs),
            )
        for job, samples in zip(jobs, outputs, strict=True):
            for sample in samples:
                sample.weight_version = version
            job.future.set_result(samples)

    def _lora_rows(self, jobs: list[_Job]) -> contextlib.AbstractContextManager[None]:
        """Each batch row's adapter, in generate_batch's row order (a request's ``n`` rows together)."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.rows([job.request.adapter for job in jobs for _ in range(job.request.params.n)])

    def _gate(self, jobs: list[_Job], epoch: int) -> GateDecision:
        """Between decode steps: report aborts, wait while paused or updating, detect weight changes."""
        with self._cond:
            self._in_step = False
            self._cond.notify_all()
            while True:
                aborts = {i: j.abort_message for i, j in enumerate(jobs) if j.abort_message is not None}
                if len(aborts) == len(jobs):
                    return GateDecision(aborts=aborts)
                if not (self._paused or self._updating):
                    break
                self._cond.wait()
            if self._epoch != epoch:
                return GateDecision(restart=True)
            self._in_step = True
            return GateDecision(aborts=aborts)

    def _abort_locked(self, message: str) -> None:
        for job in self._active:
            job.abort_message = job.abort_message or message
        while self._queue:
            job = self._queue.popleft()
            finish = FinishReason("abort", message=message)
            params = job.request.params
            samples = [
                SampleOutput(
                    output_ids=[], text=finished_text(params, [], finish, self.decode), finish=finish
                )
                for _ in range(params.n)
            ]
            for sample in samples:
                sample.weight_version = self._weight_version
            job.future.set_result(samples)

    def _make_generator(self, request: GenerateRequest, sample: int) -> torch.Generator | None:
        if request.params.greedy:
            return None
        seed = request.params.sampling_seed
        seed = self._rng.getrandbits(63) if seed is None else seed + sample
        return torch.Generator(device=self.device).manual_seed(seed)


class _TicketLock:
    """A FIFO lock: holders run in the order they took tickets (threading.Lock is not fair)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def take(self) -> int:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            return ticket

    @contextlib.contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


def _adapter_id(job: _Job) -> str | None:
    return None if job.request.adapter is None else job.request.adapter.lora_id


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from the tokenizer and the model's (generation) config, as SGLang collects them."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))


def load_engine(model_path: str, *, device: str, dtype: str, options: EngineOptions) -> Engine:
    """Load an HF checkpoint directory (model + tokenizer) into an :class:`Engine`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer_path or model_path)
    logger.info("loaded %s (%s, %s) in %.1f s", model_path, device, dtype, time.monotonic() - start)
    return Engine(model, tokenizer, options)
