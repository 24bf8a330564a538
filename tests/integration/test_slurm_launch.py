"""The multi-node path end to end on a real local Slurm cluster (slurmctld + two slurmd as fake nodes).

`examples/slurm/multi_node.sbatch` is submitted as a user would, with the tiny CPU config
(`examples/configs/slurm_cpu_tiny.yaml`): the launcher on node1 starts the Atropos API, the reference
inference server, the bridge, the environment and trainer rank 0; the launcher on node2 starts
trainer rank 1 (gloo across the two fake nodes). A second job is requeued mid-run, as a preemption
would, and must resume from its checkpoint. The cluster's daemons are stopped afterwards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]

REPO = Path(__file__).resolve().parents[2]
MULTI_NODE = REPO / "examples/slurm/multi_node.sbatch"
REQUEUE = REPO / "examples/slurm/requeue.sbatch"
CONFIG = REPO / "examples/configs/slurm_cpu_tiny.yaml"
JOB_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), kill_wait_s=60) as running:
        yield running


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from atropos_megatron.demo.assets import build_assets

    return build_assets(tmp_path_factory.mktemp("tiny"), seed=1234)


def _sbatch(
    cluster, assets, run_dir: Path, *, steps: int, script: Path = MULTI_NODE, overrides: tuple[str, ...] = ()
) -> int:
    from atropos_megatron.launch.supervisor import free_ports

    api, bridge, server, proxy = free_ports(4)
    env = {
        "CONFIG": str(CONFIG),
        "MODEL_PATH": str(assets.model_dir),
        "TOKENIZER_PATH": str(assets.tokenizer_dir),
        "OUTPUT_DIR": str(run_dir),
        "MAX_EPOCHS": str(steps),
        "ATROPOS_MEGATRON_DIR": str(REPO),
        "ATROPOS_MEGATRON_VENV": str(Path(sys.executable).parent.parent),
    }
    options = [
        "--nodes=2",  # the scripts ask for more
        "--gpus-per-node=1",  # the scripts ask for 8; the fake nodes have 4 (the run uses none)
        f"--output={run_dir}.out",
    ]
    ports = [f"launch.api_port={api}", f"launch.bridge_port={bridge}", f"launch.inference.port={server}",
             f"launch.proxy_port={proxy}"]  # fmt: skip
    # sbatch [options] script [script arguments]: the overrides reach `launch plan` through "$@".
    return cluster.sbatch(script, *options, env=env, cwd=REPO, script_args=[*ports, *overrides])


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _job_output(run_dir: Path) -> str:
    return Path(f"{run_dir}.out").read_text(errors="replace")


def test_multi_node_job_trains_checkpoints_and_exits_cleanly(cluster, assets, tmp_path, report):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job = _sbatch(cluster, assets, run_dir, steps=6)
    info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT_S)
    report(f"2-node job: {time.monotonic() - started:.0f} s from sbatch to COMPLETED")
    output = _job_output(run_dir)
    assert info["ExitCode"] == "0:0", output
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000006"
    session = f"job{job}-0"
    logs = run_dir / "logs" / session
    assert sorted(p.name for p in (logs / "node1").iterdir()) == [
        "atropos-api.log",
        "bridge.log",
        "env-alphabet.log",
        "inference-0.log",
        "trainer-0.log",
    ]
    assert sorted(p.name for p in (logs / "node2").iterdir()) == ["trainer-1.log"]
    # Rank 1 ran under node2's launcher, in one process group with rank 0 (data parallel 2).
    assert "launch[node2] INFO: node 1: started trainer-1" in output
    assert "joined process group: rank 0/2" in (logs / "node1/trainer-0.log").read_text()
    assert "launch[node1] INFO: node 0: training finished" in output
    assert "launch[node2] INFO: node 1: training finished" in output
    assert (run_dir / "launch" / session / "status/finished").exists()
    assert "failed" not in " ".join(p.name for p in (run_dir / "launch" / session / "status").iterdir())
    assert "killed" not in output  # every role stopped within its grace period
    _assert_no_job_processes(cluster)


def test_multi_node_job_in_vllm_mode_samples_through_the_bridges_proxy(cluster, assets, tmp_path, report):
    """The same job with the reference server as stock ``vllm serve`` (``weights.inference_engine: vllm``):
    the launcher starts it with vLLM's RL and token routes, the bridge pushes over vLLM's weight-transfer
    sequence (gloo), and the environment, on ``server_type: vllm``, generates through the bridge's proxy,
    so the inference log-probs it reads reach the trainer."""
    vllm = ("weights.inference_engine=vllm", "weights.transport=distributed", "weights.pause_mode=in_place")
    logs = _vllm_mode_job(cluster, assets, tmp_path, report, "vLLM mode", vllm)
    server_log = (logs / "inference-0.log").read_text()
    assert "reference server in vLLM mode" in server_log and "/inference/v1/generate on" in server_log
    assert "(distributed) to 1 server(s)" in (logs / "bridge.log").read_text()
    assert "server_type='vllm'" in (logs / "env-alphabet.log").read_text()


def test_multi_node_job_syncs_lora_adapters_into_vllm_through_the_proxy(cluster, assets, tmp_path, report):
    """LoRA with adapter sync through the launcher, in vLLM mode: the reference server starts with runtime
    LoRA (``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), each step's adapters go by ``disk``
    through ``/v1/load_lora_adapter``, and the environment generates through the proxy (which names the
    newest: ``test_lora_sync_vllm.py`` checks that against PeftModel)."""
    overrides = ("model.lora.rank=8", "weights.lora_sync=adapter", "weights.inference_engine=vllm",
                 "weights.transport=disk", f"weights.disk_dir={tmp_path / 'pushed'}",
                 "weights.pause_mode=in_place")  # fmt: skip
    logs = _vllm_mode_job(cluster, assets, tmp_path, report, "LoRA adapters into vLLM mode", overrides)
    server_log = (logs / "inference-0.log").read_text()
    assert "runtime LoRA updating on" in server_log and "LoRA adapter policy-v0 loaded" in server_log


def _vllm_mode_job(cluster, assets, tmp_path, report, label: str, overrides: tuple[str, ...]) -> Path:
    """A 4-step job with the server in vLLM mode, checked to finish, run its environment through the
    bridge's proxy, and bring step 1's inference log-probs to the trainer (the weights it starts from:
    its own); node1's log directory."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job = _sbatch(cluster, assets, run_dir, steps=4, overrides=overrides)
    info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT_S)
    report(f"2-node job, {label}: {time.monotonic() - started:.0f} s from sbatch to COMPLETED")
    assert info["ExitCode"] == "0:0", _job_output(run_dir)
    assert _steps(run_dir) == [1, 2, 3, 4]
    logs = run_dir / "logs" / f"job{job}-0" / "node1"
    assert "vLLM /generate proxy" in (logs / "bridge.log").read_text()
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/logprob_abs_diff"] < 1e-5, first
    _assert_no_job_processes(cluster)
    return logs


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, assets, tmp_path, report):
    """`scontrol requeue` does what preemption does: SIGTERM to every process of the job at once
    (the bridge and the API go down while the trainer checkpoints), KillWait, back to the queue."""
    run_dir, steps = tmp_path / "run", 12
    job = _sbatch(cluster, assets, run_dir, steps=steps, script=REQUEUE)
    before = _wait_for_progress(cluster, job, run_dir, steps=3)
    requeued = time.monotonic()
    cluster.requeue(job)
    info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT_S)
    report(f"requeued at step {before}; COMPLETED {time.monotonic() - requeued:.0f} s later")
    output = _assert_resumed(cluster, job, run_dir, info, steps=steps, after=before)
    assert "requeueing job" not in output  # Slurm requeued it; the script must not do it again


def test_time_limit_warning_checkpoints_and_requeues_itself(cluster, assets, tmp_path, report):
    """`#SBATCH --signal=B:USR1@...` warns the batch shell only: requeue.sbatch asks every node to stop
    (`launch stop`), the trainer checkpoints while the services still run, and the script requeues
    the job itself."""
    run_dir, steps = tmp_path / "run", 12
    job = _sbatch(cluster, assets, run_dir, steps=steps, script=REQUEUE)
    before = _wait_for_progress(cluster, job, run_dir, steps=3)
    warned = time.monotonic()
    cluster.cancel(job, signal="USR1", batch_only=True)
    cluster.wait_for(job, {"PENDING"}, JOB_TIMEOUT_S)  # the script's own `scontrol requeue`
    cluster.start_now(job)  # skip Slurm's requeue hold (see tests/SLURM_NOTES.md)
    info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT_S)
    report(f"USR1 at step {before}; COMPLETED {time.monotonic() - warned:.0f} s later")
    output = _assert_resumed(cluster, job, run_dir, info, steps=steps, after=before)
    assert "stopped by SIGUSR1 (time limit near) before the last step: requeueing job" in output
    first = run_dir / f"logs/job{job}-0"
    assert "stop requested: SIGUSR1 (time limit near)" in output
    # The trainer stopped first, so its last step was acknowledged by a bridge still running.
    assert "could not acknowledge" not in (first / "node1/trainer-0.log").read_text()


def _wait_for_progress(cluster: SlurmCluster, job: int, run_dir: Path, *, steps: int) -> int:
    """Wait until the job has a checkpoint and ``steps`` logged steps; the last step logged."""
    cluster.wait_for(job, {"RUNNING"}, JOB_TIMEOUT_S)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "checkpoints/latest").exists() or len(_steps(run_dir)) < steps:
        assert time.monotonic() < deadline, _job_output(run_dir)
        assert cluster.job_info(job)["JobState"] == "RUNNING", _job_output(run_dir)
        time.sleep(0.5)
    return max(_steps(run_dir))


def _assert_resumed(cluster: SlurmCluster, job: int, run_dir: Path, info, *, steps: int, after: int) -> str:
    output = _job_output(run_dir)
    assert info["ExitCode"] == "0:0", output
    assert int(info["Restarts"]) == 1
    assert f"start 0 of job {job}" in output and f"start 1 of job {job}" in output  # --open-mode=append
    first = (run_dir / f"logs/job{job}-0/node1/trainer-0.log").read_text()
    second = (run_dir / f"logs/job{job}-1/node1/trainer-0.log").read_text()
    assert "checkpoint written" in first, first[-3000:]  # the trainer saved before it left
    resumed = [line for line in second.splitlines() if "resumed from" in line]
    assert resumed, second[-3000:]
    assert int(resumed[0].rsplit("at step ", 1)[1].split()[0]) >= after
    # One curve: each step once, in order, through the restart.
    assert _steps(run_dir) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{steps:08d}"
    _assert_no_job_processes(cluster)
    return output


def _assert_no_job_processes(cluster: SlurmCluster, timeout_s: float = 10.0) -> None:
    """Nothing the job started outlives it (slurmstepd may take a moment to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while (left := cluster.job_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "outlived the job: " + "; ".join(f"{pid} {_cmdline(pid)}" for pid in left)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
