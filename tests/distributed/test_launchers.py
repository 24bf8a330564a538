"""Ranks initialise from a real torchrun launch and from a Slurm (srun-style) environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("torchrun_worker.py")


def _init_and_all_reduce(rank, world_size):
    """Join via the launcher's environment, build a TP=2 layout, and prove the group works."""
    import torch
    import torch.distributed as dist

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel

    env = parallel.detect_dist_env()
    layout = parallel.init_distributed(ParallelConfig(tensor_parallel_size=2), seed=0)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total, group=parallel.tensor_parallel_group())
    return {
        "launcher": env.launcher,
        "rank": layout.rank,
        "tp_rank": layout.tp_rank,
        "sum": total.item(),
        "port": env.master_port,
        "backend": dist.get_backend(),
    }


def test_slurm_environment_initialises():
    results = run_ranks(_init_and_all_reduce, 2, launcher="slurm", timeout_s=90)
    assert [r["launcher"] for r in results] == ["slurm", "slurm"]
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 3.0 for r in results)
    assert results[0]["port"] == results[1]["port"] >= 20000  # derived from SLURM_JOB_ID


def test_torchrun_launch_initialises(tmp_path):
    from atropos_megatron.trainer.parallel import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["launcher"] for r in results] == ["torchrun", "torchrun"]
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 3.0 and r["backend"] == "gloo" for r in results)
