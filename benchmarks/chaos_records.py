"""What a chaos run left behind, read back: the spool ledger, the final checkpoint's batch history, the
bridge's logs, the API's queue, the reward curve; and the run's table.

Pure reading and formatting: ``benchmarks/chaos.py`` runs the processes and calls these at the end.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


def read_ledger(path: Path) -> dict[str, Any]:
    """The spool ledger's batches: ``spooled`` (id -> groups), ``handed_out`` and ``acked`` (id sets)."""
    spooled: dict[str, int] = {}
    handed_out: set[str] = set()
    acked: set[str] = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a last line cut off by a SIGKILL (the spool drops it on its next start)
            event, batch_id = record.get("event"), record.get("batch_id")
            if event == "spooled":
                spooled[batch_id] = int(record.get("groups", 0))
            elif event == "handed_out":
                handed_out.add(batch_id)
            elif event == "acked":
                acked.add(batch_id)
    return {"spooled": spooled, "handed_out": handed_out, "acked": acked}


def read_final_history(checkpoint_dir: Path) -> tuple[list[str], int | None]:
    """The newest checkpoint's ``batch_history`` and step (from its sidecar), or ``([], None)``."""
    from atropos_megatron.trainer.checkpoint import progress_from_dict, resolve
    from atropos_megatron.weights.dist_checkpoint import SIDECAR

    path = resolve(checkpoint_dir, "latest")
    if path is None or not (path / SIDECAR).is_file():
        return [], None
    progress = progress_from_dict(json.loads((path / SIDECAR).read_text())["progress"])
    return list(progress.batch_history), progress.step


def bridge_log_counts(log_dir: Path) -> tuple[int, int]:
    """Groups the bridge rejected, and the times it reset a stuck API, over all its lives' logs."""
    rejected = resets = 0
    for log in sorted(log_dir.glob("bridge.*.log")):
        text = log.read_text(errors="replace")
        rejected += text.count("rejected a group from env")
        resets += text.count("resetting it (those groups are dropped)")
    return rejected, resets


def read_api_queue(url: str) -> int | None:
    """Groups queued in the Atropos API (``GET /status``), or None if it does not answer."""
    try:
        return int(httpx.get(f"{url}/status", timeout=5).json()["queue_size"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def read_rewards(metrics_path: Path, run_dir: Path, *, min_gain: float) -> dict[str, Any]:
    from atropos_megatron.demo import report

    window = 5
    records = report.read_metrics(metrics_path) if metrics_path.exists() else []
    try:
        summary = report.summarize_rewards(records, window=window)
    except ValueError:
        return {
            "reward_first5": None,
            "reward_last5": None,
            "reward_best5": None,
            "reward_rising": False,
            "steps_logged": 0,
        }
    report.plot_reward_curve(records, run_dir / "reward_curve.png", window=window, title="chaos run")
    return {
        "reward_first5": round(summary.first_mean, 4),
        "reward_last5": round(summary.last_mean, 4),
        "reward_best5": round(summary.best_rolling_mean, 4),
        "reward_rising": summary.gain >= min_gain,
        "steps_logged": summary.last_step,
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    done = [v for v in values if v is not None]
    if not done:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(done), 2), "max": round(max(done), 2)}


def format_table(report: dict[str, Any]) -> str:
    def seconds(spread: dict[str, float | None]) -> str:
        if spread["median"] is None:
            return "-"
        return f"{spread['median']:.1f} / {spread['max']:.1f}"

    lines = [
        "",
        f"chaos run: {report['minutes']:g} min, seed {report['seed']}, kills every "
        f"{report['interval_s'][0]:g}-{report['interval_s'][1]:g} s, wall {report['wall_s'] / 60:.1f} min "
        f"on {report['cpus']} CPUs (1-min load {report['load_avg_1m_start_end'][0]:.1f} at the start, "
        f"{report['load_avg_1m_start_end'][1]:.1f} at the end)",
        "",
        f"{'role':<12} {'kills':>5} {'TERM/KILL':>9} {'restarts':>8} {'crashes':>7} "
        f"{'recover s (med/max)':>20} {'next step s (med/max)':>22}",
    ]
    for name in report["kills_by_role"]:
        kills, terms = report["kills_by_role"][name], report["sigterms_by_role"][name]
        lines.append(
            f"{name:<12} {kills:>5} {f'{terms}/{kills - terms}':>9} {report['restarts_by_role'][name]:>8} "
            f"{report['crashes_by_role'][name]:>7} {seconds(report['recover_s'][name]):>20} "
            f"{seconds(report['next_step_s'][name]):>22}"
        )
    lines.append(f"{'total':<12} {report['kills']:>5}")
    lost_api = report["groups_lost_in_api"]
    lines += [
        "",
        f"groups posted by the environment   {report['groups_posted']}  "
        f"(and {report['groups_refused']} in posts that failed: API down; the environment retries)",
        f"groups received by the bridge      {report['groups_received']}",
        f"groups still queued in the API     {report['groups_queued_at_end']}",
        f"groups rejected by the bridge      {report['groups_rejected']}",
        f"groups lost inside the Atropos API {lost_api if lost_api is not None else '?'}  (the API keeps its "
        f"queue in memory: a killed API loses it; queued at its kills: {report['api_queue_at_kills']}; "
        f"resets by the bridge: {report['api_resets_by_bridge']})",
        f"batches handed out                 {report['batches_handed_out']}  "
        f"(acknowledged {report['batches_acked']}, "
        f"unacknowledged at the end {report['batches_unacked_at_end']})",
        f"batches lost                       {report['batches_lost']}",
        f"batches duplicated                 {report['batches_duplicated']}",
        f"steps trained                      {report['steps_trained']}  (steps trained again after "
        f"resumes: {report['steps_redone']})",
        f"reward                             first 5 steps {_fmt(report['reward_first5'])} -> last 5 "
        f"{_fmt(report['reward_last5'])} ({'rising' if report['reward_rising'] else 'NOT rising'}; "
        f"best 5-step mean {_fmt(report['reward_best5'])})",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    lines += [f"problem: {p}" for p in report["problems"]] or ["every killed role recovered; nothing lost"]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
