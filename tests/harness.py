"""Run a test body on N real processes joined in a gloo process group, with a hard deadline.

Collective bugs hang rather than fail, so every run has a deadline: when it passes, each live rank
dumps its Python stacks to stderr (pytest shows them as captured output) and is killed, and the
test fails naming the ranks that did not finish. When a rank raises, the failure names the rank and
carries its traceback.

Process start-up costs ~5 s (torch + megatron imports), so a test should run several checks in one
call — e.g. loop over parallel layouts inside the body, rebuilding Megatron's groups with
``parallel.setup_model_parallel`` — rather than start processes per check.

The body must be a module-level function (it is pickled by reference into spawned processes) with
signature ``body(rank, world_size, *args)``; whatever it returns must pickle, and comes back to the
caller as a list indexed by rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import pickle
import queue
import random
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120.0
_STACK_DUMP_GRACE_S = 2.0
_GRACE_AFTER_FAILURE_S = 5.0
_EXIT_GRACE_S = 60.0  # for ranks that reported to exit by themselves (they are on their way out)
_PR_SET_PDEATHSIG = 1


class RankFailure(AssertionError):
    """One or more ranks raised or did not finish in time."""


def run_ranks(
    body: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    launcher: str = "torchrun",
) -> list[Any]:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` processes; return results by rank.

    Each rank gets the environment its launcher would give it, so that
    ``parallel.init_distributed`` finds its place in the job: ``launcher="torchrun"`` sets
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``launcher="slurm"``
    sets only what srun sets (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
    ``SLURM_JOB_NODELIST``, ``SLURM_JOB_ID``), with a job id whose derived port is free. Every
    rank runs one compute thread (all ranks share 2 cores here).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env_for_rank = _LAUNCHERS[launcher](world_size)
    procs = []
    for rank in range(world_size):
        rank_env = {"OMP_NUM_THREADS": "1", **env_for_rank(rank)}
        # Not daemonic: Megatron's checkpoint writer starts processes of its own, which daemons may
        # not. The `finally` below kills any rank still alive, whatever happened.
        proc = ctx.Process(target=_rank_main, args=(body, rank, world_size, args, rank_env, results))
        proc.start()
        procs.append(proc)
    reported: set[int] = set()
    try:
        return _collect(procs, results, timeout_s, reported)
    finally:
        _end_ranks(procs, reported)


def _end_ranks(procs: list, reported: set[int]) -> None:
    """Let ranks that reported finish exiting (their own children, e.g. Megatron's checkpoint writer,
    shut down with them), then kill whatever is left with its whole process group."""
    deadline = time.monotonic() + _EXIT_GRACE_S
    for rank in sorted(reported):
        procs[rank].join(timeout=max(deadline - time.monotonic(), 0))
    for proc in procs:
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the rank and every process it started
        proc.join(timeout=30)


def _torchrun_env(world_size: int) -> Callable[[int], dict[str, str]]:
    from atropos_megatron.trainer.parallel import free_port

    port = str(free_port())
    return lambda rank: {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
    }


def _slurm_env(world_size: int) -> Callable[[int], dict[str, str]]:
    from atropos_megatron.slurm import SLURM_PORT_BASE, SLURM_PORT_RANGE

    for job_id in random.sample(range(SLURM_PORT_RANGE), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORT_BASE + job_id))
            except OSError:
                continue
        break
    else:
        raise RuntimeError("no free port in the Slurm-derived range")
    return lambda rank: {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(world_size),
        "SLURM_LOCALID": str(rank),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": str(job_id),
    }


_LAUNCHERS = {"torchrun": _torchrun_env, "slurm": _slurm_env}


def _collect(procs: list, results, timeout_s: float, reported: set[int]) -> list[Any]:
    world_size = len(procs)
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            for rank, proc in enumerate(procs):
                if rank not in outcomes and proc.exitcode not in (None, 0):
                    outcomes[rank] = ("error", f"process exited with code {proc.exitcode} before reporting")
            continue
        outcomes[rank] = (status, payload)
        reported.add(rank)
        if status == "error":
            # Peers of a failed rank usually block in a collective: give them a moment, then stop.
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)

    missing = [rank for rank in range(world_size) if rank not in outcomes]
    errors = {rank: payload for rank, (status, payload) in outcomes.items() if status == "error"}
    if missing:
        for rank in missing:
            if procs[rank].is_alive():
                os.kill(procs[rank].pid, signal.SIGUSR1)  # faulthandler: dump stacks to stderr
        time.sleep(_STACK_DUMP_GRACE_S)
    if errors or missing:
        lines = [f"rank {rank} failed:\n{payload}" for rank, payload in sorted(errors.items())]
        if missing:
            lines.append(
                f"ranks {missing} did not finish within {timeout_s:.0f} s (a hang in a collective?); "
                "their stacks are in the captured stderr"
            )
        raise RankFailure("\n".join(lines))
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]


def _rank_main(body, rank, world_size, args, rank_env, results) -> None:
    os.setpgrp()  # one process group per rank, so that ending the rank ends its children too
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)  # die with the test
    os.environ.update(rank_env)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch

    torch.set_num_threads(1)
    try:
        value = body(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from atropos_megatron.trainer import parallel

        with contextlib.suppress(Exception):  # best effort; the parent judges by the reports
            parallel.shutdown()
