"""``atropos-megatron demo``: the whole system on one machine, learning a toy task in minutes on CPU.

What it does, in order: build the tiny model, its tokenizer and the resolved config in the run
directory; pick free loopback ports; start the Atropos API (``run-api``), the reference inference
server, the bridge, the trainer and the environment (``examples/envs/alphabet_match.py``), each
waiting for the one before to answer; follow ``metrics.jsonl`` with a progress bar until the trainer
exits; stop everything; print a summary and write ``reward_curve.png``.

What it does not do: choose a model (it always builds its own, which the environment's tokenizer
matches) or run anywhere but loopback. It needs a source checkout (``examples/``) and the
``atropos`` extra (``atroposlib``, for ``run-api`` and the environment).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atropos_megatron.launch.supervisor import (
    ExitRecord,
    Role,
    RoleFailed,
    Supervisor,
    free_ports,
    http_probe,
    port_probe,
    sigterm_as_keyboard_interrupt,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "examples/configs/demo_cpu.yaml"
ENV_SCRIPT = REPO / "examples/envs/alphabet_match.py"
GROUP_SIZE = 8
"""Completions per prompt; ``data.batch_size`` must be a multiple (Atropos never splits a group)."""
SUMMARY_WINDOW = 5
"""Steps averaged at each end of the run for the before/after reward."""
MARKER = ".atropos-megatron-demo"
"""Marks a run directory as the demo's own: the next demo run there may clear it."""
HOST = "127.0.0.1"


class DemoError(RuntimeError):
    """A problem found before or after the processes ran (config, run directory, missing metrics)."""


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    summary: Any  # report.RewardSummary (imported lazily)
    exits: dict[str, ExitRecord]
    """How every process ended; all ``clean`` after a successful run."""
    wall_s: float
    plot_path: Path


@dataclass(frozen=True)
class DemoSetup:
    """A prepared run directory and the demo's processes, not started yet (:func:`prepare_demo`)."""

    run_dir: Path
    cfg: Any  # config.TrainConfig (imported lazily)
    config_file: Path
    """The resolved config every process reads (``<run_dir>/config.yaml``)."""
    roles: list[Role]
    """The five processes in start order: atropos-api, inference, bridge, trainer, env."""
    addresses: dict[str, str]
    """Where the serving roles listen: ``atropos-api`` and ``inference`` URLs, ``bridge`` host:port."""

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def prepare_demo(
    run_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path = DEFAULT_CONFIG,
    trainer_command: Sequence[str] | None = None,
    env_api_url: str | None = None,
) -> DemoSetup:
    """Everything before the first process starts: free loopback ports, the resolved config, the run
    directory (an earlier demo's is cleared), the tiny model and tokenizer, and the roles to start.

    Args are :func:`run_demo`'s, plus ``env_api_url``: where the environment posts its groups
    (default the Atropos API itself; ``benchmarks/chaos.py`` puts a counting proxy there).

    Raises:
        DemoError: bad config or run directory, or a missing prerequisite (nothing was changed then).
    """
    run_dir = Path(run_dir).resolve()
    api_port, server_port, bridge_port = free_ports(3, HOST)
    urls = {"api": f"http://{HOST}:{api_port}", "inference": f"http://{HOST}:{server_port}"}
    # Everything that can be refused is checked before an earlier demo's directory is cleared.
    cfg = _resolve_config(config_path, run_dir, urls, f"{HOST}:{bridge_port}", steps, overrides)
    _check_prerequisites()
    _prepare_run_dir(run_dir)
    from atropos_megatron.config import save_config
    from atropos_megatron.demo.assets import build_assets

    config_file = save_config(cfg, run_dir / "config.yaml")
    assets = build_assets(run_dir, seed=cfg.seed)
    roles = _build_roles(
        cfg, config_file, assets, urls, bridge_port, trainer_command, env_api_url or urls["api"]
    )
    addresses = {
        "atropos-api": urls["api"],
        "inference": urls["inference"],
        "bridge": f"{HOST}:{bridge_port}",
    }
    return DemoSetup(run_dir=run_dir, cfg=cfg, config_file=config_file, roles=roles, addresses=addresses)


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path = DEFAULT_CONFIG,
    trainer_command: Sequence[str] | None = None,
    timeout_s: float = 1800.0,
    progress: bool = True,
) -> DemoResult:
    """Run the demo and return what it measured; every child process is stopped before it returns.

    Args:
        run_dir: where everything goes; an existing directory must be empty or an earlier demo's.
        steps: trainer steps (default: the config's ``steps``).
        overrides: ``key=value`` config overrides, e.g. ``["optimizer.lr=1e-3"]``.
        config_path: the demo's YAML (``examples/configs/demo_cpu.yaml``).
        trainer_command: how to launch the trainer, ``--config FILE`` appended (default
            ``python -m atropos_megatron.cli train``; e.g. a ``torchrun ...`` prefix for TP=2).
        timeout_s: give up (and stop everything) if the trainer has not finished by then.
        progress: show a progress bar and status lines on stdout.

    Raises:
        DemoError: bad config or run directory, or no rewards logged.
        RoleFailed: a process exited early or never became ready (names it, quotes its log).
    """
    started = time.monotonic()
    setup = prepare_demo(
        run_dir, steps=steps, overrides=overrides, config_path=config_path, trainer_command=trainer_command
    )
    _say(progress, f"run directory {setup.run_dir}: model, tokenizer, config.yaml; logs/<process>.log")
    with Supervisor(setup.run_dir / "logs") as supervisor:
        for role in setup.roles:
            supervisor.start(role)
            _say(progress, f"started {role.name:<12} {setup.addresses.get(role.name, '')}".rstrip())
        _follow_training(
            supervisor, setup.metrics_path, setup.cfg.steps, timeout_s=timeout_s, progress=progress
        )
    exits = supervisor.exits
    return _report(setup.run_dir, setup.metrics_path, exits, wall_s=time.monotonic() - started)


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            raise DemoError(f"{run_dir} is not empty and was not made by the demo; pass another --run-dir")
        shutil.rmtree(run_dir)  # an earlier demo's: a stale spool would replay its batches
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("made by `atropos-megatron demo`; the next demo run here clears it\n")


def _resolve_config(
    config_path: str | Path,
    run_dir: Path,
    urls: dict[str, str],
    bridge_address: str,
    steps: int | None,
    overrides: Sequence[str],
):
    from atropos_megatron.config import ConfigError, load_config

    # What depends on this run comes last, so that a stray override cannot point the trainer at a
    # different model or port than the processes the demo starts.
    owned = [
        f"model.hf_path={run_dir / 'model'}",
        f"logging.run_dir={run_dir}",
        f"bridge.address={bridge_address}",
        f"bridge.atropos_url={urls['api']}",
        f"bridge.spool_dir={run_dir / 'spool'}",
        f"weights.inference_servers=[{urls['inference']}]",
    ]
    if steps is not None:
        owned.append(f"steps={steps}")
    try:
        cfg = load_config(config_path, [*overrides, *owned])
    except (ConfigError, FileNotFoundError) as exc:
        raise DemoError(str(exc)) from None
    if cfg.data.batch_size % GROUP_SIZE:
        raise DemoError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of the environment's group size "
            f"{GROUP_SIZE} (Atropos only forms batches of whole groups)"
        )
    return cfg


def _check_prerequisites() -> None:
    if not _run_api().exists():
        raise DemoError(f"{_run_api()} not found: install the Atropos extra (pip install -e '.[atropos]')")
    if not ENV_SCRIPT.exists():
        raise DemoError(f"{ENV_SCRIPT} not found: the demo runs from a source checkout")


def _run_api() -> Path:
    return Path(sys.executable).parent / "run-api"


def _build_roles(
    cfg, config_file: Path, assets, urls: dict[str, str], bridge_port: int, trainer_command, env_api_url: str
):
    """The five processes, in start order."""
    python = sys.executable
    cli = [python, "-m", "atropos_megatron.cli"]
    trainer = list(trainer_command) if trainer_command else [*cli, "train"]
    # fmt: off
    serve = [
        *cli, "serve", "--model", str(assets.model_dir), "--tokenizer-path", str(assets.tokenizer_dir),
        "--host", HOST, "--port", urls["inference"].rsplit(":", 1)[1],
        "--max-batch", str(cfg.data.batch_size),  # one step's completions decode together
        "--seed", str(cfg.seed),
    ]
    environment = [
        python, str(ENV_SCRIPT), "serve", "--slurm", "false",
        "--env.rollout_server_url", env_api_url,
        "--env.tokenizer_name", str(assets.tokenizer_dir),
        "--env.group_size", str(GROUP_SIZE),
        "--env.seed", str(cfg.seed),
        # The environment stops itself past total_steps; the demo stops it once the trainer is done,
        # so leave room for groups the bridge might reject.
        "--env.total_steps", str(2 * cfg.steps + 100),
        "--env.use_wandb", "false",
        "--openai.server_type", "sglang",
        "--openai.base_url", urls["inference"] + "/v1",
    ]
    # fmt: on
    # One thread per process: five processes share the cores. Measured on 2 cores (40 steps): 39 s
    # with one thread each, 48-64 s with torch's default two (generation starves: the trainer waits
    # 0.3-0.6 s per step for its batch instead of 0.02-0.07 s).
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    api_command = [str(_run_api()), "--host", HOST, "--port", urls["api"].rsplit(":", 1)[1]]
    return [
        Role("atropos-api", api_command, ready=http_probe(urls["api"] + "/"), env=env),
        Role("inference", serve, ready=http_probe(urls["inference"] + "/health"), env=env),
        Role(
            "bridge",
            [*cli, "bridge", "--config", str(config_file)],
            ready=port_probe(HOST, bridge_port),
            env=env,
        ),
        Role("trainer", [*trainer, "--config", str(config_file)], env=env, exits_when_done=True),
        Role("env", environment, env=env, cwd=REPO),
    ]


def _follow_training(
    supervisor: Supervisor, metrics_path: Path, steps: int, *, timeout_s: float, progress: bool
) -> None:
    """Show the trainer's steps as they land in ``metrics.jsonl`` until it exits (or time runs out)."""
    from tqdm import tqdm

    from atropos_megatron.trainer.metrics import MetricsFollower

    deadline = time.monotonic() + timeout_s
    follower = MetricsFollower(metrics_path)
    with tqdm(total=steps, unit="step", desc="training", disable=not progress, dynamic_ncols=True) as bar:
        while True:
            done = supervisor.finished("trainer")
            for record in follower.read_new():
                bar.update(max(0, min(record["step"], steps) - bar.n))
                reward = record.get("reward/mean")
                if isinstance(reward, int | float):
                    bar.set_postfix(reward=f"{reward:.3f}")
            if done:
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the trainer did not finish {steps} steps within {timeout_s / 60:.0f} min "
                    f"(logs: {supervisor.log_dir}); every process was stopped"
                )
            time.sleep(0.5)


def _report(run_dir: Path, metrics_path: Path, exits: dict[str, ExitRecord], *, wall_s: float) -> DemoResult:
    from atropos_megatron.demo import report

    if not metrics_path.exists():
        raise DemoError(f"the trainer finished but wrote no {metrics_path}")
    records = report.read_metrics(metrics_path)
    try:
        summary = report.summarize_rewards(records, window=SUMMARY_WINDOW)
    except ValueError as exc:
        raise DemoError(f"{metrics_path}: {exc}") from None
    plot_path = report.plot_reward_curve(
        records,
        run_dir / "reward_curve.png",
        window=SUMMARY_WINDOW,
        title="atropos-megatron demo: alphabet_match",
    )
    return DemoResult(run_dir=run_dir, summary=summary, exits=exits, wall_s=wall_s, plot_path=plot_path)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Train a tiny random Qwen2 with GRPO on a toy Atropos task, on this machine's CPU, with every real
process of a cluster run: the Atropos API (run-api), the reference SGLang-protocol inference server,
the gRPC bridge, the trainer and an Atropos environment (examples/envs/alphabet_match.py: answer in
the alphabet of the prompt). About a minute on 2 cores; the mean reward climbs from ~0.1 to ~0.9.

  atropos-megatron demo                                  # 40 steps into runs/demo
  atropos-megatron demo --steps 60 optimizer.lr=1e-3     # any config field, as key=value

Afterwards, in the run directory:
  reward_curve.png   reward per step and its 5-step mean
  metrics.jsonl      everything the trainer logged, one JSON object per step
  config.yaml        the resolved config (rerun the trainer alone with --config)
  logs/<role>.log    each process's output: atropos-api, inference, bridge, trainer, env
Ctrl-C stops every process; so does a failure of any one of them (its log's tail is printed).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atropos-megatron demo",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", default="runs/demo", help="where everything goes (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps (default: the config's, 40)")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), metavar="YAML", help="demo config (default %(default)s)"
    )
    parser.add_argument(
        "--timeout-min", type=float, default=30.0, help="stop everything after this long (default 30)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optimizer.lr=1e-3"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        with sigterm_as_keyboard_interrupt():
            result = run_demo(
                args.run_dir,
                steps=args.steps,
                overrides=args.overrides,
                config_path=args.config,
                timeout_s=args.timeout_min * 60,
                progress=progress,
            )
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RoleFailed as exc:
        print(f"error: {exc}\nevery other process was stopped.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped.", file=sys.stderr)
        return 130
    print(_format_result(result))
    return 0


def _format_result(result: DemoResult) -> str:
    from atropos_megatron.demo.report import format_summary

    lines = ["", "demo finished", format_summary(result.summary, wall_s=result.wall_s)]
    window = result.summary.window
    if result.summary.steps < 2 * window:
        lines.append(f"note: with fewer than {2 * window} steps the first and last {window} overlap")
    elif result.summary.gain < 0.4:
        lines.append("note: the reward rose less than the usual 0.4; try more --steps")
    unclean = [f"{e.name} ({e.how}, status {e.returncode})" for e in result.exits.values() if not e.clean]
    if unclean:
        lines.append(f"note: not every process stopped cleanly: {', '.join(unclean)}")
    run_dir = result.run_dir
    lines += [
        f"reward curve:   {result.plot_path}",
        f"metrics:        {run_dir / 'metrics.jsonl'}",
        f"config:         {run_dir / 'config.yaml'}",
        f"logs:           {run_dir / 'logs'}/",
    ]
    if (run_dir / "checkpoints").is_dir():
        lines.append(f"checkpoints:    {run_dir / 'checkpoints'}/")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
