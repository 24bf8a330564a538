"""The per-node launcher with real processes: start order, failure propagation between nodes,
SIGTERM stopping the trainer first, `launch stop`, and no process left behind.

The roles are small Python scripts that record what happens to them (signals, pids), so that each
behaviour is observed rather than assumed; the full system on a real Slurm cluster is
tests/integration/test_slurm_launch.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atropos_megatron.launch.allocation import Node
from atropos_megatron.launch.plan import LaunchPlan, NodePlan, ProbeSpec, RoleSpec

pytestmark = pytest.mark.distributed

ROLE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    name, mode, record = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    record.mkdir(parents=True, exist_ok=True)
    (record / f"{name}.pid").write_text(str(os.getpid()))

    def note(event):
        with open(record / "events", "a") as f:
            f.write(f"{time.monotonic():.4f} {name} {event}\\n")

    def on_term(signum, frame):
        note("sigterm")
        if mode == "checkpointing":
            time.sleep(1.0)  # writes its checkpoint
            note("checkpoint-written")
            sys.exit(143)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    note("started")
    if mode == "finish":
        time.sleep(1.0)
        note("finished")
        sys.exit(0)
    if mode == "fail":
        time.sleep(1.0)
        print("something went wrong in the role", flush=True)
        sys.exit(3)
    while True:
        time.sleep(0.05)
    """
)


def _role(script: Path, record: Path, name: str, mode: str, *, kind: str = "service", needs=()) -> RoleSpec:
    return RoleSpec(
        name=name,
        command=(sys.executable, str(script), name, mode, str(record)),
        kind=kind,
        summary=f"{name} ({mode})",
        needs=tuple(needs),
    )


def _plan(tmp_path: Path, nodes: list[list[RoleSpec]], *, startup_timeout_s: float = 20.0) -> Path:
    plan = LaunchPlan(
        session="job1-0",
        run_dir=str(tmp_path / "run"),
        config_file=str(tmp_path / "config.yaml"),
        nodes=tuple(
            NodePlan(index, Node(f"node{index + 1}", "127.0.0.1"), tuple(roles))
            for index, roles in enumerate(nodes)
        ),
        api_url="http://127.0.0.1:1",
        bridge_address="127.0.0.1:1",
        inference_urls=(),
        gpus_per_node=0,
        trainer_rank0_node=0,
        startup_timeout_s=startup_timeout_s,
        trainer_stop_grace_s=10.0,
        stop_grace_s=5.0,
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def _launch(plan: Path, node: int, tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / f"launcher-{node}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atropos_megatron.cli",
            "launch",
            "run",
            "--plan",
            str(plan),
            "--node",
            str(node),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _events(record: Path) -> list[tuple[str, str]]:
    lines = (record / "events").read_text().split("\n")
    return [tuple(line.split()[1:]) for line in lines if line]


def _assert_all_gone(record: Path) -> None:
    for pid_file in record.glob("*.pid"):
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"{pid_file.stem} (pid {pid}) outlived its launcher"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purposes
        return stat.read().split()[2] != "Z"


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "role.py"
    path.write_text(ROLE_SCRIPT)
    return path


def test_a_failed_role_ends_every_node_with_its_message(tmp_path, script):
    record = tmp_path / "record"
    plan = _plan(
        tmp_path,
        [
            [
                _role(script, record, "bridge", "serve"),
                _role(script, record, "trainer-0", "serve", kind="trainer"),
            ],
            [_role(script, record, "trainer-1", "fail", kind="trainer")],
        ],
    )
    launchers = [_launch(plan, node, tmp_path) for node in (0, 1)]
    codes = [launcher.wait(timeout=60) for launcher in launchers]
    assert codes == [1, 1]
    failed = (tmp_path / "run/launch/job1-0/status/failed-1").read_text()
    assert "trainer-1 exited with status 3" in failed
    assert "something went wrong in the role" in failed  # the log's tail travels with the error
    node0 = (tmp_path / "launcher-0.log").read_text()
    assert "another node failed: node 1 (node2): trainer-1 exited with status 3" in node0
    assert ("trainer-0", "sigterm") in _events(record)
    assert (tmp_path / "run/logs/job1-0/node2/trainer-1.log").is_file()  # per-role logs, per node
    _assert_all_gone(record)


def test_sigterm_stops_the_trainer_first_and_lets_it_checkpoint(tmp_path, script):
    record = tmp_path / "record"
    plan = _plan(
        tmp_path,
        [
            [
                _role(script, record, "bridge", "serve"),
                _role(script, record, "trainer-0", "checkpointing", kind="trainer"),
            ]
        ],
    )
    launcher = _launch(plan, 0, tmp_path)
    _wait_for_event(record, ("trainer-0", "started"))
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    events = _events(record)
    order = [event for event in events if event[1] != "started"]
    assert order == [("trainer-0", "sigterm"), ("trainer-0", "checkpoint-written"), ("bridge", "sigterm")]
    assert "trainer-0 stopped (status 143)" in (tmp_path / "launcher-0.log").read_text()
    _assert_all_gone(record)


def test_launch_stop_reaches_every_node(tmp_path, script):
    record = tmp_path / "record"
    plan = _plan(
        tmp_path,
        [
            [_role(script, record, "trainer-0", "checkpointing", kind="trainer")],
            [_role(script, record, "inference-0", "serve")],
        ],
    )
    launchers = [_launch(plan, node, tmp_path) for node in (0, 1)]
    _wait_for_event(record, ("inference-0", "started"))
    _wait_for_event(record, ("trainer-0", "started"))
    stop = subprocess.run(
        [
            sys.executable,
            "-m",
            "atropos_megatron.cli",
            "launch",
            "stop",
            "--plan",
            str(plan),
            "--reason",
            "test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert stop.returncode == 0, stop.stderr
    assert [launcher.wait(timeout=30) for launcher in launchers] == [143, 143]
    assert ("trainer-0", "checkpoint-written") in _events(record)
    assert "stop requested: test" in (tmp_path / "launcher-1.log").read_text()
    _assert_all_gone(record)


def test_training_finished_on_rank0_node_releases_the_other_nodes(tmp_path, script):
    record = tmp_path / "record"
    plan = _plan(
        tmp_path,
        [
            [
                _role(script, record, "bridge", "serve"),
                _role(script, record, "trainer-0", "finish", kind="trainer"),
            ],
            [_role(script, record, "inference-0", "serve")],
        ],
    )
    launchers = [_launch(plan, node, tmp_path) for node in (0, 1)]
    assert [launcher.wait(timeout=60) for launcher in launchers] == [0, 0]
    assert (tmp_path / "run/launch/job1-0/status/finished").exists()
    assert ("inference-0", "sigterm") in _events(record)
    _assert_all_gone(record)


def test_a_role_whose_needs_never_answer_is_reported_not_started(tmp_path, script):
    record = tmp_path / "record"
    needs = [ProbeSpec("tcp", "127.0.0.1:9")]  # discard port: nothing listens
    plan = _plan(
        tmp_path,
        [[_role(script, record, "trainer-0", "serve", kind="trainer", needs=needs)]],
        startup_timeout_s=2.0,
    )
    launcher = _launch(plan, 0, tmp_path)
    assert launcher.wait(timeout=30) == 1
    failed = (tmp_path / "run/launch/job1-0/status/failed-0").read_text()
    assert "trainer-0 was not started: 127.0.0.1:9 did not answer within 2 s" in failed


def _wait_for_event(record: Path, event: tuple[str, str], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (record / "events").exists() and event in _events(record):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{event} did not happen within {timeout_s} s")
