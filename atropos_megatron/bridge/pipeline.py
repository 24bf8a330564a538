"""Batches from Atropos to the trainer: fetch, validate, spool, queue, hand out, acknowledge, commit.

One background thread polls Atropos while fewer than ``prefetch`` batches wait, converts each batch
(rejecting bad groups, counted by reason), writes it to the spool and only then queues it. The
trainer's ``GetBatch`` takes the oldest waiting batch; ``AckBatch`` marks it acknowledged and
``CommitCheckpoint`` deletes what a durable checkpoint holds (the states: ``spool.py``). A restarted
bridge queues every unacknowledged batch again, oldest first, with its original id and step. A
trainer that (re-)registers at step K is served first what it lost: the batches it acknowledged after
K, in training order, then those handed out but never acknowledged (``register``).

No gRPC here: the servicer translates, this class decides (and tests drive it directly).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from atropos_megatron.bridge import codec
from atropos_megatron.bridge.routed_experts import (
    RoutedExpertsStore,
    attach_routed_experts,
    discard_routed_experts,
)
from atropos_megatron.bridge.spool import BatchSpool
from atropos_megatron.bridge.v1 import bridge_pb2
from atropos_megatron.logs import FirstTimeInfo

logger = logging.getLogger(__name__)

FetchGroups = Callable[[float, threading.Event], "list[dict] | None"]
"""``fetch(wait_s, stop)``: the next Atropos batch's groups, or None if none came in time."""


@dataclass(frozen=True)
class WaitState:
    """What the bridge knows about waiting (for naming stalls); times are ``time.monotonic()``."""

    no_batch_since: float | None
    """Since when no batch has been ready for the trainer (None while one is)."""
    last_handed_out: float | None
    """When a batch was last handed out (None: never, since the bridge started)."""
    rejections_since_batch: dict[str, int]
    """Groups rejected, by reason, since the last batch the bridge accepted."""
    last_acked_batch_id: str
    last_acked_step: int


@dataclass(frozen=True)
class Limits:
    """What a valid sequence must satisfy (from the trainer's registration)."""

    vocab_size: int | None
    max_token_len: int | None
    routed_experts_shape: tuple[int, int] | None = None
    """``(num_hidden_layers, num_experts_per_tok)`` when the trainer replays routings."""


class BatchPipeline:
    """Prefetching, validating, durable batch queue between Atropos and the trainer."""

    def __init__(
        self,
        spool: BatchSpool,
        fetch: FetchGroups,
        *,
        prefetch: int,
        poll_s: float = 1.0,
        routed_experts: RoutedExpertsStore | None = None,
    ) -> None:
        self.spool = spool
        self.routed_experts = routed_experts  # weights.capture_routed_experts: the proxies' captures
        self._fetch = fetch
        self._prefetch = prefetch
        self._poll_s = poll_s
        self._cond = threading.Condition()
        self._ready: deque[bridge_pb2.TrainingBatch] = deque(spool.unacked())
        self._replay: deque[bridge_pb2.TrainingBatch] = deque()
        self._handed_out: dict[str, bridge_pb2.TrainingBatch] = {}
        self._registrations = 0
        self._limits: Limits | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rejections: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._rejections_since_batch: Counter[str] = Counter()
        self._env_seen: dict[int, float] = {}
        self._no_batch_since: float | None = None if self._ready else time.monotonic()
        self._last_handed_out: float | None = None
        self._last_acked = ("", 0)
        self._routing_log = FirstTimeInfo()
        self._unmatched_warned = False
        if self._ready:
            logger.info("spool holds %d un-acknowledged batches; they are served first", len(self._ready))

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, limits: Limits) -> None:
        """Begin fetching (after the trainer registered: Atropos serves batches only then)."""
        with self._cond:
            self._limits = limits
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._fetch_loop, name="atropos-fetch", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.spool.close()

    @property
    def started(self) -> bool:
        return self._thread is not None

    # -- trainer side -----------------------------------------------------------------------------

    def register(self, *, starting_step: int, committed_step: int) -> int:
        """A trainer (re)joins with a model that holds every update up to ``starting_step`` and a durable
        checkpoint at ``committed_step``: commit what that checkpoint holds, then line up the batches
        it must be served again before anything new. Returns how many."""
        committed = self.spool.commit(committed_step)
        if committed_step < self.spool.committed_step:
            logger.warning(
                "the trainer resumes from a checkpoint at step %d, older than the committed step %d: the "
                "batches trained in between were deleted when that checkpoint was reported and are not "
                "served again",
                committed_step,
                self.spool.committed_step,
            )
        replay = self.spool.replay(starting_step)
        with self._cond:
            ids = {batch.batch_id for batch in replay}
            self._ready = deque(b for b in self._ready if b.batch_id not in ids)
            self._handed_out.clear()  # every handed-out batch is in the replay
            self._registrations += 1  # a request still waiting from the trainer's previous life gets nothing
            self._replay = deque(replay)
            self._note_readiness()
            self.counters["replayed"] += len(replay)
            self.counters["committed"] += committed
            self._cond.notify_all()
        if replay:
            logger.info(
                "the trainer resumes at step %d: serving %d batches again first (%s)",
                starting_step,
                len(replay),
                ", ".join(b.batch_id for b in replay),
            )
        return len(replay)

    def next_batch(
        self,
        wait_s: float,
        *,
        redeliver_unacked: bool = False,
        peek: bool = False,
        caller_alive: Callable[[], bool] = lambda: True,
    ) -> bridge_pb2.TrainingBatch | None:
        """The next batch: a replayed one first, else the oldest waiting one (or, with
        ``redeliver_unacked``, the oldest handed-out one); None after ``wait_s``.

        ``peek`` returns that batch but leaves it queued for the trainer. A request whose caller has
        gone (``caller_alive``) or that was made before the trainer registered again gets nothing: a
        batch handed to a dead trainer would wait for its next restart, out of order.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            registrations = self._registrations
            if redeliver_unacked and self._handed_out and not self._replay:
                batch = min(self._handed_out.values(), key=lambda b: b.step)
                self.counters["served"] += 1
                return batch
            while not (self._replay or self._ready):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            if registrations != self._registrations or not caller_alive():
                return None
            queue = self._replay or self._ready
            if peek:
                return queue[0]
            batch = queue[0]
            self.spool.hand_out(batch.batch_id)  # on disk before it leaves
            queue.popleft()
            self._handed_out[batch.batch_id] = batch
            self.counters["served"] += 1
            self._last_handed_out = time.monotonic()
            self._note_readiness()
            self._cond.notify_all()  # room in the prefetch queue
            return batch

    def ack(self, batch_id: str, trained_step: int) -> bool:
        """The trainer applied ``batch_id``'s update at ``trained_step``; False if this bridge never
        spooled it."""
        with self._cond:
            self._handed_out.pop(batch_id, None)
            # An ack may also name a batch still queued (handed out before a bridge restart).
            self._ready = deque(b for b in self._ready if b.batch_id != batch_id)
            self._replay = deque(b for b in self._replay if b.batch_id != batch_id)
            self._note_readiness()
        known = self.spool.ack(batch_id, trained_step)
        if known:
            self.counters["acked"] += 1
            self._last_acked = (batch_id, trained_step)
        return known

    def commit(self, step: int) -> int:
        """A checkpoint at ``step`` is durable; returns how many batches it committed."""
        committed = self.spool.commit(step)
        with self._cond:
            self.counters["committed"] += committed
        return committed

    def snapshot(self) -> dict:
        counts = self.spool.counts()
        with self._cond:
            return {
                "queue_depth": len(self._ready),
                "unacked": counts["queued"] + counts["handed_out"],
                "retained": counts["acked"],
                "spool_bytes": counts["bytes"],
                "committed_step": self.spool.committed_step,
                "batches_fetched": self.counters["fetched"],
                "batches_served": self.counters["served"],
                "batches_acked": self.counters["acked"],
                "batches_committed": self.counters["committed"],
                "batches_replayed": self.counters["replayed"],
                "rejected_groups": dict(self.rejections),
                "next_step": self.spool.next_step,
            }

    def wait_state(self) -> WaitState:
        """A copy of what the bridge knows about waiting, for ``stalls.diagnose``."""
        with self._cond:
            return WaitState(
                no_batch_since=self._no_batch_since,
                last_handed_out=self._last_handed_out,
                rejections_since_batch=dict(self._rejections_since_batch),
                last_acked_batch_id=self._last_acked[0],
                last_acked_step=self._last_acked[1],
            )

    def env_seen(self) -> dict[int, float]:
        """Per env_id, the monotonic time its groups last reached the bridge."""
        with self._cond:
            return dict(self._env_seen)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _note_readiness(self) -> None:
        """Keep ``_no_batch_since`` current (call with ``_cond`` held, after the queues changed)."""
        if self._ready or self._replay:
            self._no_batch_since = None
        elif self._no_batch_since is None:
            self._no_batch_since = time.monotonic()

    def _attach_routed_experts(self, batch: codec.EncodedBatch, limits: Limits) -> codec.EncodedBatch:
        """The captured routings joined to ``batch`` (before it is spooled: a replay serves it as is)."""
        if self.routed_experts is None:
            return batch
        if limits.routed_experts_shape is None:  # the trainer takes none: free what these claim anyway
            discard_routed_experts(batch, self.routed_experts)
            return batch
        num_layers, top_k = limits.routed_experts_shape
        joined = attach_routed_experts(batch, self.routed_experts, num_layers=num_layers, top_k=top_k)
        logger.log(
            self._routing_log.level(),
            "batch at step %d: routed experts for %d of %d sequences",
            batch.step,
            joined.matched,
            batch.num_sequences,
        )
        if joined.unmatched and not self._unmatched_warned:
            self._unmatched_warned = True  # counted in the status from here on, not logged per batch
            logger.warning(
                "%d of %d sequences of the batch at step %d have no captured routing (-1 rows: the trainer "
                "routes them itself): their tokens are not what an inference proxy saw (the environment "
                "re-tokenized, edited or truncated them, generated with a text prompt or not through the "
                "proxy), or the routing was evicted; see bridge-status routed_experts",
                joined.unmatched,
                batch.num_sequences,
                batch.step,
            )
        return joined.batch

    # -- Atropos side -----------------------------------------------------------------------------

    def _fetch_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while len(self._ready) >= self._prefetch and not self._stop.is_set():
                    self._cond.wait()
            if self._stop.is_set():
                return
            try:
                groups = self._fetch(self._poll_s, self._stop)
                if groups is not None:
                    self._accept(groups)
            except Exception:  # noqa: BLE001 - the fetch thread must outlive any single bad batch
                logger.exception("fetching a batch from Atropos failed; retrying")
                self._stop.wait(self._poll_s)

    def _accept(self, groups: list[dict]) -> None:
        limits = self._limits
        step = self.spool.next_step
        batch, rejections = codec.encode_batch(
            groups,
            batch_id=uuid.uuid4().hex[:12],
            step=step,
            vocab_size=limits.vocab_size,
            max_token_len=limits.max_token_len,
            fetched_unix_s=time.time(),
        )
        seen = time.monotonic()
        with self._cond:
            for group in groups:
                env_id = group.get("env_id") if isinstance(group, dict) else None
                if type(env_id) is int:
                    self._env_seen[env_id] = seen
            self._rejections_since_batch.update(r.reason for r in rejections)
        for rejection in rejections:
            self.rejections[rejection.reason] += 1
            logger.warning(
                "rejected a group from env %s: %s (%s)", rejection.env_id, rejection.reason, rejection.detail
            )
        self.counters["fetched"] += 1
        if batch is None:
            logger.warning("an Atropos batch had no valid group left; skipped")
            self.counters["skipped"] += 1
            return
        batch = self._attach_routed_experts(batch, limits)
        message = codec.batch_to_proto(batch)
        self.spool.put(message)  # durable before anyone can receive it
        with self._cond:
            self._ready.append(message)
            self._rejections_since_batch.clear()
            self._note_readiness()
            self._cond.notify_all()
