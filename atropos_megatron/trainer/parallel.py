"""Distributed start-up and the parallel layout: the only module that touches Megatron's parallel_state.

A rank learns who it is from its launcher: torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or Slurm's srun (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``). It then joins one process group (nccl
with CUDA, gloo without) and Megatron splits that group into tensor x pipeline x data parallel groups.
Everything else in the trainer asks this module for ranks and groups instead of importing
``parallel_state`` itself, so the layout logic lives in one place.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atropos_megatron.config import ParallelConfig
from atropos_megatron.slurm import expand_hostlist, job_port

logger = logging.getLogger(__name__)


class LayoutError(ValueError):
    """The requested parallel layout cannot run on this world or this machine."""


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """`torchrun`, `slurm` or `single` (no launcher: one process)."""


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes and this rank's coordinates in the tensor x pipeline x data parallel grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1
    ep_rank: int = 0
    expert_dp_rank: int = 0
    """Which copy of this rank's experts it holds (ranks of one EP group hold different experts)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        vpp = f" x VPP={self.vpp}" if self.vpp else ""
        ep = f", EP={self.ep}" if self.ep > 1 else ""
        return f"TP={self.tp} x PP={self.pp}{vpp} x DP={self.dp}{ep} (world {self.world_size})"


# ------------------------------------------------------------------------------------------------
# Launcher environments (pure functions of the environment mapping)
# ------------------------------------------------------------------------------------------------


def detect_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job from torchrun's or Slurm's environment variables.

    torchrun's variables win when both are present (``srun torchrun ...`` sets both, and torchrun's
    describe the worker processes). Without either, the process is a single-rank job on loopback.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int_var(env, "RANK"),
            world_size=_int_var(env, "WORLD_SIZE"),
            local_rank=_int_var(env, "LOCAL_RANK", default=0),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_var(env, "MASTER_PORT", default=29500),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif nodelist:
            master_addr = first_slurm_host(nodelist)
        else:
            raise LayoutError("Slurm environment without SLURM_JOB_NODELIST or MASTER_ADDR")
        if "MASTER_PORT" in env:
            master_port = _int_var(env, "MASTER_PORT")
        else:
            master_port = job_port(_int_var(env, "SLURM_JOB_ID", default=0))
        return DistEnv(
            rank=_int_var(env, "SLURM_PROCID"),
            world_size=_int_var(env, "SLURM_NTASKS", default=_int_var(env, "SLURM_NPROCS", default=1)),
            local_rank=_int_var(env, "SLURM_LOCALID", default=0),
            master_addr=master_addr,
            master_port=master_port,
            launcher="slurm",
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=_int_var(env, "MASTER_PORT", default=0) or free_port(),
        launcher="single",
    )


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm hostlist, as ``scontrol show hostnames | head -1`` prints it.

    Handles ranges with zero padding and several bracket groups: ``gpu-[007-009,12],cpu1`` ->
    ``gpu-007``; ``rack[1-2]-n[3-4]`` -> ``rack1-n3``.
    """
    try:
        return expand_hostlist(nodelist)[0]
    except ValueError as exc:
        raise LayoutError(str(exc)) from None


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LayoutError(f"environment variable {name} is required by this launcher")
        return default
    try:
        return int(value)
    except ValueError:
        raise LayoutError(f"environment variable {name}={value!r} is not an integer") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (loopback: single-process and test jobs; ``""``:
    every interface, for a rendezvous that other machines join)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Process group + Megatron parallel state
# ------------------------------------------------------------------------------------------------


def resolve_backend(cfg: ParallelConfig) -> str:
    """The collective backend for this machine: nccl with CUDA, gloo without (unless forced)."""
    if cfg.backend != "auto":
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise LayoutError("parallel.backend=nccl needs CUDA; use gloo (or auto) on a CPU machine")
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_layout(cfg: ParallelConfig, world_size: int, *, te_available: bool) -> int:
    """Validate a layout against a world size and return the data-parallel size.

    Raises:
        LayoutError: naming the field, when the sizes do not divide the world or need a feature
            that is missing here.
    """
    if cfg.context_parallel_size > 1 and not te_available:
        raise LayoutError(
            "parallel.context_parallel_size > 1 needs Transformer Engine's attention, which does not "
            "import on this machine; set it to 1"
        )
    if world_size % cfg.model_parallel_size != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor_parallel_size x pipeline_parallel_size x "
            f"context_parallel_size = {cfg.tensor_parallel_size} x {cfg.pipeline_parallel_size} x "
            f"{cfg.context_parallel_size}"
        )
    expert_model_parallel = cfg.tensor_parallel_size * cfg.expert_parallel_size * cfg.pipeline_parallel_size
    if world_size % expert_model_parallel != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor_parallel_size x expert_parallel_size x "
            f"pipeline_parallel_size = {cfg.tensor_parallel_size} x {cfg.expert_parallel_size} x "
            f"{cfg.pipeline_parallel_size} (expert parallel ranks come from the data-parallel ranks)"
        )
    if cfg.expert_parallel_size > 1 and cfg.context_parallel_size > 1:
        raise LayoutError(
            "parallel.expert_parallel_size > 1 with context_parallel_size > 1 is not supported yet"
        )
    return world_size // cfg.model_parallel_size


def init_distributed(cfg: ParallelConfig, *, seed: int, env: DistEnv | None = None) -> ParallelLayout:
    """Join the job's process group and set up Megatron's TP x PP x DP groups and RNG streams.

    Safe to call when the default process group already exists (e.g. a test harness created it);
    then only the Megatron part is (re)built. Applies the CPU patches when CUDA is absent.
    """
    from atropos_megatron.trainer import megatron_patches

    env = env or detect_dist_env()
    backend = resolve_backend(cfg)
    if backend == "gloo":
        megatron_patches.apply_cpu_patches()
    megatron_patches.apply_torch_norm_patches()
    megatron_patches.apply_moe_router_patch()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_bracket_ipv6(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
        )
        logger.info(
            "joined process group: rank %d/%d via %s (%s, master %s:%d)",
            env.rank,
            env.world_size,
            env.launcher,
            backend,
            env.master_addr,
            env.master_port,
        )
    return setup_model_parallel(cfg, seed=seed)


def setup_model_parallel(cfg: ParallelConfig, *, seed: int) -> ParallelLayout:
    """(Re)build Megatron's parallel groups for ``cfg`` on the existing process group.

    Rebuilding is what lets one process group run several layouts in turn (tests compare TP=1,
    TP=2, PP=2 ... in one set of processes, because each process start costs ~5 s of imports).
    """
    from megatron.core import parallel_state, tensor_parallel

    from atropos_megatron.trainer.megatron_patches import te_available

    world_size = dist.get_world_size()
    check_layout(cfg, world_size, te_available=te_available())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=cfg.expert_parallel_size,
        distributed_timeout_minutes=max(1, int(cfg.timeout_s // 60)),
    )
    # Every rank must seed the tracker: attention forks the model-parallel RNG stream each forward.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)
    return current_layout()


def current_layout() -> ParallelLayout:
    """This rank's layout as Megatron currently has it."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


def stage_has(*, first: bool, vp_stage: int | None = None) -> bool:
    """Whether this rank's model chunk ``vp_stage`` is the first (``first=True``) or last pipeline stage."""
    from megatron.core import parallel_state as ps

    if first:
        return ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    return ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def tensor_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def pipeline_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def data_parallel_group() -> dist.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def expert_parallel_group() -> dist.ProcessGroup:
    """The ranks that hold the other experts of this rank's MoE layers (same TP rank and stage)."""
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group()


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # never import Megatron just to exit
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _bracket_ipv6(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
