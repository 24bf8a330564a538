"""What a real Slurm does to our jobs, measured on a private two-node cluster (tests/slurm_cluster.py).

Three facts our Slurm examples and the trainer's restart path rely on: a two-node ``--gpus-per-node``
job can find its rendezvous address and run a gloo collective across the nodes; a requeued job runs
again with ``SLURM_RESTART_COUNT`` raised (and how long Slurm holds it back); and which processes
``scancel`` signals, in which order and how long before SIGKILL. The daemons start once per module
(~1 s); each test submits real sbatch scripts. Measured numbers appear under "measured".
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_available

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PY = sys.executable
KILL_WAIT_S = 4
CRED_EXPIRE_S = 5
SCHED_INTERVAL_S = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(
        tmp_path_factory.mktemp("slurm"),
        kill_wait_s=KILL_WAIT_S,
        cred_expire_s=CRED_EXPIRE_S,
        sched_interval_s=SCHED_INTERVAL_S,
    ) as c:
        yield c


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def _wait_file(path: Path, timeout_s: float, *, lines: int = 1) -> list[str]:
    """The lines of ``path`` once it has at least ``lines`` of them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            content = path.read_text().splitlines()
            if len(content) >= lines:
                return content
        time.sleep(0.05)
    raise TimeoutError(f"{path} has fewer than {lines} lines after {timeout_s} s")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------------------------------------
# Two nodes, fake GPUs, a gloo all-reduce
# ------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
    import datetime
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(
        f"rank={rank} node={os.environ['SLURMD_NODENAME']} "
        f"cuda_visible={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')} sum={t.item()}",
        flush=True,
    )
    dist.destroy_process_group()
"""


def test_two_node_gloo_all_reduce_with_fake_gpus(cluster: SlurmCluster, tmp_path: Path, report) -> None:
    jobdir = tmp_path / "job dir"  # a space in Command= and StdOut= checks job_info's parsing
    jobdir.mkdir()
    ddp = _write(jobdir / "ddp.py", DDP_SCRIPT)
    job = _write(
        jobdir / "ddp.sbatch",
        f"""
        #!/bin/bash
        set -euo pipefail
        # Fake node names do not resolve; NodeAddr does, here and on a real cluster.
        HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        MASTER_ADDR=$(scontrol show node "$HEAD" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)
        export MASTER_ADDR
        echo "batch node=$SLURMD_NODENAME head=$HEAD MASTER_ADDR=$MASTER_ADDR"
        srun --label "{PY}" "{ddp}"
        """,
    )
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    job_id = cluster.sbatch(
        job,
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=2",
        "--cpus-per-task=1",
        "--time=5",
        f"--output={jobdir}/ddp-%j.out",
        env={"MASTER_PORT": str(port)},
        cwd=jobdir,
    )
    info = cluster.wait_for(job_id, {"COMPLETED"}, timeout_s=60)
    elapsed = time.monotonic() - t0
    out = Path(info["StdOut"]).read_text()

    assert info["ExitCode"] == "0:0", out
    assert info["Command"] == str(job) and info["StdOut"] == f"{jobdir}/ddp-{job_id}.out", info
    assert info["NodeList"] == "node[1-2]" and info["BatchHost"] == "node1", info
    assert "MASTER_ADDR=127.0.0.1" in out, out
    ranks = [line for line in out.splitlines() if "rank=" in line]
    assert len(ranks) == 2, out
    assert {"node=node1", "node=node2"} <= set(" ".join(ranks).split()), out
    assert all("sum=3.0" in line for line in ranks), out
    assert all("cuda_visible=0,1" in line for line in ranks), out
    report(f"2-node gloo job: submit -> COMPLETED in {elapsed:.1f} s")


# ------------------------------------------------------------------------------------------------
# Requeue
# ------------------------------------------------------------------------------------------------


def _slurm_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_requeued_job_runs_again_with_restart_count(cluster: SlurmCluster, tmp_path: Path, report) -> None:
    runs = tmp_path / "runs.txt"
    job = _write(
        tmp_path / "requeue.sbatch",
        f"""
        #!/bin/bash
        echo "${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N) $SLURMD_NODENAME" >> {runs}
        # The first two runs wait to be requeued; the third finishes.
        if [ "${{SLURM_RESTART_COUNT:-0}}" -lt 2 ]; then sleep 300; fi
        """,
    )
    job_id = cluster.sbatch(job, "--requeue", "--time=5", f"--output={tmp_path}/requeue-%j.out")
    cluster.wait_for(job_id, {"RUNNING"}, timeout_s=30)
    _wait_file(runs, 10)

    # A plain requeue (as a job requeueing itself would do): Slurm holds the job back until the
    # old run's end + cred_expire + 1 s (SubmitTime is reset to that end), then until its next
    # main scheduling pass. (Its Reason shows "BeginTime" only once the scheduler has looked at it,
    # which on a busy machine can be after the hold is over: the times are the evidence.)
    t_plain = time.time()
    cluster.requeue(job_id, prompt=False)
    info = cluster.wait_for(job_id, {"PENDING"}, timeout_s=30)
    hold_s = _slurm_time(info["EligibleTime"]) - _slurm_time(info["SubmitTime"])
    assert CRED_EXPIRE_S <= hold_s <= CRED_EXPIRE_S + 2, info
    first = _wait_file(runs, 30, lines=2)
    restart_1_after = float(first[1].split()[1]) - t_plain

    # requeue(): once the job is pending again, start_now() clears the hold.
    t_requeue = time.time()
    cluster.requeue(job_id)
    info = cluster.wait_for(job_id, {"COMPLETED"}, timeout_s=30)
    lines = runs.read_text().splitlines()
    restart_2_after = float(lines[2].split()[1]) - t_requeue

    assert [line.split()[0] for line in lines] == ["0", "1", "2"], lines
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
    # Never before the hold is over (Slurm's times have whole seconds: allow one). How soon after it,
    # and how soon requeue() gets a job running again, depend on the machine's load: reported only.
    assert hold_s - 1 <= restart_1_after, (hold_s, restart_1_after)
    report(
        f"plain requeue: BeginTime hold {hold_s:.0f} s (cred_expire={CRED_EXPIRE_S}), running again after "
        f"{restart_1_after:.1f} s (sched_interval={SCHED_INTERVAL_S}); requeue(): {restart_2_after:.1f} s"
    )


# ------------------------------------------------------------------------------------------------
# Signals: scancel --signal --batch, then scancel
# ------------------------------------------------------------------------------------------------

# A task that, like our supervisor, starts a child in its own session; both log every signal they
# get and never exit on their own, so the SIGKILL after KillWait is what ends them.
SIGNAL_SCRIPT = """
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out, role = Path(sys.argv[1]), sys.argv[2]

    def log(signum, frame):
        with open(out / f"{role}.signals", "a") as f:
            f.write(f"{signal.Signals(signum).name} {time.time():.3f}\\n")

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT):
        signal.signal(s, log)
    if role == "task":
        subprocess.Popen([sys.executable, __file__, str(out), "child"], start_new_session=True)
    (out / f"{role}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
"""


def _signals(path: Path, since: float = 0.0) -> list[tuple[str, float]]:
    """(signal name, time received) as logged by a job process, from ``since`` on."""
    if not path.exists():
        return []
    sigs = [(name, float(t)) for name, t in (line.split() for line in path.read_text().splitlines())]
    return [(name, t) for name, t in sigs if t >= since]


def _names(path: Path) -> list[str]:
    return [name for name, _ in _signals(path)]


def test_scancel_signal_delivery(cluster: SlurmCluster, tmp_path: Path, report) -> None:
    sig = _write(tmp_path / "sig.py", SIGNAL_SCRIPT)
    job = _write(
        tmp_path / "sig.sbatch",
        f"""
        #!/bin/bash
        log() {{ echo "$1 $(date +%s.%N)" >> {tmp_path}/batch.signals; }}
        trap 'log SIGUSR1' USR1
        trap 'log SIGTERM' TERM
        srun --ntasks-per-node=1 {PY} {sig} {tmp_path} task &
        while true; do sleep 0.1; done
        """,
    )
    job_id = cluster.sbatch(job, "--nodes=1", "--time=5", f"--output={tmp_path}/sig-%j.out")
    cluster.wait_for(job_id, {"RUNNING"}, timeout_s=30)
    task_pid = int(_wait_file(tmp_path / "task.pid", 20)[0])
    child_pid = int(_wait_file(tmp_path / "child.pid", 20)[0])

    # --batch: only the batch shell gets the signal; srun, the task and its child do not.
    cluster.cancel(job_id, signal="USR1", batch_only=True)
    _wait_file(tmp_path / "batch.signals", 10)
    # Without --batch: every process of every step (the setsid'd child too), but not the batch shell.
    cluster.cancel(job_id, signal="USR2")
    _wait_file(tmp_path / "task.signals", 10)
    _wait_file(tmp_path / "child.signals", 10)
    time.sleep(1.0)  # late or duplicate deliveries would show up by now
    assert _names(tmp_path / "batch.signals") == ["SIGUSR1"]
    assert _names(tmp_path / "task.signals") == ["SIGUSR2"]
    assert _names(tmp_path / "child.signals") == ["SIGUSR2"]

    # scancel: SIGCONT + SIGTERM to the batch shell and to every step process, setsid'd or not;
    # SIGKILL to all of them KillWait seconds later.
    t_cancel = time.time()
    cluster.cancel(job_id)
    died: dict[str, float] = {}
    deadline = time.monotonic() + KILL_WAIT_S + 120  # a hang, not a busy machine, reaches it
    while len(died) < 2 and time.monotonic() < deadline:
        for name, pid in (("task", task_pid), ("child", child_pid)):
            if name not in died and not _alive(pid):
                died[name] = time.time()
        time.sleep(0.02)
    for name, pid in (("task", task_pid), ("child", child_pid)):
        if name not in died:  # not killed by Slurm: fail below, but leave nothing behind
            os.kill(pid, signal.SIGKILL)
    info = cluster.wait_for(job_id, {"CANCELLED"}, timeout_s=30)

    after = {
        name: _signals(tmp_path / f"{name}.signals", since=t_cancel) for name in ("batch", "task", "child")
    }
    for name, sigs in after.items():
        report(f"{name}: {[(s, round(t - t_cancel, 2)) for s, t in sigs]} (s after scancel)")
    report(
        f"SIGKILL after scancel: { {k: round(v - t_cancel, 2) for k, v in died.items()} } (KillWait={KILL_WAIT_S})"
    )
    assert info["JobState"] == "CANCELLED"
    # Slurm sends SIGCONT then SIGTERM, but the recorded order is not evidence of that: CPython runs
    # the handlers of signals pending together in signal-number order (TERM=15 before CONT=18), and on
    # a busy machine the process is often not scheduled between the two deliveries.
    assert sorted(s for s, _ in after["task"]) == ["SIGCONT", "SIGTERM"], after
    assert sorted(s for s, _ in after["child"]) == ["SIGCONT", "SIGTERM"], after
    assert [s for s, _ in after["batch"]] == ["SIGTERM"], after
    assert set(died) == {"task", "child"}, f"not killed by Slurm: { ({'task', 'child'} - set(died)) }"
    for name in ("task", "child"):  # SIGKILL no sooner than KillWait after SIGTERM (how much later: load)
        term_to_kill = died[name] - next(t for s, t in after[name] if s == "SIGTERM")
        assert term_to_kill >= KILL_WAIT_S - 0.5, (name, term_to_kill)
