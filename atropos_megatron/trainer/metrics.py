"""Rank 0's metric sinks: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

The trainer calls :meth:`MetricsLogger.log` once per optimizer step with already-reduced scalars under
slash-namespaced keys (``reward/mean``, ``grpo/pg_loss``, ``time/step_s``). The JSONL file is the
record the demo report and tests read back with :func:`read_metrics`; TensorBoard and wandb are views.
Logging never stops training: a sink that fails to start or to write is warned about once and dropped.
This module does not reduce across ranks (the caller does), keeps no global state, imports neither
torch nor wandb until a sink needs them, and reads no environment variable itself (wandb honours
``WANDB_MODE``/``WANDB_API_KEY`` on its own). :func:`format_step_line` renders the progress line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atropos_megatron.config import LoggingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
WANDB_ID_FILE = "wandb_id"
RESERVED_KEYS = ("step", "time_unix")
"""Written by the logger on every JSONL line; a metric may not use them."""

Number = int | float


class MetricsLogger:
    """Writes each logged step to ``<run_dir>/metrics.jsonl`` and to the optional sinks.

    Interval: every sink honours ``log_interval_steps`` in the same way, so the three views show the
    same points. A step is written when ``step % log_interval_steps == 0``, when it is the first step
    this logger sees, or when ``force=True``; the last step passed to :meth:`log` is written by
    :meth:`close` if the interval skipped it. Skipped steps are sampled away, not averaged, and cost
    nothing (their tensors are not even read).

    Resume: ``resume_step=S`` keeps the lines with ``step < S`` (an atomic rewrite that also drops a
    line cut off by a crash), purges TensorBoard events at ``step >= S`` and continues the wandb run
    whose id is stored in ``<run_dir>/wandb_id``. ``resume_step=None`` starts a fresh record: an old
    ``metrics.jsonl`` is emptied and a new wandb id is drawn.

    Values: Python/numpy/torch scalars (``.item()``); ints stay ints, bools become 0/1. A NaN or inf
    is written to JSONL as ``null`` (strict JSON), counted in :attr:`nonfinite_counts` and warned
    about the first time per key; TensorBoard and wandb receive it as is.

    Build it on rank 0 only. Not thread-safe.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        run_name: str,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        """Open the sinks.

        Args:
            cfg: the run's ``logging`` section.
            run_name: the wandb run name (and a label in the TensorBoard config summary).
            config: the resolved configuration as plain containers (e.g.
                ``dataclasses.asdict(train_cfg)``): wandb's run config and a TensorBoard text summary.
            resume_step: the first step number this run will log when it continues an earlier run
                (the lines from there on are dropped), or None for a fresh run.
        """
        self.interval = cfg.log_interval_steps
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.nonfinite_counts: dict[str, int] = {}
        """Per key, how many logged values were NaN/inf (written as null to JSONL)."""
        self._seen_any = False
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._closed = False

        if resume_step is not None and self.metrics_path.exists():
            kept = _truncate_jsonl(self.metrics_path, before_step=resume_step)
            logger.info(
                "metrics: resuming %s at step %d (%d lines kept)", self.metrics_path, resume_step, kept
            )
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        # Raw fd + one os.write per line: no user-space buffer to lose in a crash, and no line split
        # across two writes (a buffered text file writes lines longer than its buffer in pieces).
        self._fd: int | None = os.open(self.metrics_path, flags, 0o644)

        config_dict = dict(config or {})
        self._tb = None
        if cfg.tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, run_name, config_dict, resume_step)
        self._wandb = None
        if cfg.wandb_project:
            id_path = self.run_dir / WANDB_ID_FILE
            self._wandb = _open_wandb(cfg.wandb_project, run_name, id_path, resume_step, config_dict)

    # --------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> bool:
        """Record one optimizer step's metrics; returns whether they were written now.

        Args:
            step: the optimizer step the metrics belong to (x axis everywhere).
            metrics: ``{"reward/mean": 0.42, ...}``; values are numbers or 0-d tensors/arrays.
            force: write even if the interval would skip this step.

        Raises:
            ValueError: a key is reserved (``step``, ``time_unix``) or the logger is closed.
            TypeError: a value is not a number (a caller bug, so it is not swallowed).
        """
        if self._closed:
            raise ValueError("MetricsLogger.log() after close()")
        step = int(step)
        for key, value in metrics.items():
            _check_metric(key, value)  # now, even for a skipped step: a caller bug should fail fast
        if force or not self._seen_any or step % self.interval == 0:
            self._seen_any = True
            self._pending = None
            self._write(step, metrics)
            return True
        self._pending = (step, dict(metrics))
        return False

    def close(self, *, failed: bool = False) -> None:
        """Write a step the interval skipped last, then flush and close every sink (idempotent).

        Args:
            failed: the run ended with an error (wandb marks the run as failed).
        """
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                self._write(*pending)
        finally:
            self._close_sinks(failed)

    def _close_sinks(self, failed: bool) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _guard("metrics.jsonl", lambda: os.fsync(fd))
            os.close(fd)
        if self._tb is not None:
            _guard("tensorboard", self._tb.close)
            self._tb = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            _guard("wandb", lambda: run.finish(exit_code=1 if failed else 0))
        if self.nonfinite_counts:
            logger.warning("metrics: non-finite values were logged as null: %s", self.nonfinite_counts)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    # --------------------------------------------------------------------------------------------

    def _write(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = {key: _to_number(key, value) for key, value in metrics.items()}
        record: dict[str, Any] = {"step": step, "time_unix": round(time.time(), 3)}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                if key not in self.nonfinite_counts:
                    logger.warning("metrics: %s = %s at step %d (written as null)", key, value, step)
                self.nonfinite_counts[key] = self.nonfinite_counts.get(key, 0) + 1
                value = None
            record[key] = value
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        if self._fd is not None and not _guard("metrics.jsonl", lambda: _write_all(self._fd, line)):
            fd, self._fd = self._fd, None
            _guard("metrics.jsonl", lambda: os.close(fd))
        if self._tb is not None and not _guard("tensorboard", lambda: _tb_write(self._tb, step, values)):
            self._tb = None
        if self._wandb is not None and not _guard("wandb", lambda: self._wandb.log(values, step=step)):
            self._wandb = None


def _check_metric(key: str, value: Any) -> None:
    if key in RESERVED_KEYS:
        raise ValueError(f"metric key {key!r} is reserved (the logger writes {', '.join(RESERVED_KEYS)})")
    if not isinstance(value, int | float) and not hasattr(value, "item"):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")


def _to_number(key: str, value: Any) -> Number:
    if hasattr(value, "item") and not isinstance(value, int | float):
        value = value.item()  # 0-d torch tensor / numpy scalar -> Python int or float
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")


def _write_all(fd: int, line: str) -> None:
    data = line.encode()
    # A regular file takes the whole line in one write; the loop only matters on a short write
    # (disk full), where the rest is better than a silently cut line.
    while data:
        data = data[os.write(fd, data) :]


def _guard(sink: str, action) -> bool:
    """Run one sink action; on any error warn once and report failure so the sink is dropped."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - logging must never take training down
        logger.warning("metrics: %s disabled after error: %s: %s", sink, type(exc).__name__, exc)
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Sinks
# ------------------------------------------------------------------------------------------------


def _open_tensorboard(log_dir: Path, run_name: str, config: dict[str, Any], resume_step: int | None):
    """A SummaryWriter for ``log_dir``, or None with one warning if TensorBoard cannot start."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events at step >= it from older event files (TensorBoard honours the
        # SessionLog START it writes), so a resumed curve has no overlap. A fresh run purges from 0.
        writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step or 0)
        summary = json.dumps({"run_name": run_name, **config}, indent=2, default=str)
        # Indented four spaces: TensorBoard renders text as Markdown, and this keeps it verbatim.
        writer.add_text("config", "\n".join("    " + line for line in summary.splitlines()), resume_step or 0)
        writer.flush()
        return writer
    except Exception as exc:  # noqa: BLE001 - a missing/broken tensorboard must not stop training
        logger.warning("metrics: tensorboard disabled, could not start: %s: %s", type(exc).__name__, exc)
        return None


def _tb_write(writer, step: int, values: Mapping[str, Number]) -> None:
    for key, value in values.items():
        writer.add_scalar(key, value, global_step=step)
    writer.flush()


def _wandb_run_id(path: Path, *, reuse: bool) -> str:
    """The wandb run id kept in ``path``: the stored one when resuming, else a new one (stored)."""
    if reuse and path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:16]
    path.write_text(run_id + "\n")
    return run_id


def _open_wandb(project: str, run_name: str, id_path: Path, resume_step: int | None, config: dict[str, Any]):
    """A wandb run (``resume="allow"`` under the id in ``id_path``), or None with one warning."""
    try:
        import wandb
    except ImportError as exc:
        logger.warning("metrics: logging.wandb_project is set but wandb cannot be imported (%s)", exc)
        return None
    try:
        return wandb.init(
            project=project,
            name=run_name,
            id=_wandb_run_id(id_path, reuse=resume_step is not None),
            resume="allow",
            dir=str(id_path.parent),
            config=config,
            allow_val_change=True,  # a resumed run may change e.g. `steps`; keep the newest values
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, a broken install: keep training
        logger.warning("metrics: wandb disabled, init failed: %s: %s", type(exc).__name__, exc)
        return None


# ------------------------------------------------------------------------------------------------
# JSONL helpers
# ------------------------------------------------------------------------------------------------


class MetricsFollower:
    """Reads the step records appended to a ``metrics.jsonl`` since the last call, for a process that
    watches a run. It starts over when the file is replaced or shortened (a resumed trainer rewrites it
    atomically, keeping the steps before its checkpoint): the records then come again from the top."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            stat = self.path.stat()
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._inode, self._offset, self._partial = stat.st_ino, 0, b""
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        records = [_parse_line(line.decode(errors="replace")) for line in lines if line.strip()]
        return [r for r in records if r is not None and isinstance(r.get("step"), int)]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order.

    A last line cut off by a crash is skipped; a malformed line anywhere else raises. Non-finite
    values come back as None (``numpy.asarray(..., dtype=float)`` turns them into NaN).

    Args:
        path: the JSONL file.

    Returns:
        One dict per logged step: ``{"step": int, "time_unix": float, <metric>: number | None}``.

    Raises:
        ValueError: a line before the last is not a JSON object.
    """
    lines = Path(path).read_text().splitlines()
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        record = _parse_line(line)
        if record is None:
            if index == len(lines) - 1:
                logger.warning("metrics: ignoring a truncated last line in %s", path)
                continue
            raise ValueError(f"{path}:{index + 1}: not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _truncate_jsonl(path: Path, *, before_step: int) -> int:
    """Keep only the well-formed lines with ``step < before_step``; atomic (temp file + replace)."""
    kept = []
    for line in path.read_text().splitlines():
        record = _parse_line(line)
        if record is not None and isinstance(record.get("step"), int) and record["step"] < before_step:
            kept.append(line + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(kept)


# ------------------------------------------------------------------------------------------------
# Progress line
# ------------------------------------------------------------------------------------------------


def format_step_line(step: int, total_steps: int | None, metrics: Mapping[str, Any]) -> str:
    """A one-line summary of a step, for the progress bar postfix and the log.

    Example: ``step 12/100 | reward 0.512±0.231 | loss -0.01234 | kl_ref 0.0012 | 1.23k tok/s |
    4.56s (wait 0.12 compute 4.01 sync 0.43)``. Fields appear in that fixed order; a field whose
    keys are absent (or None) is omitted.

    Args:
        step: the step number shown.
        total_steps: the run's length, or None to show the step alone.
        metrics: the same dict passed to :meth:`MetricsLogger.log` (or a record of
            :func:`read_metrics`).
    """
    get = _getter(metrics)
    parts = [f"step {step}/{total_steps}" if total_steps is not None else f"step {step}"]
    reward, reward_std = get("reward/mean"), get("reward/std")
    if reward is not None:
        parts.append(f"reward {_num(reward)}" + (f"±{_num(reward_std)}" if reward_std is not None else ""))
    loss = _first(get, "grpo/loss", "grpo/pg_loss")
    if loss is not None:
        parts.append(f"loss {_num(loss)}")
    for label, key in (("kl_ref", "grpo/kl_ref"), ("rollout_kl", "rollout/kl")):
        value = get(key)  # two different quantities: to the reference model, to the inference engine
        if value is not None:
            parts.append(f"{label} {_num(value)}")
    tokens_per_s = get("perf/tokens_per_s")
    if tokens_per_s is not None:
        parts.append(f"{_si(tokens_per_s)} tok/s")
    split = [(name, get(f"time/{name}_s")) for name in ("wait", "compute", "sync")]
    split_text = " ".join(f"{name} {value:.2f}" for name, value in split if value is not None)
    step_s = get("time/step_s")
    if step_s is not None:
        parts.append(f"{step_s:.2f}s" + (f" ({split_text})" if split_text else ""))
    elif split_text:
        parts.append(split_text)
    return " | ".join(parts)


def _getter(metrics: Mapping[str, Any]):
    def get(key: str) -> float | None:
        value = metrics.get(key)
        if value is None:
            return None
        return float(value.item() if hasattr(value, "item") else value)

    return get


def _first(get, *keys: str) -> float | None:
    for key in keys:
        value = get(key)
        if value is not None:
            return value
    return None


def _num(value: float) -> str:
    """Four significant digits; small magnitudes in scientific notation (``1.2e-05``)."""
    return f"{value:.4g}"


def _si(value: float) -> str:
    """``1234.5 -> '1.23k'``: throughput at a glance."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"
