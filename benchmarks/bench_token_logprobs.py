"""Token log-probs + entropy, forward and backward: chunked torch path vs naive PyTorch, time and memory.

Baseline ("naive"): ``log_softmax(logits.float() / T)`` + gather + entropy under autograd, i.e.
`algo.logprobs.token_logprobs`. Candidates: `kernels.chunked_logprobs` ("chunked"), and the same
writing the gradient into the logits buffer ("chunked-inplace", how the trainer uses it). Each variant runs
in its own process so that its peak resident memory can be read cleanly: "extra peak" is the
process's peak RSS minus its RSS once the inputs exist (logits, labels, upstream gradients).

    .venv/bin/python benchmarks/bench_token_logprobs.py                  # T=4096, V=32768, fp32
    .venv/bin/python benchmarks/bench_token_logprobs.py --tokens 1024 --vocab 8192 --dtype bf16

Prints a table and writes benchmarks/out/token_logprobs.json (device, date, versions, raw numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

VARIANTS = ("naive", "chunked", "chunked-inplace")


def measure(variant: str, tokens: int, vocab: int, dtype_name: str, repeats: int) -> dict:
    """Run in a fresh process: time fwd+bwd and the peak extra memory of one variant."""
    import resource
    import time

    import psutil
    import torch

    from atropos_megatron.algo.logprobs import token_logprobs
    from atropos_megatron.kernels.chunked_logprobs import chunked_token_logprobs

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    logits = torch.randn(tokens, vocab).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    upstream = torch.randn(tokens)

    class ModelOutput(torch.autograd.Function):
        """Stands in for the output layer: logits are a non-leaf whose gradient is consumed and freed."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return None

    def step():
        output = ModelOutput.apply(logits)
        if variant == "naive":
            logprobs, entropy = token_logprobs(output, labels, return_entropy=True)
        else:
            logprobs, entropy = chunked_token_logprobs(
                output, labels, return_entropy=True, inplace_backward=variant == "chunked-inplace"
            )
        ((logprobs * upstream).sum() + entropy.sum()).backward()

    baseline_rss = psutil.Process().memory_info().rss
    step()  # warm-up; also reaches the variant's peak
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "median_s": sorted(times)[len(times) // 2],
        "extra_peak_bytes": max(0, peak_rss - baseline_rss),
        "logits_bytes": logits.numel() * logits.element_size(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens (default 4096)")
    parser.add_argument("--vocab", type=int, default=32768, help="V, vocabulary (default 32768)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "token_logprobs.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens, args.vocab, args.dtype, args.repeats)))
        return

    rows = []
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--tokens",
            str(args.tokens),
            "--vocab",
            str(args.vocab),
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
        ]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))

    import torch

    naive = rows[0]
    print(
        f"token log-probs + entropy, fwd+bwd, T={args.tokens} V={args.vocab} {args.dtype}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"{'variant':<16}{'median ms':>12}{'extra peak MB':>16}{'vs naive mem':>14}{'vs naive time':>15}")
    for row in rows:
        print(
            f"{row['variant']:<16}{row['median_s'] * 1e3:>12.1f}{row['extra_peak_bytes'] / 2**20:>16.0f}"
            f"{row['extra_peak_bytes'] / max(naive['extra_peak_bytes'], 1):>14.2f}"
            f"{row['median_s'] / naive['median_s']:>15.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "token_logprobs",
                "date": datetime.date.today().isoformat(),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "machine": platform.machine(),
                "torch": torch.__version__,
                "tokens": args.tokens,
                "vocab": args.vocab,
                "dtype": args.dtype,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
