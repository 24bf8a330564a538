"""What a run learned, from its ``metrics.jsonl``: a reward summary and a reward-curve PNG.

The trainer writes one JSON object per logged step (``"step"``, 1-based, ``"reward/mean"``,
``"reward/std"``, ``"time/step_s"``, ...). This module only reads that file: it can summarise a run
that is still going (a half-written last line is skipped) or one that finished long ago.

The plot is drawn with matplotlib's Agg canvas directly (no pyplot), so it works without a display
and leaves no global backend state behind.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REWARD_KEY = "reward/mean"
REWARD_STD_KEY = "reward/std"


@dataclass(frozen=True)
class RewardSummary:
    """First and last ``window`` steps' mean reward of a run, plus timing."""

    steps: int
    """Steps with a reward in the metrics (the last step number when none is missing)."""
    last_step: int
    window: int
    first_mean: float
    last_mean: float
    best_rolling_mean: float
    """Highest ``window``-step rolling mean anywhere in the run."""
    step_s_median: float | None
    """Median ``time/step_s`` (None when the trainer did not log it)."""

    @property
    def gain(self) -> float:
        """``last_mean - first_mean``: what the demo promises is >= 0.4 on its task."""
        return self.last_mean - self.first_mean


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file with a numeric ``step``, one per step (the last one written wins,
    as after a resume), sorted by step. A line that is not complete JSON is skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def reward_series(records: Iterable[dict[str, Any]]) -> tuple[list[int], list[float], list[float | None]]:
    """``(steps, rewards, stds)`` of the records that carry a finite ``reward/mean`` (a std is None
    where the record has none)."""
    steps, rewards, stds = [], [], []
    for record in records:
        value = record.get(REWARD_KEY)
        if _is_number(value):
            steps.append(record["step"])
            rewards.append(float(value))
            std = record.get(REWARD_STD_KEY)
            stds.append(float(std) if _is_number(std) else None)
    return steps, rewards, stds


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start, so it has every point)."""
    return [statistics.fmean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def summarize_rewards(records: Sequence[dict[str, Any]], *, window: int = 5) -> RewardSummary:
    """Summary of the records' rewards; ValueError when there is no reward at all."""
    steps, rewards, _ = reward_series(records)
    if not rewards:
        raise ValueError(f"no step has a numeric {REWARD_KEY!r}")
    times = [r["time/step_s"] for r in records if _is_number(r.get("time/step_s"))]
    return RewardSummary(
        steps=len(rewards),
        last_step=steps[-1],
        window=window,
        first_mean=statistics.fmean(rewards[:window]),
        last_mean=statistics.fmean(rewards[-window:]),
        best_rolling_mean=max(rolling_mean(rewards, window)[min(window, len(rewards)) - 1 :]),
        step_s_median=statistics.median(times) if times else None,
    )


def plot_reward_curve(
    records: Sequence[dict[str, Any]], path: str | Path, *, window: int = 5, title: str | None = None
) -> Path:
    """Write a PNG of the mean reward per step (with its +-std band when logged) and its rolling mean."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, rewards, stds = reward_series(records)
    if not rewards:
        raise ValueError(f"no step has a numeric {REWARD_KEY!r}: nothing to plot")
    figure = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if all(s is not None for s in stds):
        low = [r - s for r, s in zip(rewards, stds, strict=True)]  # type: ignore[operator]
        high = [r + s for r, s in zip(rewards, stds, strict=True)]  # type: ignore[operator]
        axes.fill_between(steps, low, high, alpha=0.15, color="tab:blue", label="± std within the batch")
    axes.plot(steps, rewards, marker="o", markersize=3, linewidth=1, color="tab:blue", label="mean reward")
    axes.plot(
        steps, rolling_mean(rewards, window), linewidth=2.5, color="tab:orange", label=f"{window}-step mean"
    )
    axes.set_xlabel("trainer step")
    axes.set_ylabel("reward")
    axes.set_ylim(-0.02, 1.02 if max(rewards) <= 1 else max(rewards) * 1.05)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title or "GRPO reward per step")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def format_summary(summary: RewardSummary, *, wall_s: float | None = None) -> str:
    """A few human lines: reward before and after, and time."""
    w = summary.window
    lines = [
        f"steps trained:  {summary.last_step}",
        f"reward:         first {w} steps {summary.first_mean:.3f} -> last {w} steps "
        f"{summary.last_mean:.3f} ({summary.gain:+.3f})",
    ]
    if summary.step_s_median is not None:
        lines.append(f"trainer step:   {summary.step_s_median:.2f} s (median)")
    if wall_s is not None:
        lines.append(f"wall time:      {wall_s / 60:.1f} min")
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
