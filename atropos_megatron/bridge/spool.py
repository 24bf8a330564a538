"""The bridge's durable spool: every batch stays on disk until a checkpoint that includes it is written.

Atropos hands a batch out once and keeps no copy, so the bridge is the only place it survives. A
batch's life here::

    queued ──GetBatch──▶ handed out ──AckBatch(trained_step)──▶ acknowledged ──CommitCheckpoint(N)──▶ committed
                                                                 (N >= trained_step; the file is deleted)

Acknowledged means the trainer applied the batch's update (and pushed the weights); committed means a
checkpoint holding that update is durably on disk. Until then a crash of the trainer can still lose
the update (a SIGKILL leaves only the last checkpoint), so an acknowledged batch is kept and served
again, same id, to a trainer that resumes from an earlier checkpoint (:meth:`BatchSpool.replay`).
The spool therefore holds at most ``checkpoint.save_interval_steps`` acknowledged batches, plus the
queued and handed-out ones.

Files in the directory:

- ``<step:012d>-<batch_id>.batch``: the batch, a serialized ``TrainingBatch`` (protobuf, never
  pickle), written to a temporary file, fsynced and renamed before anyone can receive it. The file
  *is* the record that the batch exists.
- ``ledger.jsonl``: one JSON line per transition (``handed_out``, ``acked``, ``committed``,
  ``next_step``; ``spooled`` for the record), appended and fsynced before the transition takes effect.
  Replaying it on start restores every batch's state. It is never rewritten, so it is also the run's
  audit trail of which batch was trained at which step (about 300 bytes per batch).

The one window left is between Atropos answering ``/batch`` and the batch file's rename (milliseconds):
a crash inside it loses that batch, because Atropos's API offers no acknowledgement of its own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from atropos_megatron.bridge.v1 import bridge_pb2
from atropos_megatron.durable import write_atomically

logger = logging.getLogger(__name__)

_SUFFIX = ".batch"
LEDGER = "ledger.jsonl"
_LEGACY_STATE = "state.json"  # the spool's state before the ledger (next_step only is still read)
_REMEMBERED_COMMITS = 1024  # committed ids remembered so that a late or repeated ack stays harmless

QUEUED, HANDED_OUT, ACKED = "queued", "handed_out", "acked"


class SpoolError(RuntimeError):
    """A spool file that cannot be read back (corrupt or from another tool)."""


@dataclass
class SpooledBatch:
    """One batch on disk and where it stands."""

    batch_id: str
    step: int
    path: Path
    state: str = QUEUED
    trained_step: int = 0
    """The trainer's step after it trained this batch (set by the ack)."""


class BatchSpool:
    """Thread-safe store of uncommitted batches in one directory (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._batches: dict[str, SpooledBatch] = {}
        self._committed: deque[str] = deque(maxlen=_REMEMBERED_COMMITS)
        self.next_step = 0
        self.committed_step = 0
        """The newest checkpoint step the trainer reported as durable."""
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()  # a write that never finished: its batch was never handed out
        for path in self.directory.glob(f"*{_SUFFIX}"):
            step, _, batch_id = path.stem.partition("-")
            self._batches[batch_id] = SpooledBatch(batch_id, int(step), path)
            self.next_step = max(self.next_step, int(step) + 1)
        self._read_legacy_state()
        self._replay_ledger()
        self._ledger_fd = os.open(self.directory / LEDGER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    # -- reading -----------------------------------------------------------------------------------

    def unacked(self) -> list[bridge_pb2.TrainingBatch]:
        """Every queued or handed-out batch, oldest step first (what a restarted bridge serves)."""
        return self._load_all(b for b in self._batches_snapshot() if b.state != ACKED)

    def replay(self, starting_step: int) -> list[bridge_pb2.TrainingBatch]:
        """What a trainer whose model holds the updates up to ``starting_step`` must be served first:
        the acknowledged batches it trained after that step, in training order, then the handed-out
        ones (oldest first) whose acknowledgement never came."""

        def trained_after(batch: SpooledBatch) -> bool:  # a replayed batch keeps its earlier trained_step
            return batch.trained_step > starting_step

        batches = [
            b
            for b in self._batches_snapshot()
            if b.state == HANDED_OUT or (b.state == ACKED and trained_after(b))
        ]
        batches.sort(key=lambda b: (0, b.trained_step) if trained_after(b) else (1, b.step))
        return self._load_all(batches)

    def counts(self) -> dict[str, int]:
        """Batches per state, and the bytes the spool holds on disk."""
        with self._lock:
            batches = list(self._batches.values())
        counts = {state: sum(b.state == state for b in batches) for state in (QUEUED, HANDED_OUT, ACKED)}
        counts["bytes"] = sum(_size(b.path) for b in batches)
        return counts

    # -- transitions -------------------------------------------------------------------------------

    def put(self, batch: bridge_pb2.TrainingBatch) -> None:
        """Store ``batch`` durably (returns once it is on disk) and advance ``next_step`` past it."""
        path = self.directory / f"{batch.step:012d}-{batch.batch_id}{_SUFFIX}"
        data = batch.SerializeToString()
        write_atomically(path, data)
        with self._lock:
            self._batches[batch.batch_id] = SpooledBatch(batch.batch_id, batch.step, path)
            self.next_step = max(self.next_step, batch.step + 1)
            self._append(
                "spooled",
                batch_id=batch.batch_id,
                step=batch.step,
                groups=batch.num_groups,
                sequences=batch.num_sequences,
                bytes=len(data),
            )

    def hand_out(self, batch_id: str) -> None:
        """Record that ``batch_id`` went to the trainer (it is served again if never acknowledged)."""
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None and batch.state != HANDED_OUT:
                self._append(HANDED_OUT, batch_id=batch_id)
                batch.state = HANDED_OUT

    def ack(self, batch_id: str, trained_step: int) -> bool:
        """The trainer applied ``batch_id``'s update at ``trained_step``; False if the id is unknown.

        Acknowledging again (a retried call, or a replayed batch trained anew) is harmless. A batch
        acknowledged at or before the committed step is committed at once.
        """
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return batch_id in self._committed
            if batch.state != ACKED or batch.trained_step != trained_step:
                self._append(ACKED, batch_id=batch_id, trained_step=trained_step)
                batch.state, batch.trained_step = ACKED, trained_step
            if trained_step <= self.committed_step:
                self._commit_locked(self.committed_step)
            return True

    def commit(self, step: int) -> int:
        """A checkpoint at ``step`` is durable: delete the batches acknowledged at or before it.

        Returns how many batches were committed now. A step older than the committed one changes
        nothing (checkpoints only move forward).
        """
        with self._lock:
            return self._commit_locked(step)

    def set_next_step(self, step: int) -> None:
        """Count steps from ``step`` (the trainer's resume step) unless spooled batches are further on."""
        with self._lock:
            self.next_step = max(step, self.next_step if self._batches else step)
            self._append("next_step", step=self.next_step)

    def close(self) -> None:
        with self._lock:
            if self._ledger_fd is not None:
                os.close(self._ledger_fd)
                self._ledger_fd = None

    # -- internals ---------------------------------------------------------------------------------

    def _commit_locked(self, step: int) -> int:
        self.committed_step = max(self.committed_step, step)
        done = [
            b for b in self._batches.values() if b.state == ACKED and b.trained_step <= self.committed_step
        ]
        if not done:
            return 0
        self._append("committed", step=self.committed_step, batch_ids=[b.batch_id for b in done])
        for batch in done:
            del self._batches[batch.batch_id]
            self._committed.append(batch.batch_id)
            batch.path.unlink(missing_ok=True)
        return len(done)

    def _append(self, event: str, **fields) -> None:
        """One ledger line, on disk before the caller changes any state (call with the lock held)."""
        if self._ledger_fd is None:
            raise SpoolError(f"the spool in {self.directory} is closed")
        line = json.dumps({"event": event, **fields, "time_unix": round(time.time(), 3)}) + "\n"
        os.write(self._ledger_fd, line.encode())
        os.fsync(self._ledger_fd)

    def _replay_ledger(self) -> None:
        path = self.directory / LEDGER
        if not path.is_file():
            return
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a last line cut off by a crash: its transition never took effect
            logger.warning("%s: dropping an incomplete last line", path)
            os.truncate(path, complete)
        for number, raw in enumerate(data[:complete].splitlines(), start=1):
            try:
                self._apply(json.loads(raw))
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
                raise SpoolError(f"{path}:{number} is corrupt: {exc}") from exc
        for batch in [b for b in self._batches.values() if b.state == ACKED]:
            if batch.trained_step <= self.committed_step:  # committed, but the file outlived a crash
                del self._batches[batch.batch_id]
                batch.path.unlink(missing_ok=True)

    def _apply(self, record: dict) -> None:
        event = record.get("event")
        batch = self._batches.get(record.get("batch_id", ""))
        if event == HANDED_OUT and batch is not None:
            batch.state = HANDED_OUT
        elif event == ACKED and batch is not None:
            batch.state, batch.trained_step = ACKED, int(record["trained_step"])
        elif event == "committed":
            self.committed_step = max(self.committed_step, int(record["step"]))
            self._committed.extend(record.get("batch_ids", ()))
        elif event == "next_step":
            self.next_step = max(self.next_step, int(record["step"]))

    def _read_legacy_state(self) -> None:
        path = self.directory / _LEGACY_STATE
        if path.is_file():
            try:
                self.next_step = max(self.next_step, int(json.loads(path.read_text()).get("next_step", 0)))
            except (json.JSONDecodeError, ValueError) as exc:
                raise SpoolError(f"{path} is corrupt: {exc}") from exc

    def _batches_snapshot(self) -> list[SpooledBatch]:
        with self._lock:
            return sorted(self._batches.values(), key=lambda b: b.step)

    def _load_all(self, batches) -> list[bridge_pb2.TrainingBatch]:
        return [self._load(batch.path) for batch in batches]

    def _load(self, path: Path) -> bridge_pb2.TrainingBatch:
        try:
            return bridge_pb2.TrainingBatch.FromString(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any decode failure means the file is unusable
            raise SpoolError(f"cannot read spooled batch {path}: {exc}") from exc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
