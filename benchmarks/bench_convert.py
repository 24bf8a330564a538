"""Checkpoint conversion: wall time and peak memory relative to the model's bytes, vs a naive converter.

Generates an HF checkpoint with random weights in a real architecture's shape (default: Llama 3.2 1B,
bf16, 2.5 GB), then times, each in its own process:

- ``naive``: the baseline, what a simple converter does: ``safetensors.torch.load_file`` of every
  shard, a dict of the converted Megatron tensors, ``torch.save`` of that dict (one file, TP=1).
- ``hf-to-mcore``: ``tools/convert_checkpoint.py hf-to-mcore`` (streams into one model copy, writes
  torch_dist).
- ``mcore-to-hf``: ``tools/convert_checkpoint.py mcore-to-hf`` on that output.

Memory: the process's exact peak RSS (from the kernel, via ``wait4``), and the PSS summed over it and
its children sampled every 50 ms (Megatron's checkpoint writer forks; PSS counts shared pages once).
A bare ``import atropos_megatron.weights.convert`` with Megatron loaded is also measured: the fixed
cost that every converter run pays whatever the model's size.

    .venv/bin/python benchmarks/bench_convert.py                    # Llama 3.2 1B shape, 2.5 GB
    .venv/bin/python benchmarks/bench_convert.py --preset llama-3b  # Llama 3.2 3B shape, 6.4 GB

Prints a table and writes benchmarks/out/convert_<preset>.json. Needs ~4x the model's size on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    # Shapes of the public configs (tied embeddings, GQA 8 key/value heads).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24),
}
COMMON = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    torch_dtype="bfloat16",
)
IMPORTS_ONLY = """
from atropos_megatron.weights.convert import single_process_group
import megatron.core.models.gpt, megatron.core.dist_checkpointing, transformers
"""
NAIVE = """
import sys, glob
import torch
from safetensors.torch import load_file
from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
from atropos_megatron.weights.hf_mapping import hf_to_megatron
src = sys.argv[1]
model = model_config_from_hf(read_hf_config(src), dtype="bf16")
tensors = {}
for f in sorted(glob.glob(src + "/*.safetensors")):
    tensors.update(load_file(f))
converted = dict(hf_to_megatron(tensors.items(), model, padded_vocab=model.vocab_size))
torch.save(converted, sys.argv[2])
"""


def generate(directory: Path, config: dict) -> int:
    """Write a random bf16 HF checkpoint tensor by tensor (1 GB shards); returns its weight bytes."""
    import torch

    from atropos_megatron.weights.safetensors_io import ShardedSafetensorsWriter

    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
        }
    generator = torch.Generator().manual_seed(0)
    with ShardedSafetensorsWriter(directory, max_shard_bytes=10**9) as writer:
        for name, shape in shapes.items():
            writer.add(name, (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_bytes


def run_measured(command: list[str]) -> dict:
    """Run ``command``: wall time, its exact peak RSS (kernel accounting), the sampled peak PSS of its
    process tree.

    The kernel's peak RSS of a child includes what it held between fork and exec, i.e. a copy of this
    process's footprint: this process therefore never holds a model (generation runs in a child).
    """
    import psutil

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        peak_pss = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            pss = 0
            for member in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pss += member.memory_full_info().pss
            peak_pss = max(peak_pss, pss)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss": usage.ru_maxrss * 1024,
        "peak_tree_pss": peak_pss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="llama-1b")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the checkpoints (temp)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive baseline (needs ~2x RAM)")
    parser.add_argument("--generate-into", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = {**COMMON, **PRESETS[args.preset]}
    if args.generate_into:  # in a child, so that this process stays small (see run_measured)
        print(generate(args.generate_into, config))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    try:
        started = time.perf_counter()
        generated = subprocess.run(
            [sys.executable, __file__, "--preset", args.preset, "--generate-into", str(workdir / "hf")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        model_bytes = int(generated.stdout.split()[-1])
        print(
            f"generated {args.preset}: {model_bytes / 1e9:.2f} GB bf16 in {time.perf_counter() - started:.0f} s"
        )
        tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
        runs = {"imports only (fixed cost)": run_measured([sys.executable, "-c", IMPORTS_ONLY])}
        if not args.skip_naive:
            runs["naive: load_file + dict + torch.save"] = run_measured(
                [sys.executable, "-c", NAIVE, str(workdir / "hf"), str(workdir / "naive.pt")]
            )
            (workdir / "naive.pt").unlink()
        runs["hf-to-mcore"] = run_measured(
            [*tool, "hf-to-mcore", "--hf", str(workdir / "hf"), "--out", str(workdir / "mcore")]
        )
        runs["mcore-to-hf"] = run_measured(
            [*tool, "mcore-to-hf", "--mcore", str(workdir / "mcore"), "--out", str(workdir / "hf_out")]
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.preset}, {model_bytes / 1e9:.2f} GB of bf16 weights\n")
    print("| step | wall s | peak RSS GB | x model | peak PSS (tree) GB | x model |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        rss, pss = run["peak_rss"], run["peak_tree_pss"]
        print(
            f"| {name} | {run['seconds']:.1f} | {rss / 1e9:.2f} | {rss / model_bytes:.2f} "
            f"| {pss / 1e9:.2f} | {pss / model_bytes:.2f} |"
        )
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "preset": args.preset,
        "config": config,
        "model_bytes": model_bytes,
        "runs": runs,
    }
    (out / f"convert_{args.preset}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
