"""Attention over one packed (THD) row: SDPA per sequence (the trainer's) vs a block-diagonal mask vs FlexAttention.

The trainer's local-spec attention (``trainer/attention.py``) runs PyTorch SDPA once per sequence of
``cu_seqlens``. The alternatives the design weighed, on the same packed row and heads:

- ``sdpa_per_sequence``: what the trainer runs (``trainer.attention.attend_per_sequence``);
- ``sdpa_block_mask``: one SDPA call under a ``[s, s]`` block-diagonal causal bool mask (what a packed
  row cost before: every score of the row is computed, and the mask exists);
- ``flex_attention``: ``torch.nn.attention.flex_attention`` with a block mask from the document ids,
  compiled (``torch.compile``; the first call's compile time is reported apart). On CPU it needs
  inductor's C++ toolchain; where it cannot compile, it is reported as unavailable.

Each is timed forward + backward (median of ``--repeats`` after a warm-up) and checked against the
per-sequence result. Sequence lengths are drawn like the trainer benchmark's rollouts.

    .venv/bin/python benchmarks/bench_packed_attention.py [--tokens 2048 --heads 8 --kv-heads 2 --head-dim 32]

Writes benchmarks/out/bench_packed_attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def packed_lengths(tokens: int, low: int, high: int, seed: int) -> list[int]:
    """Sequence lengths in ``[low, high]`` filling ``tokens`` (the last one cut to fit)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < tokens:
        length = min(int(torch.randint(low, high + 1, (), generator=gen)), tokens - used)
        lengths.append(length)
        used += length
    return lengths


def per_sequence(q, k, v, lengths):
    """``[heads, t, d]`` inputs; the trainer's own per-sequence SDPA (``trainer.attention``)."""
    from atropos_megatron.trainer.attention import attend_per_sequence

    out = attend_per_sequence(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths, scale=None, gqa=True
    )
    return out.transpose(0, 1)


def block_mask_sdpa(q, k, v, lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal = torch.ones(doc.numel(), doc.numel(), dtype=torch.bool).tril()
    mask = (doc[:, None] == doc[None, :]) & causal
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def make_flex(lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block = create_block_mask(document_causal, None, None, doc.numel(), doc.numel(), device="cpu")
    compiled = torch.compile(flex_attention)

    def run(q, k, v, _lengths):
        return compiled(q[None], k[None], v[None], block_mask=block, enable_gqa=True)[0]

    return run


def timed(fn, q, k, v, lengths, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats + 1):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        start = time.perf_counter()
        out = fn(*leaves, lengths)
        out.sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), out.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the packed row")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=80, help="shortest sequence")
    parser.add_argument("--max-len", type=int, default=256, help="longest sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes)"
    )
    args = parser.parse_args(argv)

    lengths = packed_lengths(args.tokens, args.min_len, args.max_len, seed=0)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(args.heads, args.tokens, args.head_dim, generator=gen)
    k = torch.randn(args.kv_heads, args.tokens, args.head_dim, generator=gen)
    v = torch.randn(args.kv_heads, args.tokens, args.head_dim, generator=gen)
    variants = {"sdpa_per_sequence": per_sequence, "sdpa_block_mask": block_mask_sdpa}
    result = {
        "device": f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
        "tokens": args.tokens, "sequences": len(lengths), "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "variants": {},
    }  # fmt: skip
    if not args.no_flex:
        try:
            start = time.perf_counter()
            flex = make_flex(lengths)
            timed(flex, q, k, v, lengths, 0)  # compile
            result["flex_compile_s"] = time.perf_counter() - start
            variants["flex_attention"] = flex
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: the others still run
            result["flex_unavailable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    reference = None
    for name, fn in variants.items():
        seconds, out = timed(fn, q, k, v, lengths, args.repeats)
        reference = out if reference is None else reference
        result["variants"][name] = {
            "fwd_bwd_ms": seconds * 1e3, "max_abs_diff_vs_per_sequence": (out - reference).abs().max().item(),
        }  # fmt: skip
    base = result["variants"]["sdpa_per_sequence"]["fwd_bwd_ms"]
    print(
        f"packed row of {args.tokens} tokens, {len(lengths)} sequences, {args.heads}/{args.kv_heads} heads x {args.head_dim}"
    )
    for name, entry in result["variants"].items():
        entry["time_vs_per_sequence"] = entry["fwd_bwd_ms"] / base
        print(f"  {name:20s} {entry['fwd_bwd_ms']:8.2f} ms  x{entry['time_vs_per_sequence']:.2f}  "
              f"max|diff| {entry['max_abs_diff_vs_per_sequence']:.1e}")  # fmt: skip
    if "flex_unavailable" in result:
        print(f"  flex_attention       unavailable: {result['flex_unavailable']}")
    out_path = REPO / "benchmarks" / "out" / "bench_packed_attention.json"
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
