"""Launcher environments (torchrun, Slurm) and layout checks, as pure functions of their inputs."""

from __future__ import annotations

import pytest

from atropos_megatron.config import ParallelConfig
from atropos_megatron.slurm import SLURM_PORT_BASE
from atropos_megatron.trainer.parallel import (
    LayoutError,
    check_layout,
    detect_dist_env,
    first_slurm_host,
)


def test_torchrun_environment():
    env = detect_dist_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
    )
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 1)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 29400, "torchrun")


def test_slurm_environment_uses_first_node_and_job_port():
    env = detect_dist_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "5",
            "SLURM_JOB_NODELIST": "gpu-[007-009,012]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu-007"
    assert env.master_port == SLURM_PORT_BASE + 123456 % 10000


def test_slurm_environment_respects_exported_master():
    env = detect_dist_env(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "a[1-2]",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "1234",
        }
    )
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 1234)


def test_torchrun_wins_over_slurm():
    env = detect_dist_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.launcher, env.rank) == ("torchrun", 1)


def test_no_launcher_is_a_single_process_job():
    env = detect_dist_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert env.master_port > 0


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("localhost", "localhost"),
        ("node1,node2", "node1"),
        ("node[01-04]", "node01"),
        ("gpu-[007-009,12],cpu1", "gpu-007"),
        ("rack[1-2]-n[3-4]", "rack1-n3"),
        ("a[5,7]", "a5"),
        ("  host9  ", "host9"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-04", ","])
def test_bad_slurm_nodelist_is_an_error(nodelist):
    with pytest.raises(LayoutError):
        first_slurm_host(nodelist)


def test_non_integer_rank_is_an_error():
    with pytest.raises(LayoutError, match="RANK='x'"):
        detect_dist_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_layout_divides_world_into_data_parallel_groups():
    assert (
        check_layout(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2), 8, te_available=False)
        == 2
    )


@pytest.mark.parametrize(
    ("sizes", "world", "match"),
    [
        (dict(tensor_parallel_size=2, pipeline_parallel_size=2), 6, "not divisible"),
        (dict(context_parallel_size=2), 2, "context_parallel_size.*Transformer Engine"),
        (dict(expert_parallel_size=4, tensor_parallel_size=2), 4, "expert_parallel_size.*data-parallel"),
        (dict(expert_parallel_size=3), 4, "tensor_parallel_size x expert_parallel_size"),
    ],
)
def test_unsupported_layouts_are_rejected_with_the_field_named(sizes, world, match):
    with pytest.raises(LayoutError, match=match):
        check_layout(ParallelConfig(**sizes), world, te_available=False)
