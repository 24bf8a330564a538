"""A whole run on one machine: every process of a cluster run on loopback, for any Atropos environment.

What it does, in order: resolve the config with free loopback ports; prepare the run directory; build
the tiny model and tokenizer (or use the config's ``model.hf_path``); start the Atropos API, the
reference inference server, the bridge, the trainer and the environment script (its own ``serve``
CLI, with the flags that connect it filled in), each waiting for the one before to answer; follow
``metrics.jsonl`` with a progress bar until the trainer exits; stop everything; summarise the reward
and write ``reward_curve.png``.

``atropos-megatron demo`` (``run.py``) runs it on the built-in toy environment, ``atropos-megatron
run`` (``run_env.py``) on the user's; ``benchmarks/chaos.py`` starts the prepared roles itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
SUMMARY_WINDOW = 5
"""Steps averaged at each end of the run for the before/after reward."""
MARKER = ".atropos-megatron-run"
"""Marks a run directory as made by ``demo`` or ``run``: the next such run there may clear it."""
OLD_MARKER = ".atropos-megatron-demo"
"""What earlier versions wrote: their run directories may be cleared too."""
HOST = "127.0.0.1"
ENGINES = ("sglang", "vllm")
"""What ``--engine`` picks: the protocol the reference server speaks, ``weights.inference_engine`` and
the environment's atroposlib ``server_type`` (see :func:`engine_overrides`)."""


def engine_overrides(engine: str, user_overrides: Sequence[str] = ()) -> list[str]:
    """The config overrides of ``--engine`` (they come before the user's, who may change them).

    ``sglang``: none (the configs' own). ``vllm``: ``weights.inference_engine=vllm`` and what vLLM's
    RL routes take (``WeightsConfig._check_vllm``): ``transport=distributed`` over ``gloo`` (the
    reference server's CPU stand-in for vLLM's NCCL engine; also with CUDA, as the server runs on CPU)
    and ``pause_mode=in_place`` (vLLM's ``keep``: requests wait for the update instead of failing).
    With ``weights.lora_sync=adapter`` among ``user_overrides``, ``transport=disk`` instead: vLLM loads
    adapters from a path (the run directory's ``pushed/``, see :func:`_resolve_config`).
    """
    if engine not in ENGINES:
        raise RunError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "sglang":
        return []
    adapters = "weights.lora_sync=adapter" in user_overrides
    return [
        "weights.inference_engine=vllm",
        f"weights.transport={'disk' if adapters else 'distributed'}",
        "weights.distributed_backend=gloo",
        "weights.pause_mode=in_place",
    ]


_ENGINE_SUMMARY = {
    "sglang": "sglang (reference server in SGLang's protocol, environment on server_type sglang)",
    "vllm": "vllm (reference server with --protocol vllm, environment on server_type vllm via the bridge's proxy)",
}


def engine_description(cfg) -> str:
    """How the run generates, for the status lines and the summary."""
    engine = cfg.weights.inference_engine
    return _ENGINE_SUMMARY.get(engine, engine)


class RunError(RuntimeError):
    """A problem found before or after the processes ran (config, run directory, missing metrics)."""


@dataclass(frozen=True)
class AssetOptions:
    """The tiny model and tokenizer to build when the config names no ``model.hf_path``."""

    tokenizer: str = "bytes"
    """``bytes`` (any text, a chat template) or ``chars`` (the demo's 99 printable characters)."""
    context: int | None = None
    """Positions of the model (None: the tokenizer kind's default, 2048 bytes / 128 chars)."""
    size: str = "tiny"
    output_std: float | None = None
    """The output layer's initial std (None: the initialiser's); see ``assets.build_model``."""
    experts: int = 0
    """A Qwen3-MoE with this many experts per MLP instead of a dense Qwen2; see ``assets.build_model``."""


@dataclass(frozen=True)
class RunSpec:
    """What a local run starts: which environment, with which config and model."""

    env_script: Path
    config_path: Path
    env_flags: Sequence[str] = ()
    """The user's flags for the environment's ``serve`` CLI, after the ones the run fills in (a flag
    given here replaces the run's own)."""
    env_defaults: Callable[[Any], Sequence[str]] = lambda cfg: ()
    """Flags the caller adds for the resolved config (before ``env_flags``), e.g. the demo's seed."""
    assets: AssetOptions = field(default_factory=AssetOptions)
    title: str = "GRPO reward per step"
    """Title of the reward-curve plot."""


@dataclass(frozen=True)
class RunSetup:
    """A prepared run directory and the run's processes, not started yet (:func:`prepare_run`)."""

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


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: Any  # report.RewardSummary (imported lazily)
    exits: dict[str, ExitRecord]
    """How every process ended; all ``clean`` after a successful run."""
    wall_s: float
    plot_path: Path
    engine: str = "sglang"
    """``weights.inference_engine`` of the run: the protocol the server spoke and the environment used."""


def prepare_run(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    trainer_command: Sequence[str] | None = None,
    env_api_url: str | None = None,
) -> RunSetup:
    """Everything before the first process starts: free loopback ports, the resolved config, the run
    directory (an earlier run's is cleared), the model and tokenizer, and the roles to start.

    Args are :func:`run_local`'s, plus ``env_api_url``: where the environment posts its groups
    (default the Atropos API itself; ``benchmarks/chaos.py`` puts a counting proxy there).

    Raises:
        RunError: bad config, run directory or environment script, or a missing prerequisite
            (nothing was changed then).
    """
    run_dir = Path(run_dir).resolve()
    api_port, server_port, bridge_port, proxy_port = free_ports(4, HOST)
    urls = {
        "api": f"http://{HOST}:{api_port}",
        "inference": f"http://{HOST}:{server_port}",
        "lora_proxy": f"http://{HOST}:{proxy_port}",
    }
    # Everything that can be refused is checked before an earlier run's directory is cleared.
    cfg = _resolve_config(spec, run_dir, urls, f"{HOST}:{bridge_port}", steps, overrides)
    _check_prerequisites(spec.env_script)
    _prepare_run_dir(run_dir)
    from atropos_megatron.config import save_config

    if cfg.model.hf_path is None:
        from atropos_megatron.demo.assets import build_assets

        cfg.model.hf_path = str(run_dir / "model")
        assets = build_assets(
            run_dir,
            seed=cfg.seed,
            tokenizer=spec.assets.tokenizer,
            context=spec.assets.context,
            size=spec.assets.size,
            output_std=spec.assets.output_std,
            experts=spec.assets.experts,
        )
        model_dir, tokenizer_dir = assets.model_dir, assets.tokenizer_dir
    else:
        model_dir = tokenizer_dir = Path(cfg.model.hf_path).resolve()
    config_file = save_config(cfg, run_dir / "config.yaml")
    env_command = environment_command(spec, cfg, urls, env_api_url or urls["api"], model_dir, tokenizer_dir)
    roles = _build_roles(
        cfg, config_file, model_dir, tokenizer_dir, urls, bridge_port, trainer_command, env_command
    )
    addresses = {
        "atropos-api": urls["api"],
        "inference": urls["inference"],
        "bridge": f"{HOST}:{bridge_port}",
    }
    return RunSetup(
        run_dir=run_dir,
        cfg=cfg,
        config_file=config_file,
        roles=roles,
        addresses=addresses,
    )


def run_local(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    trainer_command: Sequence[str] | None = None,
    timeout_s: float = 1800.0,
    progress: bool = True,
) -> RunResult:
    """Run every process until the trainer is done and return what it measured; every child process
    is stopped before it returns.

    Args:
        spec: the environment, config and model.
        run_dir: where everything goes; an existing directory must be empty or an earlier run's.
        steps: trainer steps (default: the config's ``steps``).
        overrides: ``key=value`` config overrides, e.g. ``["optimizer.lr=1e-3"]``.
        trainer_command: how to launch the trainer, ``--config FILE`` appended (default
            ``python -m atropos_megatron.cli train``; e.g. a ``torchrun ...`` prefix for TP=2).
        timeout_s: give up (and stop everything) if the trainer has not finished by then.
        progress: show a progress bar and status lines on stdout.

    Raises:
        RunError: bad config or run directory, or no rewards logged.
        RoleFailed: a process exited early or never became ready (names it, quotes its log).
    """
    started = time.monotonic()
    setup = prepare_run(spec, run_dir, steps=steps, overrides=overrides, trainer_command=trainer_command)
    _say(progress, f"run directory {setup.run_dir}: config.yaml, metrics.jsonl; logs/<process>.log")
    _say(progress, f"inference engine {engine_description(setup.cfg)}")
    with Supervisor(setup.run_dir / "logs") as supervisor:
        for role in setup.roles:
            supervisor.start(role)
            _say(progress, f"started {role.name:<12} {setup.addresses.get(role.name, '')}".rstrip())
        _follow_training(
            supervisor, setup.metrics_path, setup.cfg.steps, timeout_s=timeout_s, progress=progress
        )
    wall_s = time.monotonic() - started
    result = _report(setup.run_dir, setup.metrics_path, supervisor.exits, wall_s=wall_s, title=spec.title)
    return dataclasses.replace(result, engine=setup.cfg.weights.inference_engine)


# ------------------------------------------------------------------------------------------------
# The environment's command line
# ------------------------------------------------------------------------------------------------


def _server_env(cfg) -> dict[str, str]:
    """vLLM mounts its runtime LoRA routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING (as the launcher sets)."""
    if cfg.weights.inference_engine == "vllm" and cfg.weights.lora_sync == "adapter":
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return {}


def uses_proxy(cfg) -> bool:
    """Environments generate through the bridge's proxy: it names the newest adapter in each request
    (``weights.lora_sync: adapter``), captures the experts each token was routed to
    (``weights.capture_routed_experts``), or answers atroposlib's ``/generate`` through vLLM's token
    route (``weights.inference_engine: vllm``)."""
    weights = cfg.weights
    return (
        weights.lora_sync == "adapter" or weights.capture_routed_experts or weights.inference_engine == "vllm"
    )


def generation_url(cfg, urls: dict[str, str]) -> str:
    """Where environments generate: the server, or the bridge's proxy in front of it (:func:`uses_proxy`)."""
    return urls["lora_proxy"] if uses_proxy(cfg) else urls["inference"]


def server_type(cfg) -> str:
    """atroposlib's ``server_type`` for the run's engine: ``sglang`` (SGLang's ``/generate``) or ``vllm``
    (``VLLMServer``: ``{base_url minus /v1}/generate`` with ``prompt_token_ids``, Atropos's vLLM server
    shape, which the bridge's proxy answers through vLLM's ``/inference/v1/generate``)."""
    return "vllm" if cfg.weights.inference_engine == "vllm" else "sglang"


def environment_command(
    spec: RunSpec, cfg, urls: dict[str, str], api_url: str, model_dir: Path, tokenizer_dir: Path
) -> list[str]:
    """``python -m ...env_launcher SCRIPT serve`` with the connecting flags, then the caller's and the
    user's; a flag the user passes replaces the run's own."""
    # fmt: off
    connect = [
        "--slurm", "false",
        "--env.rollout_server_url", api_url,
        "--env.tokenizer_name", str(tokenizer_dir),
        "--env.use_wandb", "false",
        # The environment stops itself past total_steps; the run stops it once the trainer is done,
        # so leave room for groups the bridge might reject.
        "--env.total_steps", str(2 * cfg.steps + 100),
        "--openai.server_type", server_type(cfg),
        "--openai.base_url", generation_url(cfg, urls) + "/v1",
        "--openai.model_name", str(model_dir),
        "--openai.tokenizer_name", str(tokenizer_dir),
        "--openai.api_key", "EMPTY",  # the openai client refuses an empty key; the server ignores it
        # atroposlib's health check generates every second; the supervisor watches the server instead.
        "--openai.health_check", "false",
    ]
    # fmt: on
    flags = merge_flags(merge_flags(connect, list(spec.env_defaults(cfg))), list(spec.env_flags))
    return [sys.executable, "-m", "atropos_megatron.demo.env_launcher", str(spec.env_script), "serve", *flags]


def merge_flags(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` (``--key value`` pairs) without the keys ``extra`` sets, then ``extra`` as given.

    ``extra`` may spell a flag ``--key value`` or ``--key=value``.
    """
    given = {token[2:].split("=", 1)[0] for token in extra if token.startswith("--")}
    kept: list[str] = []
    for i in range(0, len(base), 2):
        key = base[i][2:]
        if key not in given:
            kept += base[i : i + 2]
    return [*kept, *extra]


# ------------------------------------------------------------------------------------------------
# Preparing
# ------------------------------------------------------------------------------------------------


def _prepare_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not ((run_dir / MARKER).exists() or (run_dir / OLD_MARKER).exists()):
            raise RunError(f"{run_dir} is not empty and was not made by this command; pass another --run-dir")
        shutil.rmtree(run_dir)  # an earlier run's: a stale spool would replay its batches
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(
        "made by `atropos-megatron demo` or `run`; the next such run here clears it\n"
    )


def _resolve_config(
    spec: RunSpec,
    run_dir: Path,
    urls: dict[str, str],
    bridge_address: str,
    steps: int | None,
    overrides: Sequence[str],
):
    from atropos_megatron.config import ConfigError, load_config

    # What depends on this run comes last, so that a stray override cannot point the trainer at a
    # different port than the processes the run starts.
    owned = [
        f"logging.run_dir={run_dir}",
        f"bridge.address={bridge_address}",
        f"bridge.atropos_url={urls['api']}",
        f"bridge.spool_dir={run_dir / 'spool'}",
        f"weights.inference_servers=[{urls['inference']}]",
    ]
    if steps is not None:
        owned.append(f"steps={steps}")
    if not any(
        o.startswith("weights.disk_dir=") for o in overrides
    ):  # transport=disk: pushes stay in the run
        owned.append(f"weights.disk_dir={run_dir / 'pushed'}")
    # The proxy's port first (weights.capture_routed_experts requires one), kept only where it is used.
    proxy = f"weights.lora_proxy_ports=[{urls['lora_proxy'].rsplit(':', 1)[1]}]"
    try:
        cfg = load_config(spec.config_path, [*overrides, *owned, proxy])
        if not uses_proxy(cfg):
            cfg = load_config(spec.config_path, [*overrides, *owned])
    except (ConfigError, FileNotFoundError) as exc:
        raise RunError(str(exc)) from None
    group_size = _group_size_flag([*spec.env_defaults(cfg), *spec.env_flags])
    if group_size and cfg.data.batch_size % group_size:
        raise RunError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of the environment's group size "
            f"{group_size} (Atropos only forms batches of whole groups)"
        )
    return cfg


def _group_size_flag(flags: Sequence[str]) -> int | None:
    """The last ``--env.group_size`` among ``flags``, if any and numeric."""
    value = None
    for i, token in enumerate(flags):
        if token.startswith("--env.group_size="):
            value = token.split("=", 1)[1]
        elif token == "--env.group_size" and i + 1 < len(flags):
            value = flags[i + 1]
    return int(value) if value is not None and value.isdigit() else None


def _check_prerequisites(env_script: Path) -> None:
    if importlib.util.find_spec("atroposlib") is None:
        raise RunError("atroposlib is not installed: install the Atropos extra (pip install -e '.[atropos]')")
    if not env_script.is_file():
        raise RunError(f"environment script {env_script} not found")


def _build_roles(
    cfg,
    config_file: Path,
    model_dir: Path,
    tokenizer_dir: Path,
    urls: dict[str, str],
    bridge_port: int,
    trainer_command,
    env_command: list[str],
) -> list[Role]:
    """The five processes, in start order."""
    cli = [sys.executable, "-m", "atropos_megatron.cli"]
    trainer = list(trainer_command) if trainer_command else [*cli, "train"]
    # fmt: off
    serve = [
        *cli, "serve", "--model", str(model_dir), "--tokenizer-path", str(tokenizer_dir),
        "--host", HOST, "--port", urls["inference"].rsplit(":", 1)[1],
        "--max-batch", str(cfg.data.batch_size),  # one step's completions decode together
        "--seed", str(cfg.seed),
    ]
    if cfg.weights.lora_sync == "adapter":  # each push arrives as a new LoRA adapter
        lora = cfg.model.lora
        serve += ["--enable-lora", "--max-lora-rank", str(lora.rank), "--lora-target-modules", *lora.target_modules]
    if cfg.weights.capture_routed_experts:  # the bridge's proxy asks every /generate for its routing
        serve += ["--enable-return-routed-experts"]
    if cfg.weights.inference_engine == "vllm":  # vLLM 0.33's RL routes and token route, as the launcher's
        backend = cfg.weights.distributed_backend or "gloo"  # the trainer's side of the same group
        serve += ["--protocol", "vllm", "--weight-transfer-config", json.dumps({"backend": backend}),
                  "--enable-scale-out", "--logprobs-mode", "processed_logprobs"]
    # fmt: on
    # One thread per process: five processes share the cores. Measured on 2 cores (40 demo steps):
    # 39 s with one thread each, 48-64 s with torch's default two (generation starves: the trainer
    # waits 0.3-0.6 s per step for its batch instead of 0.02-0.07 s).
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    api = [sys.executable, "-m", "atropos_megatron.launch.atropos_api"]  # run-api minus its access log
    api_command = [*api, "--host", HOST, "--port", urls["api"].rsplit(":", 1)[1]]
    return [
        Role("atropos-api", api_command, ready=http_probe(urls["api"] + "/"), env=env),
        Role("inference", serve, ready=http_probe(urls["inference"] + "/health"), env=env | _server_env(cfg)),
        Role(
            "bridge",
            [*cli, "bridge", "--config", str(config_file)],
            ready=port_probe(HOST, bridge_port),
            env=env,
        ),
        Role("trainer", [*trainer, "--config", str(config_file)], env=env, exits_when_done=True),
        Role("env", env_command, env=env),
    ]


# ------------------------------------------------------------------------------------------------
# Following and reporting
# ------------------------------------------------------------------------------------------------


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
                raise RunError(
                    f"the trainer did not finish {steps} steps within {timeout_s / 60:g} min "
                    f"(logs: {supervisor.log_dir}); every process was stopped"
                )
            time.sleep(0.5)


def _report(
    run_dir: Path, metrics_path: Path, exits: dict[str, ExitRecord], *, wall_s: float, title: str
) -> RunResult:
    from atropos_megatron.demo import report

    if not metrics_path.exists():
        raise RunError(f"the trainer finished but wrote no {metrics_path}")
    records = report.read_metrics(metrics_path)
    try:
        summary = report.summarize_rewards(records, window=SUMMARY_WINDOW)
    except ValueError as exc:
        raise RunError(f"{metrics_path}: {exc}") from None
    plot_path = report.plot_reward_curve(
        records, run_dir / "reward_curve.png", window=SUMMARY_WINDOW, title=title
    )
    return RunResult(run_dir=run_dir, summary=summary, exits=exits, wall_s=wall_s, plot_path=plot_path)


def format_result(result: RunResult, *, headline: str) -> str:
    """The summary printed at the end of a run."""
    from atropos_megatron.demo.report import format_summary

    lines = ["", headline, format_summary(result.summary, wall_s=result.wall_s)]
    lines.append(f"engine:         {_ENGINE_SUMMARY.get(result.engine, result.engine)}")
    window = result.summary.window
    if result.summary.steps < 2 * window:
        lines.append(f"note: with fewer than {2 * window} steps the first and last {window} overlap")
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


def add_run_options(parser, *, timeout_min: float, example: str) -> None:
    """The options every local-run command ends with: --engine, --timeout-min, --no-progress, KEY=VALUE."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="sglang",
        help="inference protocol: sglang (default; the reference server speaks SGLang's protocol, the "
        "environment uses server_type sglang) or vllm (the server speaks stock vllm serve 0.33's RL and "
        "token routes, the environment uses server_type vllm through the bridge's /generate proxy; sets "
        "weights.inference_engine=vllm, transport=distributed over gloo, pause_mode=in_place)",
    )
    parser.add_argument(
        "--timeout-min",
        type=float,
        default=timeout_min,
        help=f"stop everything after this long (default {timeout_min:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {example}")


def run_from_command_line(run: Callable[[], RunResult], format_result: Callable[[RunResult], str]) -> int:
    """Exit status and messages of a local-run command: 0 done, 1 a process failed (named, with its
    log's tail), 2 a bad config or run directory, 130 interrupted (Ctrl-C or SIGTERM)."""
    try:
        with sigterm_as_keyboard_interrupt():
            result = run()
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RoleFailed as exc:
        print(f"error: {exc}\nevery other process was stopped.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every process was stopped.", file=sys.stderr)
        return 130
    print(format_result(result))
    return 0


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)
