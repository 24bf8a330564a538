"""Token log-probs and the GRPO loss, forward + backward: fused paths vs naive PyTorch, time and memory.

Two ops, each timed forward + backward on the same inputs:

- ``logprobs``: label log-probs + entropy (upstream gradient on both), as the trainer needs them.
- ``grpo``: the whole GRPO loss (PPO clip, k3 KL to a reference, entropy bonus, token-mean).

Variants: ``naive`` is the baseline: PyTorch ``log_softmax`` of the fp32 logits + gather (+ the loss),
i.e. ``algo/`` under autograd. ``torch`` is the chunked two-pass path of ``kernels/`` and ``triton``
the Triton kernels (one kernel for ``grpo``); ``-inplace`` writes the gradient into the logits'
storage, as the trainer does. Triton variants run only on a CUDA device.

Each variant runs in its own process so that its peak memory is its own: "extra peak" is the peak
(RSS on CPU, ``max_memory_allocated`` on CUDA) minus the footprint once the inputs exist. On CUDA the
table also gives the HBM floor: the bytes a two-read-one-write pass over the logits must move divided
by the copy bandwidth measured in the same run.

    .venv/bin/python benchmarks/bench_grpo_kernels.py                       # CPU: T=4096, V=32768, fp32
    python benchmarks/bench_grpo_kernels.py --device cuda --tokens 16384 --vocab 151936 --dtype bf16

Prints a table and writes benchmarks/out/grpo_kernels.json (device, date, versions, raw numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

OPS = ("logprobs", "grpo")
VARIANTS = ("naive", "torch", "torch-inplace", "triton", "triton-inplace")
SEQUENCE = 512
"""Tokens per sequence in the GRPO inputs (the batch is T / SEQUENCE sequences)."""


def measure(
    op: str, variant: str, tokens: int, vocab: int, dtype_name: str, device: str, repeats: int
) -> dict:
    """In a fresh process: median fwd+bwd time and peak extra memory of one (op, variant)."""
    import resource
    import time

    import psutil
    import torch

    from atropos_megatron.algo.grpo import grpo_token_loss
    from atropos_megatron.algo.logprobs import token_logprobs
    from atropos_megatron.algo.reduce import aggregation_weights
    from atropos_megatron.config import GRPOConfig
    from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
    from atropos_megatron.kernels.logprobs import fused_token_logprobs

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    backend, inplace = variant.removesuffix("-inplace"), variant.endswith("-inplace")
    cfg = GRPOConfig(kernel="torch" if backend == "naive" else backend, kl_coef=0.01, entropy_coef=0.001)

    batch = max(1, tokens // SEQUENCE)
    shape = (batch, tokens // batch)
    logits = torch.randn(*shape, vocab, device=dev).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, device=dev)
    mask = torch.ones(shape, dtype=torch.bool, device=dev)
    with torch.no_grad():
        current = fused_token_logprobs(logits, labels, backend="torch")[0]
    old = current + 0.1 * torch.randn(shape, device=dev)
    ref = current + 0.1 * torch.randn(shape, device=dev)
    adv = torch.randn(batch, 1, device=dev).expand(shape).contiguous()
    weights = aggregation_weights(mask, cfg.loss_aggregation)
    up_lp, up_h = torch.randn(shape, device=dev), torch.randn(shape, device=dev)

    class ModelOutput(torch.autograd.Function):
        """Stands in for the output layer: logits are a non-leaf whose gradient is consumed and freed."""

        @staticmethod
        def forward(ctx, x):
            return x.detach()  # shares storage, like the output layer's result; not a view

        @staticmethod
        def backward(ctx, grad):
            return None

    def step():
        output = ModelOutput.apply(logits)
        if op == "logprobs":
            if backend == "naive":
                lp, h = token_logprobs(output, labels, return_entropy=True)
            else:
                lp, h = fused_token_logprobs(
                    output, labels, return_entropy=True, backend=backend, inplace_backward=inplace
                )
            loss = (lp * up_lp).sum() + (h * up_h).sum()
        elif backend == "naive":
            lp, h = token_logprobs(output, labels, return_entropy=True)
            loss, _ = grpo_token_loss(lp, old, adv, mask, weights, cfg=cfg, ref_logprobs=ref, entropy=h)
        else:
            loss, _ = fused_grpo_loss(
                output, labels, old, adv, mask, weights, cfg=cfg, ref_logprobs=ref, inplace=inplace
            )
        loss.backward()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def refresh():
        if inplace:  # the last step overwrote the logits with their gradient
            with torch.no_grad():
                logits.normal_()

    def footprint():
        sync()
        return torch.cuda.memory_allocated() if dev.type == "cuda" else psutil.Process().memory_info().rss

    baseline = footprint()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (compiles kernels); also reaches the variant's peak
    sync()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        refresh()
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    row = {
        "op": op,
        "variant": variant,
        "median_s": sorted(times)[len(times) // 2],
        "extra_peak_bytes": max(0, peak - baseline),
        "logits_bytes": logits.numel() * logits.element_size(),
    }
    if dev.type == "cuda":
        row["copy_bandwidth_Bps"] = _copy_bandwidth(logits)
    return row


def _copy_bandwidth(tensor) -> float:
    """Bytes read + written per second by ``copy_`` of ``tensor``: what HBM actually sustains here."""
    import torch

    dst = torch.empty_like(tensor)
    for _ in range(2):
        dst.copy_(tensor)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(tensor)
    stop.record()
    torch.cuda.synchronize()
    return 2 * tensor.numel() * tensor.element_size() * 10 / (start.elapsed_time(stop) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens (default 4096)")
    parser.add_argument("--vocab", type=int, default=32768, help="V, vocabulary (default 32768)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all that run on --device")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "grpo_kernels.json")
    parser.add_argument("--worker", nargs=2, metavar=("OP", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape_args = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--dtype", args.dtype]
    shape_args += ["--device", args.device, "--repeats", str(args.repeats)]

    if args.worker:
        op, variant = args.worker
        print(
            json.dumps(measure(op, variant, args.tokens, args.vocab, args.dtype, args.device, args.repeats))
        )
        return

    variants = args.variants or [v for v in VARIANTS if args.device == "cuda" or not v.startswith("triton")]
    rows = []
    for op in args.ops:
        print(f"\n{op}: fwd+bwd")
        header = f"{'variant':<16}{'median ms':>11}{'extra peak MB':>15}{'mem vs naive':>14}{'speed-up':>10}"
        print(header + (f"{'HBM floor ms':>14}{'vs floor':>10}" if args.device == "cuda" else ""))
        for variant in variants:
            cmd = [sys.executable, __file__, "--worker", op, variant, *shape_args]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{op}/{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            _print_row(rows, rows[-1])

    import torch

    versions = {"torch": torch.__version__}
    for name in ("triton", "megatron.core"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name, fromlist=["__version__"]).__version__
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "grpo_kernels",
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "versions": versions,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"device {device_name}, versions {versions}; wrote {args.out}")


def _print_row(rows: list[dict], row: dict) -> None:
    """One table line, relative to the naive baseline of the same op (itself if naive was not run)."""
    naive = next((r for r in rows if r["op"] == row["op"] and r["variant"] == "naive"), row)
    line = (
        f"{row['variant']:<16}{row['median_s'] * 1e3:>11.1f}{row['extra_peak_bytes'] / 2**20:>15.0f}"
        f"{row['extra_peak_bytes'] / max(naive['extra_peak_bytes'], 1):>14.2f}"
        f"{naive['median_s'] / row['median_s']:>10.2f}"
    )
    if "copy_bandwidth_Bps" in row:
        floor_s = 3 * row["logits_bytes"] / row["copy_bandwidth_Bps"]  # read twice, write the gradient once
        line += f"{floor_s * 1e3:>14.2f}{row['median_s'] / floor_s:>10.2f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
