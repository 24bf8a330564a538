"""A small supervisor for the processes of one run: start them, wait until they answer, watch them, and
always stop every one of them.

Each role runs in its own process group (so a signal reaches its children too, e.g. torchrun's ranks)
with its output in ``<log_dir>/<role>.log``. A role that exits when it should not stops the whole run
with :class:`RoleFailed`, which names the role and quotes the end of its log. Stopping sends SIGTERM
to every group (newest first), waits a grace period, then SIGKILLs what is left. On Linux each child
also gets SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``), so even ``kill -9`` of the
supervisor leaves no orphans behind.

Deliberately small: no restarts, no resource limits, no remote hosts. The demo runs its five roles
with it; ``atropos-megatron launch`` runs each Slurm node's roles with it (one supervisor per node).
``benchmarks/chaos.py`` kills and restarts roles itself, with the same :func:`spawn`,
:func:`signal_group` and :func:`probe_answers`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

Probe = Callable[[], bool]


@dataclass(frozen=True)
class Role:
    """One process of the run."""

    name: str
    """Short name used in logs and errors (``trainer``, ``bridge``, ...); also the log file's stem."""
    command: Sequence[str]
    ready: Probe | None = None
    """Returns True once the process serves (called while it runs); None: ready once started."""
    ready_timeout_s: float = 120.0
    """How long :meth:`Supervisor.start` waits for ``ready``."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Added to (and overriding) the supervisor's environment."""
    cwd: Path | None = None
    exits_when_done: bool = False
    """True for a role whose exit status 0 means "finished" (the trainer); any other exit of any role
    before :meth:`Supervisor.stop_all` is a failure."""


@dataclass(frozen=True)
class ExitRecord:
    """How one role ended."""

    name: str
    returncode: int
    how: str
    """``finished`` (a role allowed to exit did, with status 0), ``failed`` (exited by itself when it
    should not have), ``stopped`` (exited after SIGTERM within the grace period) or ``killed`` (still
    running after the grace period: SIGKILL)."""

    @property
    def clean(self) -> bool:
        return self.how in ("finished", "stopped")


class RoleFailed(RuntimeError):
    """A role exited when it should not have, or never became ready."""

    def __init__(self, name: str, problem: str, log_path: Path, log_tail: str) -> None:
        super().__init__(f"{name} {problem} (log: {log_path}); its last lines:\n{log_tail}")
        self.name = name
        self.log_path = log_path


@dataclass
class _Running:
    role: Role
    proc: subprocess.Popen
    log_path: Path
    started: float


class Supervisor:
    """Starts roles in order and stops them all on exit (use it as a context manager)."""

    def __init__(self, log_dir: str | Path, *, grace_s: float = 15.0, poll_s: float = 0.2) -> None:
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._running: dict[str, _Running] = {}
        self.exits: dict[str, ExitRecord] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    # -- starting and watching --------------------------------------------------------------------

    def start(self, role: Role, *, wait: bool = True) -> None:
        """Launch ``role`` and (with ``wait``) wait until its probe answers; raises :class:`RoleFailed`
        if it (or an earlier role) exits meanwhile or the probe does not answer within
        ``role.ready_timeout_s``. Without ``wait``, call :meth:`wait_ready` later: roles that load for
        minutes (inference servers) can then load side by side."""
        if role.name in self._running:
            raise ValueError(f"role {role.name!r} already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{role.name}.log"
        proc = spawn(role, log_path)
        self._running[role.name] = _Running(role, proc, log_path, time.monotonic())
        if wait:
            self.wait_ready(role.name)

    def wait_ready(self, *names: str) -> None:
        """Wait until every named role's probe answers (each within its ``ready_timeout_s`` since it
        started); raises :class:`RoleFailed` as :meth:`start` does."""
        pending = [self._running[name] for name in names if self._running[name].role.ready is not None]
        while pending:
            self.check()
            pending = [running for running in pending if not probe_answers(running.role.ready)]
            for running in pending:
                if time.monotonic() - running.started > running.role.ready_timeout_s:
                    timeout = running.role.ready_timeout_s
                    raise self._failure(running.role.name, f"did not become ready within {timeout:.0f} s")
            if pending:
                time.sleep(self.poll_s)

    def check(self) -> None:
        """Raise :class:`RoleFailed` for the first role that exited without being allowed to."""
        for name, running in self._running.items():
            code = running.proc.poll()
            if code is None or name in self.exits:
                continue
            if running.role.exits_when_done and code == 0:
                self.exits[name] = ExitRecord(name, code, "finished")
                continue
            raise self._failure(name, _describe_exit(code))

    def finished(self, name: str) -> bool:
        """True once ``name`` (a role with ``exits_when_done``) has exited with status 0."""
        self.check()
        return name in self.exits

    def log_path(self, name: str) -> Path:
        return self._running[name].log_path

    def tail(self, name: str, *, lines: int = 30) -> str:
        """The last ``lines`` lines of a role's log."""
        return _tail(self._running[name].log_path, lines)

    # -- stopping ---------------------------------------------------------------------------------

    def running(self, name: str) -> bool:
        """True while ``name`` has been started and has not exited."""
        return name in self._running and self._running[name].proc.poll() is None

    def stop(self, *names: str, grace_s: float | None = None) -> dict[str, ExitRecord]:
        """Stop these roles together (SIGTERM, SIGKILL after ``grace_s``, default the supervisor's) and
        return how they ended: the launcher stops the trainer ranks first and gives them time to
        write their checkpoint."""
        return self._stop(
            [self._running[name] for name in names], self.grace_s if grace_s is None else grace_s
        )

    def stop_all(self) -> dict[str, ExitRecord]:
        """SIGTERM every running role (newest first), SIGKILL what is left after ``grace_s``; idempotent.

        Returns every role's :class:`ExitRecord`.
        """
        self._stop(list(reversed(self._running.values())), self.grace_s)
        for running in self._running.values():
            # Whatever the leader left behind in its group (a worker that ignored SIGTERM) goes too.
            signal_group(running.proc, signal.SIGKILL)
        return dict(self.exits)

    def _stop(self, roles: list[_Running], grace_s: float) -> dict[str, ExitRecord]:
        pending = []
        for running in roles:
            name = running.role.name
            code = running.proc.poll()
            if name in self.exits:
                continue
            if code is None:
                signal_group(running.proc, signal.SIGTERM)
                pending.append(running)
            elif running.role.exits_when_done and code == 0:
                self.exits[name] = ExitRecord(name, code, "finished")
            else:
                self.exits[name] = ExitRecord(name, code, "failed")
        deadline = time.monotonic() + grace_s
        for running in pending:
            name = running.role.name
            try:
                code = running.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                how = "stopped"
            except subprocess.TimeoutExpired:
                signal_group(running.proc, signal.SIGKILL)
                code = running.proc.wait()
                how = "killed"
            self.exits.setdefault(name, ExitRecord(name, code, how))
        return {running.role.name: self.exits[running.role.name] for running in roles}

    def _failure(self, name: str, problem: str) -> RoleFailed:
        running = self._running[name]
        return RoleFailed(name, problem, running.log_path, _tail(running.log_path, 30))


# ------------------------------------------------------------------------------------------------
# Probes and helpers
# ------------------------------------------------------------------------------------------------


def http_probe(url: str, *, timeout_s: float = 2.0) -> Probe:
    """Ready when ``GET url`` answers 200."""

    def probe() -> bool:
        return httpx.get(url, timeout=timeout_s).status_code == 200

    return probe


def port_probe(host: str, port: int, *, timeout_s: float = 1.0) -> Probe:
    """Ready when a TCP connection to ``host:port`` succeeds (for servers without an HTTP route)."""

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True

    return probe


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports nothing listens on right now (all held open until chosen, so they
    differ; another program may still take one before our child binds it)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, so ``finally`` clauses (and the
    supervisor's ``__exit__``) run as they do for Ctrl-C. Main thread only."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def spawn(role: Role, log_path: Path) -> subprocess.Popen:
    """Start ``role``'s command in its own process group (so that a signal reaches its children too),
    output to ``log_path`` (truncated), stopped with SIGTERM if this process dies (Linux). Call it from
    the thread that lives as long as the child should: the kernel ties ``PR_SET_PDEATHSIG`` to the
    thread that forked."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **role.env}
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(role.command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=role.cwd,
            env=env,
            start_new_session=True,  # own process group: signals reach the role's children too
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def probe_answers(probe: Probe) -> bool:
    """Whether ``probe`` answers True now (a refused connection or an HTTP error is False)."""
    try:
        return bool(probe())
    except (OSError, httpx.HTTPError):
        return False


def signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of a child started by :func:`spawn` (gone already: no-op)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the leader's pid is the group id (start_new_session)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 64 * 1024))
            text = file.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
