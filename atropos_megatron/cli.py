"""The `atropos-megatron` command: one entry point, one subcommand per job.

Subcommands import what they need when they run, so `atropos-megatron --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Sequence

from atropos_megatron import __version__

_EPILOG = """\
Configuration: every subcommand that takes --config also takes key=value overrides, applied last:
  atropos-megatron config --config examples/configs/debug_tiny.yaml optimizer.lr=1e-5 steps=50
A mistyped key or a bad value stops with the field's name, before anything starts.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # its own parser: two directions, each with its own options
        from atropos_megatron.weights.convert import main as convert_main

        return convert_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return args.handler(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atropos-megatron",
        description="GRPO training for Atropos environments on Megatron-Core.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    config = commands.add_parser(
        "config",
        help="validate a config and print it fully resolved (defaults + YAML + overrides)",
        description="Validate a training config and print the resolved YAML. Exit status 2 names the "
        "first bad field.",
    )
    config.add_argument("--config", metavar="YAML", help="config file (default: built-in defaults)")
    config.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. parallel.tensor_parallel_size=2"
    )
    config.set_defaults(handler=_cmd_config)

    info = commands.add_parser(
        "info",
        help="what this machine offers: versions, CUDA, Transformer Engine, launcher environment",
        description="Print, as JSON, the versions and capabilities the trainer will run with, and how "
        "this process would join a distributed job (torchrun, Slurm or single process).",
    )
    info.set_defaults(handler=_cmd_info)

    commands.add_parser(
        "convert",
        help="convert checkpoints HuggingFace <-> Megatron (hf-to-mcore, mcore-to-hf; see convert --help)",
        add_help=False,
    )
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    from atropos_megatron.config import ConfigError, config_to_yaml, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from atropos_megatron.trainer.megatron_patches import te_available
    from atropos_megatron.trainer.parallel import LayoutError, detect_dist_env

    try:
        dist_env = detect_dist_env().__dict__
    except LayoutError as exc:
        dist_env = {"error": str(exc)}
    facts = {
        "atropos_megatron": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "atroposlib": _version("atroposlib"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "transformer_engine": te_available(),
        "distributed_env": dist_env,
    }
    print(json.dumps(facts, indent=2))
    return 0


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
