"""The bridge's durable spool: every batch fetched from Atropos stays on disk until the trainer acks it.

Atropos hands a batch out once and keeps no copy, so the bridge is the only place it survives. Each
batch is written (serialized ``TrainingBatch``: protobuf, never pickle) to ``<dir>/<step>-<id>.batch``
through a temporary file, fsync and rename before anyone can receive it, and deleted only on ack. A
restarted bridge finds every un-acked batch again, with its batch id, in step order. ``state.json``
keeps the next step to assign and the ids acked recently (so a repeated ack stays harmless).

The one window left is between Atropos answering ``/batch`` and the write here (milliseconds): a
crash inside it loses that batch, because Atropos's API offers no acknowledgement of its own.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from pathlib import Path

from atropos_megatron.bridge.v1 import bridge_pb2

_SUFFIX = ".batch"
_STATE = "state.json"
_REMEMBERED_ACKS = 1024


class SpoolError(RuntimeError):
    """A spool file that cannot be read back (corrupt or from another tool)."""


class BatchSpool:
    """Thread-safe store of un-acknowledged batches in one directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        state = self._read_state()
        self.next_step: int = state.get("next_step", 0)
        self._acked: deque[str] = deque(state.get("acked", []), maxlen=_REMEMBERED_ACKS)
        for path in self.directory.glob(f"*{_SUFFIX}"):
            batch_id = path.stem.split("-", 1)[1]
            self._files[batch_id] = path
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()  # a write that never finished: its batch was never handed out

    def pending(self) -> list[bridge_pb2.TrainingBatch]:
        """Every spooled (un-acked) batch, oldest step first."""
        with self._lock:
            paths = sorted(self._files.values())
        return [self._load(path) for path in paths]

    def put(self, batch: bridge_pb2.TrainingBatch) -> None:
        """Store ``batch`` durably (returns once it is on disk) and advance ``next_step`` past it."""
        path = self.directory / f"{batch.step:012d}-{batch.batch_id}{_SUFFIX}"
        _write_atomically(path, batch.SerializeToString())
        with self._lock:
            self._files[batch.batch_id] = path
            self.next_step = max(self.next_step, batch.step + 1)
            self._write_state()

    def ack(self, batch_id: str) -> bool:
        """Delete an acknowledged batch. False if the id was never spooled here (acked twice is fine)."""
        with self._lock:
            path = self._files.pop(batch_id, None)
            if path is None:
                return batch_id in self._acked
            path.unlink(missing_ok=True)
            self._acked.append(batch_id)
            self._write_state()
            return True

    def __contains__(self, batch_id: str) -> bool:
        with self._lock:
            return batch_id in self._files

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def set_next_step(self, step: int) -> None:
        """Count steps from ``step`` (the trainer's resume step) unless spooled batches are further on."""
        with self._lock:
            self.next_step = max(step, self.next_step if self._files else step)
            self._write_state()

    def _load(self, path: Path) -> bridge_pb2.TrainingBatch:
        try:
            return bridge_pb2.TrainingBatch.FromString(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any decode failure means the file is unusable
            raise SpoolError(f"cannot read spooled batch {path}: {exc}") from exc

    def _read_state(self) -> dict:
        path = self.directory / _STATE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SpoolError(f"{path} is corrupt: {exc}") from exc

    def _write_state(self) -> None:
        state = {"next_step": self.next_step, "acked": list(self._acked)}
        _write_atomically(self.directory / _STATE, json.dumps(state).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable only once the directory is synced
    finally:
        os.close(directory)
