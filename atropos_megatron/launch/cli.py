"""``atropos-megatron launch``: plan a job once, run each node's part, stop it gracefully.

In an sbatch script (see ``examples/slurm/``)::

    PLAN=$(atropos-megatron launch plan --config recipe.yaml key=value ...)   # once, in the batch step
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 atropos-megatron launch run --plan "$PLAN"

Outside Slurm, ``launch run --config ...`` plans this machine alone and runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from atropos_megatron.logs import configure_logging

ENVIRONMENT_OVERRIDES = (
    ("ATROPOS_API_URL", "launch.api_url", "an Atropos API that already runs (none is started)"),
    ("MODEL_PATH", "model.hf_path", "the HF checkpoint to train (and serve)"),
    ("OUTPUT_DIR", "logging.run_dir", "run directory: checkpoints, metrics, logs"),
    ("NUM_GPUS", "launch.gpus_per_node", "GPUs per node (0: CPU)"),
    ("BATCH_SIZE", "data.batch_size", "sequences per step"),
    ("MAX_EPOCHS", "steps", "training steps (the name users of the Atropos-VeRL integration know)"),
    ("INFERENCE_BACKEND", "launch.inference.backend", "sglang, vllm, or reference for the built-in server"),
    ("LORA_RANK", "model.lora.rank", "LoRA adapter rank; 0 trains every weight (as in Atropos-VeRL)"),
)
"""Environment variables ``launch plan`` turns into overrides: after the YAML, before the command line."""

_DESCRIPTION = """\
Start the processes of a training run on the nodes of a Slurm allocation (or on this machine).

  launch plan --config C [key=value ...]   once per job: read the allocation and the config, write
                                           <run_dir>/launch/<session>/{{plan.json,config.yaml}}, print
                                           the plan (stderr) and the plan's path (stdout)
  launch run --plan PLAN                   on every node (srun --ntasks-per-node=1): start this node's
                                           roles, watch them, stop them; exit 0 when training finished
  launch run --config C [key=value ...]    outside Slurm: plan this machine alone, then run it
  launch stop --plan PLAN                  ask every node to stop as on SIGTERM: the trainer writes a
                                           checkpoint first (the sbatch scripts' time-limit trap)

Roles: Atropos API + bridge + environments on the head node, inference servers (SGLang, vLLM or
the reference server), trainer ranks (one process per rank, torchrun's variables, static rendezvous
on the first training node). Logs: <run_dir>/logs/<session>/<node>/<role>.log. A role that dies ends
the job on every node with its log's tail; SIGTERM stops the trainer first so that it checkpoints.
A launched run resumes from its latest checkpoint (checkpoint.load=latest), so a requeued job
continues where it stopped.

Environment variables read by `launch plan` (applied after the YAML, before key=value overrides):
{env_table}
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    configure_logging(  # quiet httpx: one line per readiness probe otherwise
        logging.INFO,
        f"%(asctime)s launch[{os.environ.get('SLURMD_NODENAME', 'local')}] %(levelname)s: %(message)s",
    )
    return args.handler(args)


def environment_overrides(environ: Mapping[str, str]) -> list[str]:
    """``key=value`` overrides for the ENVIRONMENT_OVERRIDES variables that are set (and not empty)."""
    return [
        f"{key}={environ[name]}" for name, key, _ in ENVIRONMENT_OVERRIDES if environ.get(name, "").strip()
    ]


def _build_parser() -> argparse.ArgumentParser:
    env_table = "\n".join(f"  {name:<18} -> {key:<26} {why}" for name, key, why in ENVIRONMENT_OVERRIDES)
    parser = argparse.ArgumentParser(
        prog="atropos-megatron launch",
        description=_DESCRIPTION.format(env_table=env_table),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    plan = commands.add_parser("plan", help="plan the job once (batch step); prints the plan's path")
    _add_config_arguments(plan)
    plan.set_defaults(handler=_cmd_plan)

    run = commands.add_parser("run", help="run this node's roles (srun, one task per node)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", metavar="JSON", help="the plan `launch plan` wrote")
    source.add_argument("--config", metavar="YAML", help="outside Slurm: plan this machine and run it")
    run.add_argument(
        "--node", type=int, default=None, help="this node's index in the plan (default: SLURM_NODEID)"
    )
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="with --config: config overrides")
    run.set_defaults(handler=_cmd_run)

    stop = commands.add_parser("stop", help="ask every node of a running plan to stop and checkpoint")
    stop.add_argument("--plan", required=True, metavar="JSON", help="the running job's plan")
    stop.add_argument("--reason", default="launch stop", help="recorded in the nodes' logs")
    stop.set_defaults(handler=_cmd_stop)
    return parser


def _add_config_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", required=True, metavar="YAML", help="the run's config (a recipe)")
    command.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. launch.train_nodes=2 optimizer.lr=1e-6"
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from atropos_megatron.launch.allocation import AllocationError, local_allocation, slurm_allocation

    try:
        allocation = slurm_allocation() if os.environ.get("SLURM_JOB_NODELIST") else local_allocation()
    except AllocationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan_path = _write_plan(args.config, args.overrides, allocation)
    if plan_path is None:
        return 2
    print(plan_path)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from atropos_megatron.launch.node import run_node
    from atropos_megatron.launch.plan import LaunchPlan, PlanError, node_index

    if args.config:
        if os.environ.get("SLURM_JOB_NODELIST"):
            print(
                "error: inside a Slurm job, run `launch plan` once, then `launch run --plan`", file=sys.stderr
            )
            return 2
        from atropos_megatron.launch.allocation import local_allocation

        plan_path = _write_plan(args.config, args.overrides, local_allocation())
        if plan_path is None:
            return 2
    else:
        if args.overrides:
            print("error: overrides go to `launch plan`, not to `launch run --plan`", file=sys.stderr)
            return 2
        plan_path = Path(args.plan)
    plan = LaunchPlan.from_json(plan_path.read_text())
    try:
        index = (
            args.node
            if args.node is not None
            else node_index(
                plan,
                slurm_node_id=os.environ.get("SLURM_NODEID"),
                node_name=os.environ.get("SLURMD_NODENAME"),
            )
        )
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if index is None:
        logging.getLogger(__name__).warning("this node is not in the plan: nothing to run here")
        return 0
    return run_node(plan, index)


def _cmd_stop(args: argparse.Namespace) -> int:
    from atropos_megatron.launch.node import StatusBoard
    from atropos_megatron.launch.plan import LaunchPlan

    plan = LaunchPlan.from_json(Path(args.plan).read_text())
    board = StatusBoard(plan.session_dir / "status")
    if board.finished():
        print(f"{plan.session}: training already finished", file=sys.stderr)
        return 0
    board.request_stop(args.reason)
    print(f"{plan.session}: stop requested; the trainer checkpoints, then every role stops", file=sys.stderr)
    return 0


def _write_plan(config: str, overrides: Sequence[str], allocation) -> Path | None:
    """Resolve the config, build the plan, write both into the session directory; None after
    printing what is wrong."""
    from atropos_megatron.config import ConfigError, load_config, save_config
    from atropos_megatron.launch.plan import PlanError, build_plan

    from_env = environment_overrides(os.environ)
    try:
        cfg = load_config(config, [*from_env, *overrides])
        session_dir = Path(cfg.logging.run_dir).resolve() / "launch" / allocation.session
        plan, resolved = build_plan(cfg, allocation, config_file=session_dir / "config.yaml")
    except (ConfigError, PlanError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    session_dir.mkdir(parents=True, exist_ok=True)
    config_file = save_config(resolved, session_dir / "config.yaml")
    config_file.chmod(0o600)  # may hold the bridge token and the SGLang admin key
    plan_path = session_dir / "plan.json"
    plan_path.write_text(plan.to_json())
    if from_env:
        print("from the environment: " + " ".join(from_env), file=sys.stderr)
    print(plan.format(), file=sys.stderr)
    return plan_path
