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
from atropos_megatron.logs import configure_logging

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
    if argv[:1] == ["demo"]:  # its own parser (run dir, steps, overrides for the demo's config)
        from atropos_megatron.demo.run import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["run"]:  # its own parser: the environment script, then `--` and its flags
        from atropos_megatron.demo.run_env import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["status"]:  # its own parser: the run's config, --json
        from atropos_megatron.status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["launch"]:  # its own parser: plan / run / stop
        from atropos_megatron.launch.cli import main as launch_main

        return launch_main(argv[1:])
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
    _add_config_arguments(config, example="parallel.tensor_parallel_size=2")
    config.set_defaults(handler=_cmd_config)

    train = commands.add_parser(
        "train",
        help="train with GRPO on batches from the bridge (launch with torchrun or srun for >1 rank)",
        description=_TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(train, example="optimizer.lr=1e-6 parallel.tensor_parallel_size=2")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and layout, print per-rank parameters and a per-GPU memory estimate, "
        "and exit without starting anything heavy",
    )
    train.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks the job will have (--dry-run only; default: the launcher's, else one model replica)",
    )
    train.set_defaults(handler=_cmd_train)

    info = commands.add_parser(
        "info",
        help="what this machine offers: versions, CUDA, Transformer Engine, launcher environment",
        description="Print, as JSON, the versions and capabilities the trainer will run with, and how "
        "this process would join a distributed job (torchrun, Slurm or single process).",
    )
    info.set_defaults(handler=_cmd_info)

    bridge = commands.add_parser(
        "bridge",
        help="run the gRPC bridge between the Atropos API, the trainer and inference servers",
        description="Serve the bridge (config sections `bridge` and `weights`) until SIGTERM/SIGINT. Batches "
        "handed out and not acknowledged stay in bridge.spool_dir and are served again after a restart. "
        "Weight pushes from the trainer go to weights.inference_servers; bridge.mode=agent runs a per-node "
        "bridge that only applies weights to its node's servers.",
    )
    _add_config_arguments(bridge, example="bridge.atropos_url=http://127.0.0.1:8000")
    bridge.set_defaults(handler=_cmd_bridge)

    for name, help_text in (
        (
            "bridge-status",
            "print a running bridge's status as JSON (queue, served/acked, rejections, each inference "
            "server's weight_version)",
        ),
        (
            "bridge-peek",
            "write the oldest waiting batch of a bridge as JSON, leaving it queued for the trainer",
        ),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--address", default="127.0.0.1:50051", help="bridge host:port")
        command.add_argument("--token", default=None, help="bearer token, if the bridge requires one")
        command.add_argument("--tls-ca", default=None, metavar="PEM", help="CA to verify a TLS bridge with")
        command.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
        if name == "bridge-peek":
            command.add_argument(
                "--out", required=True, metavar="FILE", help="where to write the batch (JSON)"
            )
            command.set_defaults(handler=_cmd_bridge_peek)
        else:
            command.set_defaults(handler=_cmd_bridge_status)

    _add_serve_parser(commands)

    commands.add_parser(
        "demo",
        help="the whole loop on this machine: a tiny model learns a toy Atropos task in minutes on CPU "
        "(see demo --help)",
        add_help=False,
    )
    commands.add_parser(
        "run",
        help="train on your own Atropos environment script, every process on this machine (see run --help)",
        add_help=False,
    )
    commands.add_parser(
        "status",
        help="one view of a running job (Atropos queue and environments, bridge, inference, trainer) "
        "and why no batch comes (see status --help)",
        add_help=False,
    )
    commands.add_parser(
        "launch",
        help="start a run's processes on the nodes of a Slurm allocation: launch plan / run / stop "
        "(see launch --help and examples/slurm/)",
        add_help=False,
    )
    commands.add_parser(
        "convert",
        help="convert checkpoints HuggingFace <-> Megatron (hf-to-mcore, mcore-to-hf; see convert --help)",
        add_help=False,
    )
    return parser


_SERVE_DESCRIPTION = """\
Serve an HF checkpoint behind SGLang's HTTP protocol (same routes, request fields and response JSON:
/generate, /v1/completions, /v1/chat/completions, the weight-update, pause and flush routes). It is
the reference peer that our SGLang client code is tested against, and the CPU default that lets the
whole system run on a laptop. It is NOT a production server: HF transformers, TP=1, no paged
attention, no streaming. Use real SGLang for speed.

  atropos-megatron serve --model ./tiny-qwen2 --port 30000
  atropos-megatron serve --model ./ckpt --device cuda --dtype bf16 --admin-api-key "$ADMIN_KEY"
"""


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="reference SGLang-protocol inference server (HF transformers; CPU default, test peer)",
        description=_SERVE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--model", required=True, metavar="DIR", help="HF checkpoint directory (with tokenizer)"
    )
    serve.add_argument(
        "--tokenizer-path", default=None, metavar="DIR", help="tokenizer directory (default: --model)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    serve.add_argument("--port", type=int, default=30000, help="TCP port (default 30000, as SGLang)")
    serve.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    serve.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="model dtype")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on generation")
    serve.add_argument(
        "--admin-api-key",
        default=None,
        help="require this key (only this one) on weight-update, pause, flush and version routes",
    )
    serve.add_argument("--weight-version", default="default", help="initial weight version label")
    serve.add_argument(
        "--sglang-version",
        default="0.5.23",
        help="SGLang protocol generation to emulate: >= 0.5.21 requires begin/end_weight_update "
        "sessions around tensor and distributed updates; older ones answer those routes with 404",
    )
    serve.add_argument(
        "--protocol",
        choices=("sglang", "vllm"),
        default="sglang",
        help="HTTP protocol: SGLang's (default) or vLLM 0.33's (its RL routes and, with --enable-scale-out, "
        "its token route /inference/v1/generate; with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in the "
        "environment, /v1/load_lora_adapter and /v1/unload_lora_adapter; no /generate; docs/vllm.md)",
    )
    serve.add_argument(
        "--enable-scale-out",
        action="store_true",
        help="--protocol vllm: mount POST /inference/v1/generate, vLLM's token-in, token-out route "
        "({token_ids, sampling_params} -> choices[i].token_ids and log-probs), as `vllm serve "
        "--enable-scale-out` does; without it the route answers 403, as stock vLLM's does. Needed by the "
        "bridge's translation of atroposlib's /generate",
    )
    serve.add_argument(
        "--logprobs-mode",
        choices=("raw_logprobs", "processed_logprobs"),
        default=None,
        help="--protocol vllm: which log-probs the token route reports, as vllm serve's flag: raw_logprobs "
        "(vLLM's default: log_softmax of the unscaled logits) or processed_logprobs (after temperature, "
        "as the trainer's; the launcher and demo use it). Prompt log-probs are raw in both. Not mirrored: "
        "vLLM's renormalisation over top-k/top-p/min-p, refused by name when log-probs are asked for",
    )
    serve.add_argument(
        "--weight-transfer-config",
        default=None,
        metavar="JSON",
        help='--protocol vllm: enable the weight-transfer routes, \'{"backend": "nccl"|"gloo"}\' (gloo: CPU)',
    )
    serve.add_argument("--served-model-name", default=None, help="model name in /v1 (default: --model)")
    serve.add_argument("--max-batch", type=int, default=16, help="most samples decoded together (default 16)")
    serve.add_argument("--seed", type=int, default=0, help="seed for sampling without sampling_seed")
    serve.add_argument(
        "--enable-return-routed-experts",
        action="store_true",
        help="as SGLang's: requests with return_routed_experts get meta_info.routed_experts, each fed "
        "token's experts per layer (MoE models only)",
    )
    from atropos_megatron.inference.lora_options import add_lora_arguments  # argparse + stdlib only

    add_lora_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from atropos_megatron.inference.http_server import serve

    configure_logging(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


_TRAIN_DESCRIPTION = """\
Run the GRPO trainer: batches come from the bridge (bridge.address), weights go back to the inference
servers after every step (weights.*), metrics go to <logging.run_dir>/metrics.jsonl, checkpoints to
<logging.run_dir>/checkpoints every checkpoint.save_interval_steps and on SIGTERM (exit status 143).

  atropos-megatron train --config examples/configs/debug_tiny.yaml model.hf_path=./tiny-qwen2
  torchrun --nproc_per_node 2 -m atropos_megatron.cli train --config my.yaml parallel.tensor_parallel_size=2
  atropos-megatron train --config my.yaml checkpoint.load=latest       # resume the run in logging.run_dir
  atropos-megatron train --config recipe.yaml --dry-run --world-size 64  # layout + memory per GPU
"""


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if cfg is None:
        return 2
    if args.dry_run:
        from atropos_megatron.trainer.dry_run import dry_run

        try:
            print(dry_run(cfg, world_size=args.world_size))
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    from atropos_megatron.trainer.parallel import detect_dist_env

    rank = detect_dist_env().rank
    configure_logging(
        cfg.logging.level if rank == 0 else "WARNING",
        f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    from atropos_megatron.trainer.loop import train

    return train(cfg)


def _add_config_arguments(command: argparse.ArgumentParser, *, example: str) -> None:
    command.add_argument("--config", metavar="YAML", help="config file (default: built-in defaults)")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"e.g. {example}")


def _load_config(args: argparse.Namespace):
    """The validated config of ``--config`` + overrides, or None after printing what is wrong."""
    from atropos_megatron.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _cmd_config(args: argparse.Namespace) -> int:
    from atropos_megatron.config import config_to_yaml

    cfg = _load_config(args)
    if cfg is None:
        return 2
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def _cmd_bridge(args: argparse.Namespace) -> int:
    from atropos_megatron.bridge.server import serve

    cfg = _load_config(args)
    if cfg is None:
        return 2
    configure_logging(cfg.logging.level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(cfg.bridge, cfg.weights)
    return 0


def _bridge_client(args: argparse.Namespace):
    from atropos_megatron.bridge.client import BridgeClient

    return BridgeClient(
        args.address, token=args.token, tls_ca=args.tls_ca, timeout_s=args.timeout, reconnect_s=args.timeout
    )


def _cmd_bridge_status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    try:
        with _bridge_client(args) as client:
            status = client.status()
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(MessageToDict(status, always_print_fields_with_no_presence=True), indent=2))
    return 0


def _cmd_bridge_peek(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import grpc

    from atropos_megatron.bridge.codec import batch_from_proto

    try:
        with _bridge_client(args) as client:
            message = client.peek_batch(wait_s=args.timeout)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    batch = batch_from_proto(message)
    fields = {
        field.name: getattr(batch, field.name).tolist()
        if hasattr(getattr(batch, field.name), "tolist")
        else getattr(batch, field.name)
        for field in dataclasses.fields(batch)
    }
    fields["groups"] = [dataclasses.asdict(group) for group in batch.groups]
    Path(args.out).write_text(json.dumps(fields, indent=1) + "\n")
    print(
        f"batch {batch.batch_id} (step {batch.step}, {batch.num_sequences} sequences) written to {args.out}"
    )
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
