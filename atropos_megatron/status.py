"""``atropos-megatron status --config C``: one view of a run, and why it waits if it does.

Reads the run's config, asks the bridge (``bridge.address``) for its status, which carries the bridge's
own view of the Atropos API (queue, environments), and reads the trainer's last step from
``<logging.run_dir>/metrics.jsonl``. Prints the Atropos queue, each environment, the bridge's
counters, each inference server, the trainer, then the named stalls (``bridge/stalls.py``).

Exit status: 0 healthy, 1 a stall is named, 2 the config is bad or the bridge cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_HEALTHY, EXIT_STALLED, EXIT_UNREACHABLE = 0, 1, 2

_EPILOG = """\
what it shows:
  atropos    the API's queue (groups, batches formed, batch size) and every registered environment
             (groups queued, how long it has been quiet, its inference weight share)
  bridge     batches fetched / served / acknowledged / retained, committed step, rejected groups by
             reason, spool size
  inference  each server's health and weight_version
  trainer    last step, its age, tokens/s (metrics.jsonl) and the last acknowledged batch
  stalls     why no batch comes, each named by a stable code:
               no_groups               environments post nothing
               quiet_env_with_minimum  an env with min_batch_allocation posts nothing and blocks batches
               batch_too_large         the batch size is more than environments produce in a minute
               groups_rejected         groups arrive but the bridge rejects them (the main reason)
               groups_unpackable       mixed group sizes that never add up to a batch
               atropos_unreachable, trainer_not_registered, servers_behind

exit status: 0 healthy, 1 a stall is named, 2 bad config or bridge unreachable

examples:
  atropos-megatron status --config runs/demo/config.yaml
  atropos-megatron status --config my.yaml bridge.address=10.0.0.5:50051 --json | jq .stalls
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atropos-megatron status",
        description="One view of a running job: the Atropos API's queue and environments, the bridge, "
        "the inference servers and the trainer, and the named reason when no batch comes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the run's YAML config (as given to train/bridge)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the bridge (default 10)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the run's status; returns the exit status (0 healthy, 1 stalled, 2 unreachable/bad config)."""
    args = build_parser().parse_args(argv)
    from atropos_megatron.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: bad config: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        status = _bridge_status(cfg, args.timeout)
    except Exception as exc:  # noqa: BLE001 - grpc errors, TLS files, anything: say so and exit 2
        detail = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)
        print(f"error: the bridge at {cfg.bridge.address} cannot be reached ({detail})", file=sys.stderr)
        return EXIT_UNREACHABLE
    trainer = trainer_summary(Path(cfg.logging.run_dir) / "metrics.jsonl")
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(
            json.dumps(
                {
                    "healthy": not status.stalls,
                    "bridge_address": cfg.bridge.address,
                    "bridge": MessageToDict(status, always_print_fields_with_no_presence=True),
                    "trainer": trainer,
                    "stalls": [{"code": s.code, "message": s.message} for s in status.stalls],
                },
                indent=2,
            )
        )
    else:
        print(render(status, trainer, address=cfg.bridge.address))
    return EXIT_STALLED if status.stalls else EXIT_HEALTHY


def _bridge_status(cfg, timeout_s: float):
    """GetStatus, asked again briefly if the bridge's Atropos watcher has not read the API yet."""
    from atropos_megatron.bridge.client import BridgeClient

    logging.getLogger("atropos_megatron.bridge.client").setLevel(logging.ERROR)  # no retry chatter
    b = cfg.bridge
    with BridgeClient(
        b.address, token=b.auth_token, tls_ca=b.tls_ca, timeout_s=timeout_s, reconnect_s=0
    ) as client:
        status = client.status()
        deadline = time.monotonic() + min(timeout_s, 2 * b.atropos_watch_s + 1)
        while status.mode == "job" and not status.atropos.observed and time.monotonic() < deadline:
            time.sleep(0.2)  # its first status call started the watcher; its first reading is immediate
            status = client.status()
        return status


def trainer_summary(metrics_path: Path) -> dict[str, Any] | None:
    """The trainer's last logged step from ``metrics.jsonl`` (None when there is none yet)."""
    from atropos_megatron.trainer.metrics import read_metrics

    try:
        records = read_metrics(metrics_path)
    except (OSError, ValueError):
        return None
    if not records:
        return None
    last = records[-1]
    logged = last.get("time_unix")
    return {
        "metrics": str(metrics_path),
        "step": last.get("step"),
        "seconds_since_step": None if logged is None else max(0.0, time.time() - logged),
        "tokens_per_s": last.get("perf/tokens_per_s"),
        "reward_mean": last.get("reward/mean"),
    }


def render(status, trainer: dict[str, Any] | None, *, address: str) -> str:
    """The human view: one block per process, then the stalls."""
    lines = [f"bridge {address} ({status.mode} mode)"]
    if status.mode == "job":
        lines += _atropos_lines(status)
        lines += _bridge_lines(status)
    lines += _server_lines(status)
    lines += _trainer_lines(status, trainer)
    lines.append("")
    if status.stalls:
        waited = f"no batch ready for {status.seconds_without_batch:.0f} s"
        lines.append(f"STALLED ({waited}):")
        lines += [f"  {stall.code}: {stall.message}" for stall in status.stalls]
    else:
        lines.append("healthy: no stall named")
    return "\n".join(lines)


def _atropos_lines(status) -> list[str]:
    a = status.atropos
    head = f"atropos    {status.atropos_url}"
    if not a.observed:
        return [f"{head}: not read yet"]
    if not a.reachable:
        return [f"{head}: UNREACHABLE ({a.error})"]
    batch = f"batch_size {a.batch_size}" if a.batch_size > 0 else "no trainer registered"
    rate = "" if a.posting_rate < 0 else f", {a.posting_rate * 60:.3g} groups/min recently"
    lines = [
        f"{head}: {a.queued_groups} groups queued (largest {a.largest_group} sequences), "
        f"{a.batches_formed} batches formed, {batch}{rate}"
    ]
    if a.min_allocation_claimed > 0:
        lines.append(f"           min_batch_allocation reserves {a.min_allocation_claimed:.0%} of each batch")
    if not a.envs:
        lines.append("           no environment registered")
    for env in a.envs:
        note = "  (disconnected by the bridge)" if env.disconnected else ""
        lines.append(
            f"  env {env.env_id:<3} {env.queued_groups:>5} groups queued, quiet {_duration(env.seconds_quiet)}, "
            f"weight {env.weight:.2f}{note}"
        )
    return lines


def _bridge_lines(status) -> list[str]:
    rejected = ", ".join(f"{reason} {count}" for reason, count in sorted(status.rejected_groups.items()))
    last = "never" if status.seconds_since_batch < 0 else f"{_duration(status.seconds_since_batch)} ago"
    lines = [
        f"bridge     fetched {status.batches_fetched}, served {status.batches_served}, acked "
        f"{status.batches_acked}, retained {status.retained}, committed step {status.committed_step}, "
        f"ready {status.queue_depth}, spool {_bytes(status.spool_bytes)}; last batch handed out {last}",
        f"           rejected groups: {rejected or 'none'}",
    ]
    r = status.routed_experts
    if r.enabled:
        shape = "" if r.shape_registered else " (the trainer asked for none: not attached)"
        if r.width_mismatch:
            shape += f"; {r.width_mismatch} not of the trainer's layers x top-k"
        lines.append(
            f"           routed experts: sequences matched {r.sequences_matched}, unmatched "
            f"{r.sequences_unmatched}; samples captured {r.captured}, without routing {r.no_routing}, "
            f"malformed {r.malformed}, evicted {r.evicted}; held {r.entries} ({_bytes(r.bytes)}){shape}"
        )
    return lines


def _server_lines(status) -> list[str]:
    if not status.servers:
        return ["inference  no server configured"]
    lines = []
    for server in status.servers:
        health = "healthy" if server.healthy else f"UNHEALTHY ({server.last_error or 'no answer'})"
        version = server.weight_version or "initial"
        skipped = (
            f", prefix cache not flushed after {server.cache_flushes_skipped} update(s) (requests in flight)"
            if server.cache_flushes_skipped
            else ""
        )
        lines.append(f"inference  {server.url}: {health}, weight_version {version}{skipped}")
    return lines


def _trainer_lines(status, trainer: dict[str, Any] | None) -> list[str]:
    batch = (
        f"last batch {status.last_acked_batch_id} (step {status.last_acked_step})"
        if status.last_acked_batch_id
        else "no batch acknowledged since the bridge started"
    )
    if trainer is None:
        return [f"trainer    no step logged yet; {batch}"]
    age = trainer["seconds_since_step"]
    when = "" if age is None else f" ({_duration(age)} ago)"
    speed = trainer["tokens_per_s"]
    rate = "" if speed is None else f", {speed:,.0f} tokens/s"
    return [f"trainer    step {trainer['step']}{when}{rate}; {batch}"]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


if __name__ == "__main__":
    sys.exit(main())
