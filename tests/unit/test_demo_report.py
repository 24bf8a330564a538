"""The demo's report: summary numbers and the reward-curve PNG from a synthetic metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from atropos_megatron.demo import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, rewards, *, extra_lines=()):
    lines = [
        json.dumps(
            {
                "step": step,
                "reward/mean": reward,
                "reward/std": 0.1,
                "time/step_s": 1.0 + step / 100,
                "perf/tokens_per_s": 500.0,
                "grpo/clip_frac": 0.0,
            }
        )
        for step, reward in enumerate(rewards, start=1)
    ]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def test_summary_compares_the_first_and_last_five_steps(tmp_path):
    rewards = [0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8]
    records = report.read_metrics(_write_metrics(tmp_path / "metrics.jsonl", rewards))
    summary = report.summarize_rewards(records, window=5)
    assert summary.steps == summary.last_step == 13
    assert summary.first_mean == pytest.approx(0.1)
    assert summary.last_mean == pytest.approx(0.8)
    assert summary.gain == pytest.approx(0.7)
    assert summary.best_rolling_mean == pytest.approx(0.8)
    assert summary.step_s_median == pytest.approx(1.07)
    text = report.format_summary(summary, wall_s=150)
    assert "0.100 -> last 5 steps 0.800 (+0.700)" in text and "2.5 min" in text


def test_a_partial_last_line_and_a_rewritten_step_are_handled(tmp_path):
    path = _write_metrics(
        tmp_path / "metrics.jsonl",
        [0.2, 0.4],
        extra_lines=['{"step": 2, "reward/mean": 0.5}', '{"step": 3, "reward/me'],  # resume; half-written
    )
    records = report.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["reward/mean"] == 0.5  # the last record of a step wins
    summary = report.summarize_rewards(records, window=5)
    assert summary.first_mean == summary.last_mean == pytest.approx(0.35)
    assert summary.step_s_median == pytest.approx(1.01)  # only step 1 still has a time


def test_rolling_mean_is_trailing_and_covers_every_point():
    assert report.rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_no_reward_is_an_error_not_a_zero(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.3}) + "\n")
    records = report.read_metrics(path)
    with pytest.raises(ValueError, match="reward/mean"):
        report.summarize_rewards(records)
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot_reward_curve(records, tmp_path / "curve.png")


def test_reward_curve_png_is_written(tmp_path):
    rewards = [0.1 + 0.02 * i for i in range(40)]
    records = report.read_metrics(_write_metrics(tmp_path / "metrics.jsonl", rewards))
    path = report.plot_reward_curve(records, tmp_path / "out" / "reward_curve.png", title="test")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # Without reward/std the band is left out, the plot still comes.
    bare = [{"step": r["step"], "reward/mean": r["reward/mean"]} for r in records]
    assert report.plot_reward_curve(bare, tmp_path / "bare.png").read_bytes().startswith(PNG_MAGIC)
