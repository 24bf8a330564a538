"""Chaos run: the demo's five processes train on CPU while a seeded killer keeps killing them.

For ``--minutes`` (default 8) the Atropos API, the reference inference server, the bridge, the
trainer and the environment of ``atropos-megatron demo`` run with checkpoints every
``--save-interval`` steps (``checkpoint.load=latest``: every trainer start resumes). Every 15-35 s
(``--min-interval-s``/``--max-interval-s``, uniform, measured from the previous kill, and never before
every role is up again) the killer picks a role, sends its whole process group SIGKILL (SIGTERM with
probability ``--sigterm-prob``) and this script starts it again with the same command, ports and
directories, as a supervisor or a Slurm requeue would. Victims come in seeded shuffled rounds (each
round every role once, in random order), so an 8-minute run kills every role three or four times.

Why 15-35 s and not the 20-60 s first asked for: an 8-minute run must see at least 15 kills. At a
mean of 40 s it averages 12; at 20-40 s (mean 30 s) 15.5, but only 91% of seeds reach 15 (seed 0
gets 14). At 15-35 s (mean 25 s) every seed gets 16 or more, as long as the roles recover within
15 s (they take 2-13 s on 2 cores).

A role that exits without being killed (the environment when the API it posts to vanished, say) is
restarted too and counted as a *crash* of that role. A role is *up* when its probe answers: HTTP for
the API and the inference server, the gRPC port for the bridge, a new line in ``metrics.jsonl`` for
the trainer (it trains), a successful ``/register-env`` for the environment. Recovery time is from
the signal until the killed role is up again; "next step" is from the signal until the trainer logs
a step (training goes on).

What is counted, and where it is measured:

- groups posted: a counting HTTP proxy in this process (a thread, never killed) sits between the
  environment and the Atropos API and counts the groups of every POST ``/scored_data`` (one) and
  ``/scored_data_list`` (a list) the API accepted; the bridge talks to the API directly;
- groups received by the bridge: the spool ledger's ``spooled`` events; groups still queued in the
  API at the end: its ``GET /status``; groups the bridge rejected: its logs, every life;
- groups lost inside the Atropos API = posted - received - queued - rejected. The API keeps its
  queue in memory only, so a killed API loses what it held (and the bridge resets an API that
  restarted unregistered, dropping its queue): an Atropos property, counted apart from batches;
- batches handed out / acknowledged: the ledger's ``handed_out`` / ``acked`` events (unique ids);
  lost = acknowledged but not in the final model's ``batch_history`` (its last checkpoint's
  sidecar), duplicated = in that history twice. Both must be 0;
- the reward: mean of the first and last 5 steps of ``metrics.jsonl``; it must rise by
  ``--min-reward-gain``.

At the end the killer stops; once every role is up and the trainer has made a new step, the trainer
gets SIGTERM (it writes its final checkpoint and exits 143), then the environment, the bridge, and
after the API's queue is read, the API and the inference server. Exit status 1 if a batch was lost
or duplicated, a killed role never came back, training stalled or the reward did not rise.

    .venv/bin/python benchmarks/chaos.py                              # 8 minutes into runs/chaos
    .venv/bin/python benchmarks/chaos.py --minutes 2 --seed 3 --json runs/chaos.json
    make chaos CHAOS_ARGS="--minutes 3 --roles trainer,bridge"

Outputs in the run directory: ``logs/<role>.<life>.log`` (one file per process life),
``chaos_events.jsonl`` (every kill, exit, restart and recovery), ``spool/ledger.jsonl``,
``metrics.jsonl``, ``checkpoints/``, ``reward_curve.png``. Never leaves a process behind: every child
has its own process group, killed on exit, Ctrl-C or an error, and gets SIGTERM if this script dies.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atropos_megatron.launch.supervisor import (  # noqa: E402
    probe_answers,
    signal_group,
    sigterm_as_keyboard_interrupt,
    spawn,
)
from atropos_megatron.trainer.metrics import MetricsFollower  # noqa: E402
from benchmarks.atropos_proxy import CountingProxy, GroupCounter  # noqa: E402
from benchmarks.chaos_records import (  # noqa: E402
    bridge_log_counts,
    format_table,
    read_api_queue,
    read_final_history,
    read_ledger,
    read_rewards,
    spread,
)

ROLES = ("atropos-api", "inference", "bridge", "trainer", "env")
"""The demo's roles, in start order."""
POLL_S = 0.5
RESTART_DELAY_S = 1.0
"""A supervisor's pause before restarting a role that exited."""
TERM_GRACE_S = 60.0
"""A role sent SIGTERM gets this long to exit (the trainer writes a checkpoint) before SIGKILL."""
START_TIMEOUT_S = 600.0
"""The first start of all five roles on a busy 2-core machine."""
PROGRESS_EVERY_S = 30.0
MAX_FAILED_LIVES = 5
"""A role that exits this many times in a row without ever coming up is in a crash loop: stop."""
STEPS = 1_000_000
"""The trainer's ``steps``: the run ends by time, not by steps."""


# ------------------------------------------------------------------------------------------------
# Following the trainer's metrics
# ------------------------------------------------------------------------------------------------


class StepFollower(MetricsFollower):
    """The trainer's step lines as they land in ``metrics.jsonl`` (from the top again after a resumed
    trainer rewrote it), and the newest one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.last_unix = 0.0
        """``time_unix`` of the newest step line seen."""
        self.last_step = 0
        """The newest step logged (its ``step``)."""
        self.last_reward: float | None = None

    def read_new(self) -> list[dict[str, Any]]:
        records = super().read_new()
        for record in records:
            if record.get("time_unix", 0) > self.last_unix:
                self.last_unix, self.last_step = record["time_unix"], record["step"]
                self.last_reward = record.get("reward/mean")
        return records


# ------------------------------------------------------------------------------------------------
# Roles that can be killed and restarted
# ------------------------------------------------------------------------------------------------


@dataclass
class Kill:
    role: str
    signal: str
    sent_unix: float
    step_before: int
    """The trainer's newest logged step when the signal went."""
    api_queue_groups: int | None = None
    """API kills: groups queued in the API just before (all lost with it)."""
    recovered_s: float | None = None
    """From the signal until the role was up again."""
    next_step_s: float | None = None
    """From the signal until the trainer logged a step."""
    steps_redone: int | None = None
    """Steps the trainer trained again after this kill (a resume from an earlier checkpoint)."""


@dataclass
class Restartable:
    """One role and its current life (process)."""

    name: str
    role: Any  # supervisor.Role
    log_dir: Path
    proc: subprocess.Popen | None = None
    life: int = 0
    started_unix: float = 0.0
    up: bool = False
    up_unix: float = 0.0
    """When this life came up (its first step for the trainer, its registration for the env)."""
    pending_kill: Kill | None = None
    """The kill this role has not recovered from yet."""
    signalled_this_life: bool = False
    term_deadline: float | None = None
    restart_at: float | None = None
    failed_lives: int = 0
    """Lives in a row that ended without the role ever coming up."""
    restarts: int = 0
    crashes: list[int] = field(default_factory=list)
    """Exit statuses of the lives that ended without a kill."""

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.life}.log"

    def start(self) -> None:
        self.life += 1
        self.proc = spawn(self.role, self.log_path)
        self.started_unix = time.time()
        self.up = self.signalled_this_life = False
        self.up_unix = 0.0
        self.term_deadline = self.restart_at = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ChaosError(RuntimeError):
    """The run could not go on (a role in a crash loop, the start-up failed)."""


class ChaosRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.victims = args.roles.split(",")
        self.round: list[str] = []
        self.counter = GroupCounter()
        self.proxy = CountingProxy(self.counter)
        self.kills: list[Kill] = []
        self.problems: list[str] = []
        """What fails the run (exit status 1)."""
        self.notes: list[str] = []
        """What is worth reading but does not fail it."""
        self.roles: dict[str, Restartable] = {}
        self.restarting = True
        self._events = None
        self._last_progress = 0.0
        self._chaos_started = 0.0
        self.trainer_final_exit: int | None = None
        self.load_at_start = os.getloadavg()

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from atropos_megatron.demo.run import prepare_demo

        wall_start = time.monotonic()
        overrides = [
            *self.args.overrides,
            "checkpoint.load=latest",
            f"checkpoint.save_interval_steps={self.args.save_interval}",
        ]
        setup = prepare_demo(self.args.run_dir, steps=STEPS, overrides=overrides, env_api_url=self.proxy.url)
        api = urlsplit(setup.addresses["atropos-api"])
        self.proxy.upstream = (api.hostname, api.port)
        threading.Thread(target=self.proxy.serve_forever, name="chaos-proxy", daemon=True).start()
        self.setup = setup
        self.follower = StepFollower(setup.metrics_path)
        log_dir = setup.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.roles = {role.name: Restartable(role.name, role, log_dir) for role in setup.roles}
        self._events = (setup.run_dir / "chaos_events.jsonl").open("a")
        self._say(f"run directory {setup.run_dir}; logs/<role>.<life>.log; chaos_events.jsonl")
        try:
            self._start_all()
            self._chaos(self.args.minutes * 60)
            self._settle()
            api_queue = self._stop_all_in_order()
        finally:
            self._kill_everything()
            self.proxy.shutdown()
            self._events.close()
        return self._report(api_queue, wall_s=time.monotonic() - wall_start)

    def _start_all(self) -> None:
        """Start the roles in order, each server once the one before answers; the trainer and the
        environment come up together (the trainer is up once it trains, which needs the environment)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for name in ROLES:
            self.roles[name].start()
            self._note("start", name, life=1)
            self._say(f"started {name:<12} {self.setup.addresses.get(name, '')}".rstrip())
            wait_for = [name] if name in self.setup.addresses else []
            if name == ROLES[-1]:
                wait_for = list(ROLES)
            while not all(self.roles[n].up for n in wait_for):
                self._tick()
                if time.monotonic() > deadline:
                    down = ", ".join(n for n in wait_for if not self.roles[n].up)
                    raise ChaosError(f"{down} did not come up within {START_TIMEOUT_S:.0f} s (see logs/)")
                time.sleep(POLL_S)
        self._say(f"every role is up; the trainer is at step {self.follower.last_step}")

    def _chaos(self, duration_s: float) -> None:
        self._chaos_started = start = time.monotonic()
        end = start + duration_s
        next_kill = start + self._interval()
        self._say(
            f"chaos for {duration_s / 60:.1f} min: kills every {self._interval_text()} "
            f"(seed {self.args.seed})"
        )
        while time.monotonic() < end:
            self._tick()
            if self._stalled():
                return
            if time.monotonic() >= next_kill and all(r.up for r in self.roles.values()):
                self._kill(self._next_victim())
                next_kill = time.monotonic() + self._interval()
            self._progress()
            time.sleep(POLL_S)

    def _settle(self) -> None:
        """Wait until every role is up and the trainer has made a step since the chaos ended."""
        since = time.time()
        deadline = time.monotonic() + self.args.settle_s
        self._say("chaos over: waiting for every role to be up and a new trainer step")
        while not (all(r.up for r in self.roles.values()) and self.follower.last_unix > since):
            if time.monotonic() > deadline:
                self.problems.append(
                    f"no new trainer step within {self.args.settle_s:.0f} s after the chaos; "
                    + self._who_is_down()
                )
                return
            self._tick()
            time.sleep(POLL_S)

    def _stop_all_in_order(self) -> int | None:
        """SIGTERM the trainer (final checkpoint, exit 143), the environment and the bridge, read the
        API's queue (nothing takes from it any more), then stop the API and the inference server."""
        self.restarting = False
        trainer = self.roles["trainer"]
        code = self._stop("trainer", grace_s=180.0)
        self.trainer_final_exit = code
        if code != 143:
            self.problems.append(
                f"the trainer's final stop ended with status {code} (expected 143: {trainer.log_path})"
            )
        self._stop("env", grace_s=30.0)
        self._stop("bridge", grace_s=30.0)
        queue = read_api_queue(self.setup.addresses["atropos-api"])
        self._stop("atropos-api", grace_s=15.0)
        self._stop("inference", grace_s=15.0)
        return queue

    # -- one poll --------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for record in self.follower.read_new():
            self._on_step(record)
        for role in self.roles.values():
            if role.proc is None:
                continue
            code = role.proc.poll()
            if code is not None and role.restart_at is None:
                self._on_exit(role, code, now)
            elif code is None:
                if role.term_deadline is not None and now > role.term_deadline:
                    signal_group(role.proc, signal.SIGKILL)
                    self._note("sigkill-after-grace", role.name, life=role.life)
                    role.term_deadline = None
                if not role.up and not role.signalled_this_life and self._is_up(role):
                    self._on_up(role)
            if role.restart_at is not None and now >= role.restart_at and self.restarting:
                role.restarts += 1
                role.start()
                self._note("restart", role.name, life=role.life)

    def _is_up(self, role: Restartable) -> bool:
        """Whether this life is up; sets ``role.up_unix`` to when it came up."""
        if role.name == "trainer":  # its first step since it started (set by _on_step)
            return role.up_unix > 0
        if role.name == "env":
            if self.counter.registered_unix >= role.started_unix:
                role.up_unix = self.counter.registered_unix
            return role.up_unix > 0
        if role.role.ready is None or probe_answers(role.role.ready):
            role.up_unix = time.time()
        return role.up_unix > 0

    def _on_up(self, role: Restartable) -> None:
        role.up = True
        role.failed_lives = 0
        kill = role.pending_kill
        if kill is not None:
            kill.recovered_s = role.up_unix - kill.sent_unix
            role.pending_kill = None
            self._note("up", role.name, life=role.life, recovered_s=round(kill.recovered_s, 2))
            self._say(f"  {role.name} up again after {kill.recovered_s:.1f} s ({role.log_path.name})")
        elif role.life > 1:
            self._note("up", role.name, life=role.life)
            self._say(f"  {role.name} up again ({role.log_path.name})")

    def _on_exit(self, role: Restartable, code: int, now: float) -> None:
        signal_group(role.proc, signal.SIGKILL)  # whatever the leader left behind in its group
        was_up = role.up
        role.up = False
        role.term_deadline = None
        role.restart_at = now + RESTART_DELAY_S
        if role.signalled_this_life:
            self._note("exit", role.name, life=role.life, status=code)
            return
        role.crashes.append(code)
        role.failed_lives = 0 if was_up else role.failed_lives + 1
        self._note("crash", role.name, life=role.life, status=code)
        self._say(f"  {role.name} exited by itself (status {code}; {role.log_path.name}): restarting")
        if role.failed_lives >= MAX_FAILED_LIVES and self.restarting:
            raise ChaosError(
                f"{role.name} exited {role.failed_lives} times in a row without coming up: a crash loop "
                f"(last log: {role.log_path})"
            )

    def _on_step(self, record: dict[str, Any]) -> None:
        when = record.get("time_unix", 0.0)
        trainer = self.roles["trainer"]
        if not trainer.up_unix and when >= trainer.started_unix and not trainer.signalled_this_life:
            trainer.up_unix = when
        if when < trainer.started_unix:
            return  # an older life's line, read again after a resumed trainer rewrote the file
        for kill in self.kills:
            # After a trainer kill, the step must come from a later life: on SIGTERM the dying one
            # still logs the step it was in (and the next life keeps that line).
            later_life = kill.role != "trainer" or trainer.started_unix > kill.sent_unix
            if kill.next_step_s is None and when > kill.sent_unix and later_life:
                kill.next_step_s = when - kill.sent_unix
                kill.steps_redone = max(0, kill.step_before - (record["step"] - 1))

    def _stalled(self) -> bool:
        quiet_s = time.time() - max(self.follower.last_unix, 0.0)
        if quiet_s < self.args.stall_s:
            return False
        self.problems.append(
            f"training stalled: no trainer step for {quiet_s:.0f} s, the chaos stopped; {self._who_is_down()}"
        )
        self._say(f"error: {self.problems[-1]}")
        return True

    def _who_is_down(self) -> str:
        down = [r.name for r in self.roles.values() if not r.up]
        if down:
            return f"down: {', '.join(down)}"
        lives = ", ".join(r.log_path.name for r in self.roles.values())
        return f"every role answers its probe (see logs/: {lives})"

    # -- killing ---------------------------------------------------------------------------------

    def _interval(self) -> float:
        return self.rng.uniform(self.args.min_interval_s, self.args.max_interval_s)

    def _interval_text(self) -> str:
        return f"{self.args.min_interval_s:g}-{self.args.max_interval_s:g} s"

    def _next_victim(self) -> str:
        if not self.round:
            self.round = list(self.victims)
            self.rng.shuffle(self.round)
        return self.round.pop(0)

    def _kill(self, name: str) -> None:
        role = self.roles[name]
        sig = signal.SIGTERM if self.rng.random() < self.args.sigterm_prob else signal.SIGKILL
        queue = read_api_queue(self.setup.addresses["atropos-api"]) if name == "atropos-api" else None
        kill = Kill(name, sig.name, time.time(), self.follower.last_step, api_queue_groups=queue)
        signal_group(role.proc, sig)
        role.up, role.signalled_this_life, role.pending_kill = False, True, kill
        if sig == signal.SIGTERM:
            role.term_deadline = time.monotonic() + TERM_GRACE_S
        self.kills.append(kill)
        extra = f", {queue} groups queued in it" if queue is not None else ""
        self._note("kill", name, life=role.life, signal=sig.name, api_queue_groups=queue)
        self._say(f"kill {len(self.kills):>2}: {sig.name} {name} (trainer at step {kill.step_before}{extra})")

    def _stop(self, name: str, *, grace_s: float) -> int | None:
        role = self.roles[name]
        if not role.running():
            return None if role.proc is None else role.proc.returncode
        signal_group(role.proc, signal.SIGTERM)
        try:
            code = role.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(role.proc, signal.SIGKILL)
            code = role.proc.wait()
            self.notes.append(f"{name} did not stop within {grace_s:.0f} s of SIGTERM ({role.log_path})")
        signal_group(role.proc, signal.SIGKILL)
        self._note("stop", name, life=role.life, status=code)
        return code

    def _kill_everything(self) -> None:
        self.restarting = False
        for role in self.roles.values():
            if role.proc is not None:
                signal_group(role.proc, signal.SIGKILL)
                role.proc.wait()

    # -- output ----------------------------------------------------------------------------------

    def _note(self, event: str, role: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.write(
                json.dumps({"event": event, "role": role, **fields, "time_unix": time.time()}) + "\n"
            )
            self._events.flush()

    def _say(self, message: str) -> None:
        print(message, flush=True)

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        elapsed = now - self._chaos_started
        down = [r.name for r in self.roles.values() if not r.up]
        reward = self.follower.last_reward
        at = f"step {self.follower.last_step}"
        if isinstance(reward, int | float):
            at += f" (reward {reward:.2f})"
        self._say(
            f"[{int(elapsed) // 60}:{int(elapsed) % 60:02d}] {at}, {len(self.kills)} kills, "
            f"{sum(r.restarts for r in self.roles.values())} restarts, "
            f"{sum(len(r.crashes) for r in self.roles.values())} crashes, "
            f"{self.counter.posted} groups posted; " + (f"down: {', '.join(down)}" if down else "all up")
        )

    def _report(self, api_queue: int | None, *, wall_s: float) -> dict[str, Any]:
        run_dir = self.setup.run_dir
        ledger = read_ledger(run_dir / "spool" / "ledger.jsonl")
        history, final_step = read_final_history(run_dir / "checkpoints")
        rejected, resets = bridge_log_counts(run_dir / "logs")
        acked = ledger["acked"]
        counts = collections.Counter(history)
        lost = sorted(acked - set(history))
        duplicated = sorted(batch for batch, n in counts.items() if n > 1)
        groups_received = sum(ledger["spooled"].values())
        lost_in_api = None
        if api_queue is not None:
            lost_in_api = self.counter.posted - groups_received - api_queue - rejected
        rewards = read_rewards(self.setup.metrics_path, run_dir, min_gain=self.args.min_reward_gain)
        by_role = {name: [k for k in self.kills if k.role == name] for name in ROLES}
        unrecovered = sorted({k.role for k in self.kills if k.recovered_s is None})
        report = {
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "interval_s": [self.args.min_interval_s, self.args.max_interval_s],
            "sigterm_prob": self.args.sigterm_prob,
            "save_interval_steps": self.args.save_interval,
            "wall_s": round(wall_s, 1),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(),
            "load_avg_1m_start_end": [round(self.load_at_start[0], 2), round(os.getloadavg()[0], 2)],
            "kills": len(self.kills),
            "kills_by_role": {n: len(k) for n, k in by_role.items()},
            "sigterms_by_role": {n: sum(x.signal == "SIGTERM" for x in k) for n, k in by_role.items()},
            "restarts_by_role": {n: r.restarts for n, r in self.roles.items()},
            "crashes_by_role": {n: len(r.crashes) for n, r in self.roles.items()},
            "recover_s": {n: spread([x.recovered_s for x in k]) for n, k in by_role.items()},
            "next_step_s": {n: spread([x.next_step_s for x in k]) for n, k in by_role.items()},
            "steps_redone": sum(k.steps_redone or 0 for k in self.kills),
            "unrecovered_roles": unrecovered,
            "groups_posted": self.counter.posted,
            "groups_refused": self.counter.refused,
            "groups_received": groups_received,
            "groups_queued_at_end": api_queue,
            "groups_rejected": rejected,
            "groups_lost_in_api": lost_in_api,
            "api_queue_at_kills": [k.api_queue_groups for k in by_role["atropos-api"]],
            "api_resets_by_bridge": resets,
            "batches_spooled": len(ledger["spooled"]),
            "batches_handed_out": len(ledger["handed_out"]),
            "batches_acked": len(acked),
            "batches_lost": len(lost),
            "batches_duplicated": len(duplicated),
            "lost_ids": lost[:20],
            "duplicated_ids": duplicated[:20],
            "batches_unacked_at_end": len(ledger["handed_out"] - acked),
            "steps_trained": final_step,
            "trainer_final_exit": self.trainer_final_exit,
            **rewards,
        }
        if history and final_step != len(history):
            self.problems.append(
                f"the final checkpoint is at step {final_step} but holds {len(history)} batch ids"
            )
        if not history:
            self.problems.append("no final checkpoint with a batch_history")
        if lost or duplicated:
            self.problems.append(f"{len(lost)} batches lost, {len(duplicated)} duplicated (ids in the JSON)")
        if unrecovered:
            self.problems.append(f"never up again after a kill: {', '.join(unrecovered)}")
        if not report["reward_rising"]:
            self.problems.append(
                f"the reward did not rise by {self.args.min_reward_gain} (first/last 5 steps)"
            )
        report["problems"] = list(self.problems)
        report["notes"] = list(self.notes)
        report["ok"] = not self.problems
        return report


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/chaos.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="how long the killer runs (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="the killer's seed: victims, signals, intervals")
    parser.add_argument("--min-interval-s", type=float, default=15.0, help="shortest gap between kills (15)")
    parser.add_argument("--max-interval-s", type=float, default=35.0, help="longest gap between kills (35)")
    parser.add_argument(
        "--sigterm-prob", type=float, default=0.25, help="chance a kill is SIGTERM, not SIGKILL (0.25)"
    )
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help=f"comma-separated roles to kill (default all: {','.join(ROLES)})",
    )
    parser.add_argument("--save-interval", type=int, default=5, help="trainer checkpoint every N steps (5)")
    parser.add_argument("--run-dir", default="runs/chaos", help="cleared if an earlier demo/chaos run's")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the JSON line here"
    )
    parser.add_argument(
        "--min-reward-gain", type=float, default=0.4, help="last-5 minus first-5 mean reward needed (0.4)"
    )
    parser.add_argument(
        "--settle-s", type=float, default=300.0, help="after the chaos, wait this long for a new step (300)"
    )
    parser.add_argument(
        "--stall-s", type=float, default=300.0, help="no trainer step for this long ends the chaos (300)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="demo config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.roles.split(",")) - set(ROLES)
    if unknown or not args.roles:
        print(f"error: --roles: unknown {sorted(unknown)}; choose from {', '.join(ROLES)}", file=sys.stderr)
        return 2
    if not 0 < args.min_interval_s <= args.max_interval_s:
        print("error: need 0 < --min-interval-s <= --max-interval-s", file=sys.stderr)
        return 2
    from atropos_megatron.demo.local import RunError

    chaos = ChaosRun(args)
    try:
        with sigterm_as_keyboard_interrupt():
            report = chaos.run()
    except (RunError, ChaosError) as exc:
        print(f"error: {exc}\nevery process was stopped.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped.", file=sys.stderr)
        return 130
    print(format_table(report))
    line = json.dumps(report, separators=(",", ":"))
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
