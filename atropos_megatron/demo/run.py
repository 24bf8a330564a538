"""``atropos-megatron demo``: the whole system on one machine, learning a toy task in minutes on CPU.

A local run (:mod:`atropos_megatron.demo.local`) of the built-in environment
(``examples/envs/alphabet_match.py``) with the demo's config and its own tiny model: a 2-layer Qwen2
over a 99-character vocabulary, which the task is tuned for. ``atropos-megatron run`` does the same
for any environment script.

It needs a source checkout (``examples/``) and the ``atropos`` extra (``atroposlib``, for ``run-api``
and the environment).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from atropos_megatron.demo.local import (
    REPO,
    AssetOptions,
    RunResult,
    RunSetup,
    RunSpec,
    add_run_options,
    engine_overrides,
    format_result,
    prepare_run,
    run_from_command_line,
    run_local,
)

DEFAULT_CONFIG = REPO / "examples/configs/demo_cpu.yaml"
ENV_SCRIPT = REPO / "examples/envs/alphabet_match.py"
GROUP_SIZE = 8
"""Completions per prompt; ``data.batch_size`` must be a multiple (Atropos never splits a group)."""
LORA_OUTPUT_STD = 0.25
"""The output layer's std for a LoRA demo's base (see ``assets.build_model``): wide enough that
adapters on the frozen model's linear layers can make it confident."""


def demo_spec(
    config_path: str | Path = DEFAULT_CONFIG, *, lora_rank: int = 0, moe_experts: int = 0
) -> RunSpec:
    """The demo as a local run: the toy environment, its group size and seed, the character model.

    ``lora_rank > 0``: LoRA adapters of that rank (alpha = 2 x rank) on a frozen base whose output
    layer is :data:`LORA_OUTPUT_STD` wide. ``moe_experts > 0``: a Qwen3-MoE of that many experts per
    layer (top-2) instead of the dense Qwen2.
    """
    variant = f", LoRA rank {lora_rank}" if lora_rank else ""
    variant += f", MoE {moe_experts} experts top-2" if moe_experts else ""
    return RunSpec(
        env_script=ENV_SCRIPT,
        config_path=Path(config_path),
        env_defaults=lambda cfg: ["--env.group_size", str(GROUP_SIZE), "--env.seed", str(cfg.seed)],
        # The task scores characters and is tuned for the 99-character vocabulary and 128 positions.
        assets=AssetOptions(
            tokenizer="chars", output_std=LORA_OUTPUT_STD if lora_rank else None, experts=moe_experts
        ),
        title=f"atropos-megatron demo: alphabet_match{variant}",
    )


def lora_overrides(lora_rank: int) -> list[str]:
    """The config overrides of ``--lora RANK`` (none for 0)."""
    return [f"model.lora.rank={lora_rank}", f"model.lora.alpha={2 * lora_rank}"] if lora_rank else []


def prepare_demo(
    run_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path = DEFAULT_CONFIG,
    trainer_command: Sequence[str] | None = None,
    env_api_url: str | None = None,
    engine: str = "sglang",
) -> RunSetup:
    """:func:`~atropos_megatron.demo.local.prepare_run` for the demo (``benchmarks/chaos.py`` uses it)."""
    return prepare_run(
        demo_spec(config_path),
        run_dir,
        steps=steps,
        overrides=[*engine_overrides(engine, overrides), *overrides],
        trainer_command=trainer_command,
        env_api_url=env_api_url,
    )


def run_demo(
    run_dir: str | Path = "runs/demo",
    *,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path = DEFAULT_CONFIG,
    trainer_command: Sequence[str] | None = None,
    timeout_s: float = 1800.0,
    progress: bool = True,
    lora_rank: int = 0,
    moe_experts: int = 0,
    engine: str = "sglang",
) -> RunResult:
    """Run the demo and return what it measured (see :func:`~atropos_megatron.demo.local.run_local`).

    ``lora_rank``: train LoRA adapters of this rank instead of every weight; ``moe_experts``: train a
    mixture-of-experts model (see :func:`demo_spec`); ``engine``: ``vllm`` runs the reference server
    with ``--protocol vllm`` and the environment on atroposlib's ``server_type: vllm`` (see
    :func:`~atropos_megatron.demo.local.engine_overrides`).
    """
    return run_local(
        demo_spec(config_path, lora_rank=lora_rank, moe_experts=moe_experts),
        run_dir,
        steps=steps,
        overrides=[*engine_overrides(engine, overrides), *lora_overrides(lora_rank), *overrides],
        trainer_command=trainer_command,
        timeout_s=timeout_s,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Train a tiny random Qwen2 with GRPO on a toy Atropos task, on this machine's CPU, with every real
process of a cluster run: the Atropos API (run-api), the reference inference server (SGLang's
protocol, or vLLM's with --engine vllm), the gRPC bridge, the trainer and an Atropos environment
(examples/envs/alphabet_match.py: answer in the alphabet of the prompt). About a minute on 2 cores; the mean reward climbs from ~0.1 to ~0.9.

  atropos-megatron demo                                  # 40 steps into runs/demo
  atropos-megatron demo --steps 60 optimizer.lr=1e-3     # any config field, as key=value
  atropos-megatron demo --lora 8                         # LoRA adapters of rank 8 on a frozen base
  atropos-megatron demo --moe 4                          # a Qwen3-MoE: 4 experts per layer, top-2
  atropos-megatron demo --engine vllm                    # vLLM protocol, env on server_type vllm

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
        "--lora",
        type=int,
        default=0,
        metavar="RANK",
        help="train LoRA adapters of this rank (alpha = 2 x RANK) on a frozen base instead of every "
        "weight; the base's output layer is drawn wider so that adapters can learn (default 0: off)",
    )
    parser.add_argument(
        "--moe",
        type=int,
        default=0,
        metavar="EXPERTS",
        help="train a Qwen3-MoE of the same shape with EXPERTS experts per layer, two per token, each "
        "half the FFN width (default 0: the dense Qwen2)",
    )
    add_run_options(parser, timeout_min=30.0, example="optimizer.lr=1e-3")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_command_line(
        lambda: run_demo(
            args.run_dir,
            steps=args.steps,
            overrides=args.overrides,
            config_path=args.config,
            timeout_s=args.timeout_min * 60,
            progress=not args.no_progress,
            lora_rank=args.lora,
            moe_experts=args.moe,
            engine=args.engine,
        ),
        _format_result,
    )


def _format_result(result: RunResult) -> str:
    text = format_result(result, headline="demo finished")
    if result.summary.steps >= 2 * result.summary.window and result.summary.gain < 0.4:
        text += "\nnote: the reward rose less than the usual 0.4; try more --steps"
    return text


if __name__ == "__main__":
    sys.exit(main())
