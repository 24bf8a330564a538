"""The GRPO loss from hidden states: logits-based path vs the fused linear op, fwd+bwd, time and memory.

Both compute the GRPO loss (PPO clip, k3 KL to a reference, entropy bonus, token-mean) of
``logits = h @ W^T`` and the gradients ``d/dh`` and ``d/dW``, on the same inputs:

- ``logits`` (baseline): the output layer's matmul ``h @ W^T`` (``[T, V]``), today's
  ``kernels.grpo_loss.fused_grpo_loss`` on those logits (chunked torch two-pass, gradient buffer of its
  own), then autograd back through the matmul. ``logits-inplace``: the same with ``inplace=True`` (the
  loss writes the gradient over the logits, as the trainer does).
- ``fused-linear``: ``kernels.fused_linear_grpo.fused_linear_grpo_loss`` on ``(h, W)``, default chunk
  (chunk x V ~ T x H); ``fused-linear-c512``: 512-token chunks; ``fused-linear-one-piece``: every token
  in one chunk whose logits the gradient pass reuses (``single_chunk_bytes``: what ``grpo.fused_linear:
  auto`` does while the logits fit in 256 MiB; here they are 512 MiB, so the limit is raised).

Each variant runs in its own process. "extra peak" is the process's resident-set high-water mark
(``VmHWM``, reset to the current RSS by writing 5 to ``/proc/self/clear_refs`` once the inputs exist;
``ru_maxrss`` minus the baseline where that reset is unavailable) minus the RSS at that point: it
includes the gradients both paths return (``dh`` + ``dW``, listed apart), so "working" = extra peak -
those is the memory the loss itself needs on top of its results. Every variant saves its loss, metrics
and gradients; the parent checks that they equal the baseline's.

    .venv/bin/python benchmarks/bench_fused_linear_grpo.py          # CPU fp32: T=4096, V=32768, H=1024

Prints a table and writes benchmarks/out/fused_linear_grpo.json (device, date, versions, raw numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("logits", "logits-inplace", "fused-linear", "fused-linear-c512", "fused-linear-one-piece")
SEQUENCE = 512
"""Tokens per sequence (the batch is T / SEQUENCE sequences, all tokens trained)."""


def _rss_tools():
    """``(reset_peak, peak_bytes, current_bytes)`` for this process (Linux ``/proc``)."""
    import resource

    def current() -> int:
        return _status_kb("VmRSS") * 1024

    def reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak() -> int:
        hwm = _status_kb("VmHWM")
        return hwm * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return reset, peak, current


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(variant: str, tokens: int, vocab: int, hidden_size: int, repeats: int, save: Path) -> dict:
    """In a fresh process: median fwd+bwd time and peak extra memory of one variant."""
    import time

    import torch

    from atropos_megatron.algo.reduce import aggregation_weights
    from atropos_megatron.config import GRPOConfig
    from atropos_megatron.kernels.fused_linear_grpo import default_chunk_tokens, fused_linear_grpo_loss
    from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
    from atropos_megatron.kernels.logprobs import fused_token_logprobs

    torch.manual_seed(0)
    cfg = GRPOConfig(kernel="torch", kl_coef=0.01, entropy_coef=0.001)
    batch = max(1, tokens // SEQUENCE)
    shape = (batch, tokens // batch)
    hidden = torch.randn(*shape, hidden_size).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) * (2.0 / hidden_size**0.5)).requires_grad_()
    labels = torch.randint(0, vocab, shape)
    mask = torch.ones(shape, dtype=torch.bool)
    with torch.no_grad():  # current log-probs, 256 tokens at a time (no [T, V] before the baseline)
        flat_h, flat_labels = hidden.view(-1, hidden_size), labels.view(-1)
        current = torch.cat([
            fused_token_logprobs(flat_h[i : i + 256] @ weight.T, flat_labels[i : i + 256], backend="torch")[0]
            for i in range(0, tokens, 256)
        ]).view(shape)  # fmt: skip
    old = current + 0.1 * torch.randn(shape)
    ref = current + 0.1 * torch.randn(shape)
    adv = torch.randn(batch, 1).expand(shape).contiguous()
    weights = aggregation_weights(mask, cfg.loss_aggregation)
    rest = dict(labels=labels, old_logprobs=old, advantages=adv, loss_mask=mask, weights=weights)
    chunk = 512 if variant.endswith("-c512") else None

    def step():
        hidden.grad = weight.grad = None
        if variant.startswith("logits"):
            logits = hidden @ weight.T  # the output layer
            loss, metrics = fused_grpo_loss(
                logits, **rest, cfg=cfg, ref_logprobs=ref, inplace=variant.endswith("-inplace")
            )
            del logits  # nothing else reads them: autograd alone decides what stays alive
        else:
            one_piece = tokens * vocab * 4 if variant.endswith("-one-piece") else 0
            loss, metrics = fused_linear_grpo_loss(
                hidden, weight, **rest, cfg=cfg, ref_logprobs=ref, chunk_tokens=chunk,
                single_chunk_bytes=one_piece,
            )  # fmt: skip
        loss.backward()
        return loss, metrics

    reset_peak, peak_bytes, current_bytes = _rss_tools()
    hidden.grad = weight.grad = None
    exact_reset = reset_peak()
    baseline = current_bytes() if exact_reset else peak_bytes()
    loss, metrics = step()  # warm-up; also reaches the variant's peak
    peak = peak_bytes()
    torch.save({"loss": loss.detach(), "metrics": metrics, "dh": hidden.grad, "dW": weight.grad}, save)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    grads_bytes = (hidden.numel() + weight.numel()) * 4
    return {
        "variant": variant,
        "median_s": sorted(times)[len(times) // 2],
        "times_s": times,
        "extra_peak_bytes": max(0, peak - baseline),
        "returned_grads_bytes": grads_bytes,
        "working_bytes": max(0, peak - baseline - grads_bytes),
        "logits_bytes": tokens * vocab * 4,
        "chunk_tokens": tokens
        if variant.endswith("-one-piece")
        else chunk or default_chunk_tokens(tokens, hidden_size, vocab),
        "peak_method": "VmHWM after clear_refs" if exact_reset else "ru_maxrss",
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens (default 4096)")
    parser.add_argument("--vocab", type=int, default=32768, help="V, vocabulary (default 32768)")
    parser.add_argument("--hidden", type=int, default=1024, help="H, hidden size (default 1024)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions after one warm-up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "fused_linear_grpo.json")
    parser.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape_args = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    shape_args += ["--repeats", str(args.repeats)]

    if args.worker:
        row = measure(args.worker, args.tokens, args.vocab, args.hidden, args.repeats, args.save)
        print(json.dumps(row))
        return

    print(
        f"GRPO loss fwd+bwd from h [{args.tokens}, {args.hidden}] and W [{args.vocab}, {args.hidden}], fp32"
    )
    header = f"{'variant':<20}{'median s':>10}{'extra peak MiB':>16}{'working MiB':>13}{'peak vs logits':>16}"
    print(header + f"{'working vs logits':>19}{'speed-up':>10}{'max rel err':>13}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            save = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, __file__, "--worker", variant, "--save", str(save), *shape_args]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            first = Path(tmp) / f"{rows[0]['variant'] if rows else variant}.pt"
            row["relative_error_vs_first"] = _compare(first, save)
            rows.append(row)
            _print_row(rows, row)

    import torch

    versions = {"torch": torch.__version__}
    for name in ("triton", "megatron.core"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name, fromlist=["__version__"]).__version__
    device_name = platform.processor() or "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "fused_linear_grpo",
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "threads": torch.get_num_threads(),
        "versions": versions,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": "fp32",
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"device {device_name}, {torch.get_num_threads()} threads, versions {versions}; wrote {args.out}")


def _compare(first: Path, other: Path) -> dict[str, float]:
    """Relative error (``max |a - b| / max |a|``) of loss, dh, dW and the worst metric."""
    import torch

    a, b = torch.load(first), torch.load(other)

    def error(x, y) -> float:
        return ((x.double() - y.double()).abs().max() / x.double().abs().max().clamp(min=1e-12)).item()

    errors = {key: error(a[key], b[key]) for key in ("loss", "dh", "dW")}
    errors["metrics"] = max(error(a["metrics"][k], b["metrics"][k]) for k in a["metrics"])
    return errors


def _print_row(rows: list[dict], row: dict) -> None:
    """One table line, relative to the first (baseline) variant."""
    base = rows[0]
    print(
        f"{row['variant']:<20}{row['median_s']:>10.2f}{row['extra_peak_bytes'] / 2**20:>16.0f}"
        f"{row['working_bytes'] / 2**20:>13.0f}"
        f"{row['extra_peak_bytes'] / max(base['extra_peak_bytes'], 1):>16.3f}"
        f"{row['working_bytes'] / max(base['working_bytes'], 1):>19.3f}"
        f"{base['median_s'] / row['median_s']:>10.2f}{max(row['relative_error_vs_first'].values()):>13.1e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
