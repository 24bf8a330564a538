"""What rank 0 shows and records of a run: the progress bar, the log line per step, the metric sinks.

Counters (``count``) are for events that are rare and worth a number on the dashboards, such as a
weight push that failed; they are added to the next logged step and keep their running totals.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from atropos_megatron.config import TrainConfig
from atropos_megatron.trainer.metrics import MetricsLogger, format_step_line

logger = logging.getLogger(__name__)


class RunOutput:
    """Rank 0's progress bar, per-step log line and metric sinks (JSONL, TensorBoard, wandb)."""

    def __init__(self, cfg: TrainConfig, *, start_step: int) -> None:
        self.total_steps = cfg.steps
        self.metrics = MetricsLogger(
            cfg.logging,
            run_name=Path(cfg.logging.run_dir).name,
            config=dataclasses.asdict(cfg),
            resume_step=start_step + 1 if start_step else None,
        )
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)
        self._counters: dict[str, int] = {}

    def count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1

    def set_total(self, name: str, total: int) -> None:
        """A running total kept elsewhere (e.g. by the bridge), logged with every later step."""
        self._counters[name] = total

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        metrics = {**metrics, **self._counters}
        self.metrics.log(step, metrics)
        line = format_step_line(step, self.total_steps, metrics)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(line.split(" | ", 1)[-1], refresh=True)
        if not self.bar.disable and self.bar.fp is not None and not self.bar.fp.isatty():
            logger.info(line)  # a file or pipe gets one readable line per step instead of a redrawn bar

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
