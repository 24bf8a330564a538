"""Run one node's part of a launch plan: start its roles, watch them and the other nodes, stop cleanly.

Nodes do not talk to each other; they share the run directory (checkpoints need a shared filesystem
anyway) and leave small status files in ``<run_dir>/launch/<session>/status``:

- ``finished``: written by the node of trainer rank 0 once every trainer rank there exited 0. Nodes
  without trainer ranks (inference, a dedicated head) then stop their roles and exit 0.
- ``stop``: written by ``atropos-megatron launch stop`` (the sbatch scripts run it when Slurm warns
  of the time limit): every node stops as on SIGTERM.
- ``failed-<node>``: a role of that node exited when it should not have, or never became ready; the
  file holds the error. Every other node stops its roles and exits 1 naming the failed node, so one
  dead role ends the job with its message instead of leaving the others waiting (``srun
  --kill-on-bad-exit`` does the same from Slurm's side).

On SIGTERM/SIGINT/SIGUSR1 the trainer ranks are stopped first, with ``launch.trainer_stop_grace_s``
to write their checkpoint, then the services they were still talking to. Exit status: 0 when the run
finished, 1 on a failure, 128 + the signal after a stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from atropos_megatron.launch.plan import TRAINER, LaunchPlan, NodePlan, ProbeSpec, RoleSpec
from atropos_megatron.launch.supervisor import Role, RoleFailed, Supervisor, http_probe, port_probe

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""SIGUSR1: what ``#SBATCH --signal=USR1@<seconds>`` sends before the time limit."""


class OtherNodeFailed(RuntimeError):
    """Another node of the job wrote a failure."""


class StopRequested(RuntimeError):
    def __init__(self, signum: int, reason: str | None = None) -> None:
        super().__init__(reason or f"received {signal.Signals(signum).name}")
        self.signum = signum


class StatusBoard:
    """The status files the nodes of one session share."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def request_stop(self, reason: str) -> None:
        """Ask every node to stop as on SIGTERM (``launch stop``; the sbatch scripts' time-limit trap)."""
        _write_atomic(self.directory / "stop", reason + "\n")

    def stop_requested(self) -> str | None:
        try:
            return (self.directory / "stop").read_text(errors="replace").strip()
        except FileNotFoundError:
            return None

    def finish(self) -> None:
        _write_atomic(self.directory / "finished", "done\n")

    def finished(self) -> bool:
        return (self.directory / "finished").exists()

    def fail(self, node: NodePlan, message: str) -> None:
        _write_atomic(
            self.directory / f"failed-{node.index}", f"node {node.index} ({node.node.name}): {message}\n"
        )

    def failure(self, *, other_than: int) -> str | None:
        """The first failure another node reported, or None."""
        for path in sorted(self.directory.glob("failed-*")):
            if path.name != f"failed-{other_than}":
                return path.read_text(errors="replace").strip()
        return None


def run_node(plan: LaunchPlan, index: int, *, poll_s: float = 0.5) -> int:
    """Run node ``index`` of ``plan`` until the run finishes, fails or is stopped; the exit status."""
    node = plan.nodes[index]
    board = StatusBoard(plan.session_dir / "status")
    supervisor = Supervisor(plan.log_dir(node), grace_s=plan.stop_grace_s, poll_s=poll_s)
    trainers = [role.name for role in node.roles if role.kind == TRAINER]
    logger.info(
        "node %d (%s): %d role(s); logs in %s", index, node.node.name, len(node.roles), supervisor.log_dir
    )
    with _stop_signals() as stop:
        watch = _Watch(supervisor, board, node, stop, poll_s)
        try:
            _start_roles(plan, node, watch)
            logger.info("node %d: every role is up", index)
            while True:
                watch.check()
                if trainers and all(supervisor.finished(name) for name in trainers):
                    if index == plan.trainer_rank0_node:
                        board.finish()
                    logger.info("node %d: training finished", index)
                    return 0
                if not trainers and board.finished():
                    logger.info("node %d: training finished on node %d", index, plan.trainer_rank0_node)
                    return 0
                time.sleep(poll_s)
        except RoleFailed as exc:
            board.fail(node, str(exc))
            logger.error("node %d: %s", index, exc)
            return 1
        except OtherNodeFailed as exc:
            logger.error("node %d: stopping because another node failed: %s", index, exc)
            return 1
        except StopRequested as exc:
            logger.warning("node %d: %s; stopping the trainer first (it writes a checkpoint)", index, exc)
            return 128 + exc.signum
        finally:
            _stop_everything(supervisor, trainers, plan.trainer_stop_grace_s)
            _log_exits(supervisor, index)


class _Watch:
    """What every wait on a node checks: its own roles, the other nodes, and stop signals."""

    def __init__(
        self, supervisor: Supervisor, board: StatusBoard, node: NodePlan, stop: list[int], poll_s: float
    ):
        self.supervisor = supervisor
        self.board = board
        self.node = node
        self.stop = stop
        self.poll_s = poll_s

    def check(self) -> None:
        if self.stop:
            raise StopRequested(self.stop[0])
        reason = self.board.stop_requested()
        if reason is not None:
            raise StopRequested(signal.SIGTERM, f"stop requested: {reason}")
        failure = self.board.failure(other_than=self.node.index)
        if failure is not None:
            raise OtherNodeFailed(failure)
        self.supervisor.check()

    def wait_for(self, name: str, probes: list[ProbeSpec], timeout_s: float, *, started: bool) -> None:
        """Wait until every probe answers. On timeout, a RoleFailed for ``name``: a started role that
        never became ready (its log's tail), or one not started because what it needs never answered."""
        deadline = time.monotonic() + timeout_s
        while probes:
            self.check()
            probes = [probe for probe in probes if not _answers(probe)]
            if probes and time.monotonic() > deadline:
                waiting = ", ".join(probe.target for probe in probes)
                if started:
                    problem = f"did not become ready within {timeout_s:.0f} s ({waiting})"
                    log, tail = self.supervisor.log_path(name), self.supervisor.tail(name)
                else:
                    problem = f"was not started: {waiting} did not answer within {timeout_s:.0f} s"
                    log, tail = self.supervisor.log_dir / f"{name}.log", "(not started)"
                raise RoleFailed(name, problem, log, tail)
            if probes:
                time.sleep(self.poll_s)


def _start_roles(plan: LaunchPlan, node: NodePlan, watch: _Watch) -> None:
    """Start the node's roles in plan order, each once what it needs answers (servers load side by
    side); then wait until every started role answers its own probe."""
    for role in node.roles:
        watch.wait_for(role.name, list(role.needs), plan.startup_timeout_s, started=False)
        watch.supervisor.start(_to_role(role, plan, watch.supervisor.log_dir), wait=False)
        logger.info("node %d: started %s: %s", node.index, role.name, role.summary)
    for role in node.roles:
        if role.ready is not None:
            watch.wait_for(role.name, [role.ready], plan.startup_timeout_s, started=True)


def _to_role(role: RoleSpec, plan: LaunchPlan, log_dir: Path) -> Role:
    env = dict(role.env)
    if role.gpu_slots is not None:
        first, count = role.gpu_slots
        visible = _visible_gpus(plan.gpus_per_node)
        if first + count > len(visible):
            raise RoleFailed(
                role.name,
                f"needs GPUs [{first}, {first + count}) but this node shows {len(visible)}: {visible}",
                log_dir / f"{role.name}.log",
                "(not started)",
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[first : first + count])
    return Role(
        name=role.name,
        command=role.command,
        env=env,
        ready_timeout_s=plan.startup_timeout_s,
        exits_when_done=role.kind == TRAINER,
        cwd=Path(role.cwd) if role.cwd else None,
    )


def _visible_gpus(gpus_per_node: int) -> list[str]:
    """This node's GPU ids as Slurm handed them to the step (``CUDA_VISIBLE_DEVICES``), else 0..n-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    return [str(gpu) for gpu in range(gpus_per_node)]


def _stop_everything(supervisor: Supervisor, trainers: list[str], trainer_grace_s: float) -> None:
    """Trainer ranks first (they may be writing a checkpoint and need the filesystem, not the
    services), all at once, then every other role."""
    running = [name for name in trainers if supervisor.running(name)]
    if running:
        supervisor.stop(*running, grace_s=trainer_grace_s)
    supervisor.stop_all()


def _log_exits(supervisor: Supervisor, index: int) -> None:
    for record in supervisor.exits.values():
        log = logger.info if record.clean else logger.warning
        log("node %d: %s %s (status %d)", index, record.name, record.how, record.returncode)


def _answers(probe: ProbeSpec) -> bool:
    host, _, port = probe.target.rpartition(":")
    check = http_probe(probe.target) if probe.kind == "http" else port_probe(host, int(port))
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - any failure to answer means "not yet"
        return False


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """Record stop signals in a list instead of dying (the watch loop acts on them)."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
