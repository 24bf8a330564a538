"""A real, private Slurm cluster on this one machine, for tests that submit sbatch scripts.

Our Slurm examples and the trainer's restart logic depend on what Slurm actually does (which
processes a ``scancel`` signals, when SIGKILL follows, what a requeued job sees), and a mock cannot
tell us that. ``SlurmCluster`` starts munged, slurmctld and one slurmd per fake node, all under one
directory, with their own ports and munge socket, so it never touches a system Slurm and several
clusters can coexist. The fake nodes share this host (``NodeHostname`` = ``hostname``, ``NodeAddr``
127.0.0.1, one slurmd port each) and carry fake GPUs: GRES files that are symlinks to /dev/tty*, so
``--gpus-per-node`` scripts run unchanged and get ``CUDA_VISIBLE_DEVICES``.

Every Slurm client call has a timeout: when slurmctld is down, each one blocks for ~10 s
(MessageTimeout) instead of failing. The daemons run as root (``SlurmUser=root``), so the tests
need root; ``slurm_available()`` says why they cannot run otherwise. The recipe and its pitfalls are
in ``tests/SLURM_NOTES.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 15.0
"""Upper bound for any one Slurm client command (a healthy cluster answers in well under 1 s)."""

_POLL_S = 0.2
_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "munged")
# Every process of a cluster (daemons, slurmstepd, job tasks and their setsid'd children) carries
# this variable, so stop() can find the ones Slurm itself leaves behind.
_MARKER = "LOCAL_SLURM_CLUSTER"
# Job states after which a job never runs again (a requeued job passes through none of them).
_FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class SlurmError(RuntimeError):
    """A Slurm command or daemon failed; the message carries what is needed to see why."""


REQUIRE_SLURM = "ATROPOS_MEGATRON_REQUIRE_SLURM"
"""Set to 1 (CI does) to make the Slurm tests fail instead of skip where the cluster cannot start."""


def slurm_available() -> str | None:
    """None when a private cluster can start here, else the reason (meant for ``pytest.skip``).

    Always None when ``ATROPOS_MEGATRON_REQUIRE_SLURM=1``: the tests then run and fail with the cause.
    """
    if os.environ.get(REQUIRE_SLURM) == "1":
        return None
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return (
            f"Slurm is not installed (missing {', '.join(missing)}); run tools/slurm/install_slurm.sh as root"
        )
    if os.geteuid() != 0:
        return "the private Slurm cluster runs its daemons as root (SlurmUser=root); tests are not root"
    return None


def _local_port_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _free_port_block(count: int, *, exclude: Iterable[int] = ()) -> int:
    """First port of ``count`` consecutive free TCP ports outside the kernel's ephemeral range.

    Consecutive because ``Port=[a-b]`` on a node range gives each slurmd the next port; outside the
    ephemeral range so that no outgoing connection takes one of them between now and the bind.
    """
    eph_lo, eph_hi = _local_port_range()
    excluded = set(exclude)
    candidates = [p for p in range(20000, 32000, count + 1) if not (p + count > eph_lo and p <= eph_hi)]
    candidates = candidates or list(range(20000, 32000, count + 1))
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    rng.shuffle(candidates)
    for base in candidates:
        ports = range(base, base + count)
        if excluded.intersection(ports):
            continue
        socks: list[socket.socket] = []
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SlurmError(f"no block of {count} free consecutive TCP ports in 20000-32000")


def _tail(path: Path, max_chars: int = 3000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_chars))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def parse_scontrol_record(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` (one ``scontrol show -o`` record) as a dict.

    A key is a word at the start or after whitespace followed by ``=``; everything up to the next
    such key is its value, so ``Command=/a dir/job.sh`` and ``TRES=cpu=2,node=1`` both survive.
    """
    keys = list(re.finditer(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_/:]*)=", line))
    record: dict[str, str] = {}
    for match, nxt in zip(keys, [*keys[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(line)
        record.setdefault(match.group(1), line[match.end() : end].strip())
    return record


def _proc_environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class SlurmCluster:
    """slurmctld + one slurmd per fake node + munged, all under ``root``; a context manager.

    ``root`` gets ``slurm.conf``, ``gres.conf``, ``log/`` (daemon logs, read by ``logs_tail()``),
    ``state/`` and ``spool/``. The munge socket lives in a short private directory under /tmp,
    because munged insists that every directory above its socket is world-executable and pytest's
    temporary directories are not.
    """

    def __init__(
        self,
        root: Path,
        *,
        nodes: tuple[str, ...] = ("node1", "node2"),
        cpus_per_node: int = 4,
        gpus_per_node: int = 4,
        kill_wait_s: int = 30,
        real_memory_mb: int = 8000,
        min_job_age_s: int = 30,
        cred_expire_s: int = 5,
        sched_interval_s: int = 2,
        start_timeout_s: float = 30.0,
    ) -> None:
        if not nodes:
            raise ValueError("need at least one node")
        self.root = Path(root).resolve()
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.kill_wait_s = kill_wait_s
        self.real_memory_mb = real_memory_mb
        self.min_job_age_s = min_job_age_s
        self.cred_expire_s = cred_expire_s
        self.sched_interval_s = sched_interval_s
        self.start_timeout_s = start_timeout_s
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.ctld_port = 0
        self.slurmd_ports: tuple[int, ...] = ()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._munge_dir: Path | None = None
        self._started = False

    # ----------------------------------------------------------------------------------------------
    # Life cycle
    # ----------------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, start the daemons and wait until every node is idle.

        On failure the daemons started so far are stopped and the error carries their log tails.
        """
        if self._started:
            return
        self._started = True
        try:
            self._write_files()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle()
        except BaseException as exc:
            tails = self.logs_tail()
            self.stop()
            if isinstance(exc, Exception):
                raise SlurmError(f"Slurm cluster in {self.root} did not start: {exc}\n{tails}") from exc
            raise

    def stop(self) -> None:
        """Kill every job process, shut the daemons down, then munged; leaves nothing running.

        Idempotent. Jobs are not cancelled through Slurm: that gives each one KillWait seconds
        after SIGTERM, and a slurmd does not exit while it is still terminating a job. Instead
        every process of this cluster (slurmstepd, tasks and their descendants, setsid'd or not)
        gets SIGKILL before and after ``scontrol shutdown``.
        """
        if not self._started:
            return
        self._started = False
        survivors = self._kill_job_processes()
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._client(["scontrol", "shutdown"], check=False, timeout=CLIENT_TIMEOUT_S)
        self._reap({k: p for k, p in self._procs.items() if k != "munged"}, grace_s=10.0)
        survivors += self._kill_job_processes()
        self._reap({k: p for k, p in self._procs.items() if k == "munged"}, grace_s=5.0, term_first=True)
        alive = [f"{name}({p.pid})" for name, p in self._procs.items() if _alive(p.pid)]
        alive += [f"{_proc_cmdline(pid)}({pid})" for pid in survivors if _alive(pid)]
        self._procs.clear()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None
        if alive:
            raise SlurmError(f"processes survived stop(): {', '.join(alive)}")

    # ----------------------------------------------------------------------------------------------
    # Client side
    # ----------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands and jobs: ours, pointed at this cluster.

        Inherited ``SLURM_*``/``SBATCH_*``/``SRUN_*``/``SALLOC_*`` variables are dropped: inside a
        real Slurm job they would make srun and sbatch act on that job instead.
        """
        prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SCANCEL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env["SLURM_CONF"] = str(self.conf)
        env[_MARKER] = str(self.root)
        return env

    def client(self, argv: list[str], *, check: bool = True, timeout: float = CLIENT_TIMEOUT_S) -> str:
        """Run a Slurm client command against this cluster; its stdout (raises SlurmError on failure)."""
        result = self._client(argv, check=check, timeout=timeout)
        return result.stdout

    def sbatch(
        self,
        script: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        script_args: Sequence[str] = (),
    ) -> int:
        """Submit ``script`` (sbatch options in ``args``, the script's own arguments in
        ``script_args``); the job id.

        ``env`` holds extra variables layered on ``self.env``; sbatch exports them to the job.
        """
        full_env = {**self.env, **(env or {})}
        out = self._client(
            ["sbatch", "--parsable", *args, str(script), *script_args], env=full_env, cwd=cwd, check=True
        ).stdout
        return int(out.strip().splitlines()[-1].split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, NodeList, StdOut, ...)."""
        out = self._client(["scontrol", "show", "job", "-o", str(job_id)], check=True).stdout
        line = out.strip().splitlines()[0] if out.strip() else ""
        record = parse_scontrol_record(line)
        if "JobState" not in record:
            raise SlurmError(f"unexpected scontrol output for job {job_id}: {out!r}")
        return record

    def wait_for(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; its info.

        Raises TimeoutError (with the job info and its stdout tail) after ``timeout_s``, and
        SlurmError as soon as the job ends in a state that is not wanted.
        """
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            state = info["JobState"]
            if state in states:
                return info
            if state in _FINAL_STATES:
                raise SlurmError(
                    f"job {job_id} ended {state}, wanted {sorted(states)}\n{self._job_report(info)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not in {sorted(states)} after {timeout_s} s\n{self._job_report(info)}"
                )
            time.sleep(_POLL_S)

    def requeue(self, job_id: int, *, prompt: bool = True, timeout_s: float = 30.0) -> dict[str, str]:
        """``scontrol requeue`` a job; with ``prompt``, also let it start as soon as it may. Its info.

        Slurm holds a requeued job back: ``BeginTime`` becomes the time the old run ended +
        cred_expire + 1 s (121 s with the default AuthInfo cred_expire=120; we configure 5 s),
        and after that the job waits for the next main scheduling pass (``sched_interval``: 60 s
        by default, 2 s here). With ``prompt`` we wait until the job is PENDING again (it stays
        COMPLETING until the old run is gone, SIGKILL after KillWait included) and
        ``start_now()`` it, which makes it run again ~6 s after the requeue.
        """
        self._client(["scontrol", "requeue", str(job_id)], check=True)
        if not prompt:
            return self.job_info(job_id)
        self.wait_for(job_id, {"PENDING"}, timeout_s)
        self.start_now(job_id)
        return self.job_info(job_id)

    def start_now(self, job_id: int) -> None:
        """Start a requeued job at its ``EligibleTime`` instead of the scheduling pass after it
        (``scontrol update StartTime=now``).

        Not earlier: the old run's job credential stays revoked until then, and a job started
        before fails at once ("Killing non-startable batch job: Job credential revoked").
        """
        eligible = self.job_info(job_id).get("EligibleTime", "")
        with contextlib.suppress(ValueError):
            time.sleep(max(0.0, datetime.fromisoformat(eligible).timestamp() + 0.5 - time.time()))
        update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now"]
        result = self._client(update, check=False)
        # Meanwhile a scheduling pass may have started it (and a short job finished): nothing to do.
        if result.returncode != 0 and self.job_info(job_id)["JobState"] == "PENDING":
            raise SlurmError(f"{' '.join(update)} failed: {result.stderr.strip() or result.stdout.strip()}")

    def cancel(self, job_id: int, signal: str | None = None, batch_only: bool = False) -> None:
        """``scancel`` the job, or only send ``signal`` (e.g. "USR1"); ``batch_only``: the batch shell only."""
        argv = ["scancel"]
        if signal is not None:
            argv.append(f"--signal={signal}")
        if batch_only:
            argv.append("--batch")
        self._client([*argv, str(job_id)], check=True)

    def logs_tail(self, max_chars: int = 2000) -> str:
        """The end of every daemon log, for error messages."""
        if not self.log_dir.is_dir():
            return f"<no logs in {self.log_dir}>"
        parts = [
            f"----- {path.name} -----\n{_tail(path, max_chars)}"
            for path in sorted(self.log_dir.iterdir())
            if path.is_file()
        ]
        return "\n".join(parts)

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------

    def _client(
        self,
        argv: list[str],
        *,
        check: bool,
        timeout: float = CLIENT_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                argv,
                env=dict(env) if env is not None else self.env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(f"{' '.join(argv)} timed out after {timeout} s (is slurmctld up?)") from exc
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(argv)} failed (rc={result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def _job_report(self, info: Mapping[str, str]) -> str:
        fields = " ".join(f"{k}={info.get(k, '?')}" for k in ("JobState", "Reason", "ExitCode", "Restarts"))
        stdout = info.get("StdOut", "")
        tail = _tail(Path(stdout)) if stdout else "<no StdOut>"
        return f"{fields}\n----- job stdout ({stdout}) -----\n{tail}"

    def _write_files(self) -> None:
        for sub in ("state", "spool", "run", "log", "munge", "fakedev"):
            path = self.root / sub
            if sub in ("state", "spool", "run", "log") and path.exists():
                shutil.rmtree(path)  # a fresh cluster: no jobs or node state from an earlier run
            path.mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
        self._munge_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-"))
        self._munge_dir.chmod(0o755)
        self.ctld_port = _free_port_block(1)
        base = _free_port_block(len(self.nodes), exclude=[self.ctld_port])
        self.slurmd_ports = tuple(range(base, base + len(self.nodes)))

        gres = ""
        if self.gpus_per_node:
            for i in range(self.gpus_per_node):
                link = self.root / "fakedev" / f"nvidia{i}"
                link.unlink(missing_ok=True)
                # Slurm only stat()s GRES files, and they must be character devices (regular files
                # leave CUDA_VISIBLE_DEVICES unset); with task/none nothing opens them.
                link.symlink_to(f"/dev/tty{i}")
            gres = f" Gres=gpu:{self.gpus_per_node}"
            (self.root / "gres.conf").write_text(
                f"NodeName={','.join(self.nodes)} Name=gpu File={self.root}/fakedev/nvidia[0-{self.gpus_per_node - 1}]\n"
            )
        (self.root / "plugstack.conf").write_text("")
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            f"ClusterName=c{os.getpid()}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._munge_dir}/munge.socket,cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            # A job that becomes eligible by time (a requeued one) waits for the main scheduling
            # pass: every 60 s by default.
            f"SchedulerParameters=sched_interval={self.sched_interval_s}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "JobRequeue=1",
            f"MinJobAge={self.min_job_age_s}",
            f"KillWait={self.kill_wait_s}",
            "SlurmdTimeout=30",
            "MailProg=/bin/true",  # the default (/usr/bin/mail) is absent; slurmctld logs an error
            "InactiveLimit=0",
            "Waittime=0",
            "SlurmdParameters=config_overrides",  # CPUs/GPUs beyond this machine's hardware
        ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
        ports = f"[{self.slurmd_ports[0]}-{self.slurmd_ports[-1]}]" if len(self.nodes) > 1 else str(base)
        node_list = ",".join(self.nodes)
        lines += [
            f"NodeName={node_list} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} "
            f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb}{gres} State=UNKNOWN",
            f"PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon_env(self) -> dict[str, str]:
        env = self.env
        env.pop("SLURM_CONF")
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start one daemon in the foreground of its own session; output to log/<name>.stdout."""
        with (self.log_dir / f"{name}.stdout").open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                start_new_session=True,
            )
        self._procs[name] = proc
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            system_key = Path("/etc/munge/munge.key")
            if system_key.is_file():
                shutil.copyfile(system_key, key)
            elif shutil.which("mungekey"):
                subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
            else:
                key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        assert self._munge_dir is not None
        sock = self._munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={self.log_dir}/munged.log",
                f"--pid-file={self.root}/run/munged.pid",
                f"--seed-file={self.root}/munge/munged.seed",
            ],
        )
        deadline = time.monotonic() + 10.0
        while True:
            if self._procs["munged"].poll() is not None:
                raise SlurmError("munged exited at start")
            if sock.exists():
                probe = subprocess.run(
                    ["munge", "-n", "-S", str(sock)], capture_output=True, timeout=5, stdin=subprocess.DEVNULL
                )
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise SlurmError("munged socket not answering after 10 s")
            time.sleep(0.05)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [name for name, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmError(f"daemon(s) exited at start: {', '.join(dead)}")
            result = None
            with contextlib.suppress(SlurmError):
                # short timeout: while slurmctld is still coming up, each call would block ~10 s
                result = self._client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=3.0)
            if result is not None and result.returncode == 0:
                states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
                if all(states.get(n) == "idle" for n in self.nodes):
                    log.info("Slurm cluster up in %s: %s", self.root, states)
                    return
            time.sleep(_POLL_S)
        raise SlurmError(f"nodes not idle after {self.start_timeout_s} s: {states}")

    def _reap(
        self, procs: Mapping[str, subprocess.Popen[bytes]], *, grace_s: float, term_first: bool = False
    ) -> None:
        """Wait for ``procs`` to exit (SIGTERM first if asked); SIGKILL their sessions after ``grace_s``."""
        for p in procs.values():
            if term_first and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for name, p in procs.items():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit; killing it", name, p.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, _signal.SIGKILL)
                p.wait(timeout=5.0)

    def job_processes(self) -> list[int]:
        """Pids that belong to this cluster's jobs: those carrying its marker, and their descendants.

        Descendants catch tasks submitted with ``--export=NONE`` (no marker in their environment):
        they still descend from a slurmstepd, which inherits the marker from slurmd.
        """
        needles = (f"{_MARKER}={self.root}\0".encode(), f"SLURM_CONF={self.conf}\0".encode())
        daemons = {p.pid for p in self._procs.values()}
        parent: dict[int, int] = {}
        marked: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                parent[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if pid not in daemons and any(n in _proc_environ(pid) for n in needles):
                marked.add(pid)
        found = set(marked)
        for pid in parent:
            chain, p = [], pid
            while p > 1 and p not in found and p not in chain:
                chain.append(p)
                p = parent.get(p, 0)
            if p in found:
                found.update(chain)
        protected = {os.getpid(), *daemons}
        p = os.getppid()
        while p > 1:  # never our own ancestors (e.g. pytest started from inside a job)
            protected.add(p)
            p = parent.get(p, 0)
        return sorted(pid for pid in found - protected if _alive(pid))

    def _kill_job_processes(self) -> list[int]:
        """SIGKILL this cluster's job processes (see ``_job_processes``); the pids it killed."""
        killed: list[int] = []
        for _ in range(3):  # again, in case one forked while we were looking
            pids = self.job_processes()
            if not pids:
                break
            for pid in pids:
                log.info(
                    "killing process %d (%s) of the Slurm cluster in %s", pid, _proc_cmdline(pid), self.root
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _signal.SIGKILL)
            killed += pids
            deadline = time.monotonic() + 5.0
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
        return killed
