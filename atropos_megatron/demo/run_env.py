"""``atropos-megatron run ENV_SCRIPT``: train on your own Atropos environment, every process on one machine.

The same local run as the demo (:mod:`atropos_megatron.demo.local`), for any script built on
atroposlib's ``BaseEnv``: it is started with its own ``serve`` CLI, the flags that connect it filled
in, and anything after ``--`` passed through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from atropos_megatron.demo.assets import BYTE_CONTEXT, MODEL_SIZES
from atropos_megatron.demo.local import (
    REPO,
    AssetOptions,
    RunSpec,
    add_run_options,
    engine_overrides,
    format_result,
    run_from_command_line,
    run_local,
)

DEFAULT_CONFIG = REPO / "examples/configs/run_cpu.yaml"

_DESCRIPTION = """\
Train with GRPO on your own Atropos environment, with every process of a cluster run on this machine:
the Atropos API (run-api), the reference inference server (SGLang's protocol, or vLLM's with
--engine vllm), the gRPC bridge, the trainer, and your environment script started with its own
`serve` CLI. The flags that connect it are filled in (--env.rollout_server_url, --env.tokenizer_name,
--env.use_wandb false, --env.total_steps, --openai.server_type sglang or vllm, --openai.base_url,
--openai.model_name, --openai.tokenizer_name, --openai.api_key EMPTY, --openai.health_check false);
anything after `--` goes to the environment as given and replaces a filled-in flag of the same name.

Without model.hf_path (or --model), a tiny random Qwen2 is built in the run directory, with a
byte-level tokenizer (any text round-trips) and a ChatML chat template, so any environment runs end
to end; it will not learn a real task. Point --model at a HuggingFace model directory (with its
tokenizer) of a supported architecture (llama, qwen2, qwen3, mistral) to train that instead.

  atropos-megatron run my_env.py                                   # 20 steps into runs/my_env
  atropos-megatron run my_env.py --steps 50 optimizer.lr=1e-4 -- --env.group_size 4
  atropos-megatron run my_env.py --model ./Qwen2.5-0.5B-Instruct data.max_token_len=4096

data.batch_size (default 16) must be a multiple of the environment's group size: Atropos forms
batches of whole groups only. If training waits, the trainer's log says what it waits on, and
`atropos-megatron status --config RUN_DIR/config.yaml` shows the whole run.

Afterwards, in the run directory:
  reward_curve.png   reward per step and its 5-step mean
  metrics.jsonl      everything the trainer logged, one JSON object per step
  config.yaml        the resolved config
  logs/<role>.log    each process's output: atropos-api, inference, bridge, trainer, env
Ctrl-C stops every process; so does a failure of any one of them (its log's tail is printed).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atropos-megatron run",
        usage="%(prog)s ENV_SCRIPT [options] [KEY=VALUE ...] [-- ENV_FLAGS ...]",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("env_script", metavar="ENV_SCRIPT", help="a Python script whose BaseEnv has `serve`")
    parser.add_argument("--run-dir", default=None, help="where everything goes (default runs/<script name>)")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps (default: the config's, 20)")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), metavar="YAML", help="trainer config (default %(default)s)"
    )
    parser.add_argument(
        "--model", default=None, metavar="HF_DIR", help="train this HF model (same as model.hf_path=HF_DIR)"
    )
    built = parser.add_argument_group("the built model (without --model)")
    built.add_argument(
        "--context",
        type=int,
        default=BYTE_CONTEXT,
        help=f"positions of the built model (default {BYTE_CONTEXT}); also data.max_token_len",
    )
    built.add_argument(
        "--model-size",
        default="tiny",
        choices=sorted(MODEL_SIZES),
        help="size of the built model: tiny 0.1M, small 4M, base 32M parameters (default tiny)",
    )
    add_run_options(parser, timeout_min=60.0, example="optimizer.lr=1e-4")
    return parser


def split_env_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command's own arguments, and the environment's (everything after the first ``--``)."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, env_flags = split_env_flags(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(own)
    script = Path(args.env_script).resolve()
    # the user's come later and win
    overrides = [
        *engine_overrides(args.engine, args.overrides),
        f"data.max_token_len={args.context}",
        *args.overrides,
    ]
    if args.model:
        overrides.append(f"model.hf_path={Path(args.model).resolve()}")
    spec = RunSpec(
        env_script=script,
        config_path=Path(args.config),
        env_flags=env_flags,
        assets=AssetOptions(tokenizer="bytes", context=args.context, size=args.model_size),
        title=f"atropos-megatron run: {script.stem}",
    )
    return run_from_command_line(
        lambda: run_local(
            spec,
            args.run_dir or Path("runs") / script.stem,
            steps=args.steps,
            overrides=overrides,
            timeout_s=args.timeout_min * 60,
            progress=not args.no_progress,
        ),
        lambda result: format_result(result, headline=f"run finished: {script.name}"),
    )


if __name__ == "__main__":
    sys.exit(main())
