"""Weight export (Megatron TP=2 on gloo -> full HF tensors in 512 MiB buckets) vs a plain in-process copy.

Builds a Llama-shaped model (TinyLlama 1.1B's widths: hidden 2048, FFN 5632, 32 heads, 4 key/value
heads, vocabulary 32000, untied; layers chosen to reach ``--size-gb`` of bf16 weights) on 2 gloo ranks
at TP=2, fills it with random numbers, then times ``export_hf_buckets`` on the sender with a consumer
that drops each bucket. Both ranks use one thread (2 cores here).

Baselines, in the same run, on the sender, with tensors of the exported HF shapes (the same bytes):

- ``torch.cat`` of all of them (as bytes) into one fresh buffer: the memory traffic of packing, in
  one process, with fresh pages as the export's buckets have;
- ``copy_`` into a preallocated, already touched buffer: the memcpy ceiling;
- a gloo ``gather`` of each rank's TP shards as one flat message: what moving the TP=2 half over
  loopback costs, without per-tensor messages, mapping or packing.

Also reports the sender's extra peak memory during the export (VmHWM reset before it) against the
bucket size. Prints a markdown table and writes benchmarks/out/weight_export.json.

    .venv/bin/python benchmarks/bench_weight_export.py                 # ~1 GB, 512 MiB buckets
    .venv/bin/python benchmarks/bench_weight_export.py --size-gb 2 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIDTHS = dict(hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32, num_query_groups=4)
VOCAB = 32000
BF16_BYTES = 2


def layers_for(size_gb: float) -> int:
    """Transformer layers that bring the bf16 model closest to ``size_gb`` (at least 1)."""
    hidden, ffn = WIDTHS["hidden_size"], WIDTHS["ffn_hidden_size"]
    kv = hidden // WIDTHS["num_attention_heads"] * WIDTHS["num_query_groups"]
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden + 2 * hidden
    fixed = 2 * VOCAB * hidden + hidden
    return max(1, round((size_gb * 1e9 / BF16_BYTES - fixed) / per_layer))


def _status_bytes(field: str) -> int:
    """A memory field of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``: the peak), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, _measure(rank, args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails loudly
        import traceback

        results.put((rank, {"error": f"{exc!r}\n{traceback.format_exc()}"}))
        raise


def _measure(rank: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from atropos_megatron.config import ModelConfig, ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.weights.export import export_hf_buckets, is_export_sender

    layout = ParallelConfig(tensor_parallel_size=2)
    coords = parallel.init_distributed(layout, seed=0)
    model = ModelConfig(
        num_layers=layers_for(args.size_gb),
        vocab_size=VOCAB,
        dtype="bf16",
        max_position_embeddings=4096,
        **WIDTHS,
    )
    # Random init (not initialize=False: Megatron only marks how weights are split while initialising).
    (chunk,) = build_model(model, layout)
    local_bytes = sum(p.numel() * p.element_size() for p in chunk.parameters())
    bucket_bytes = args.bucket_mib * 2**20

    export_s, shapes, buckets, exported_bytes, extra_peak = [], [], 0, 0, 0
    for repeat in range(args.repeats):
        dist.barrier()
        _reset_hwm()
        rss_before = _status_bytes("VmRSS")
        started = time.perf_counter()
        buckets = exported_bytes = 0
        for bucket in export_hf_buckets([chunk], model, bucket_bytes=bucket_bytes):
            buckets += 1
            exported_bytes += bucket.nbytes
            if repeat == 0:
                shapes += [(spec.shape, spec.dtype) for spec in bucket.tensors]
            del bucket  # the consumer drops each bucket
        export_s.append(time.perf_counter() - started)
        extra_peak = max(extra_peak, _status_bytes("VmHWM") - rss_before)
    dist.barrier()

    # Baseline 3: one flat gloo gather of this rank's shard bytes (both ranks take part).
    flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in chunk.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(coords.tp)] if coords.tp_rank == 0 else None
    dist.barrier()
    started = time.perf_counter()
    dist.gather(flat, gathered, group_dst=0, group=parallel.tensor_parallel_group())
    gather_s = time.perf_counter() - started
    del flat, gathered
    dist.barrier()

    result = {"local_param_bytes": local_bytes, "export_s": export_s, "gather_s": gather_s}
    if is_export_sender():
        result.update(
            num_layers=model.num_layers,
            buckets=buckets,
            exported_bytes=exported_bytes,
            extra_peak_bytes=extra_peak,
            **_copy_baselines(shapes, args.repeats),
        )
    dist.barrier()
    parallel.shutdown()
    return result


def _copy_baselines(shapes: list, repeats: int) -> dict:
    """Seconds of torch.cat into a fresh buffer and of copy_ into a touched one, same tensors (best of)."""
    import torch

    sources = [torch.randn(shape).to(dtype) for shape, dtype in shapes]
    flat_views = [t.reshape(-1).view(torch.uint8) for t in sources]
    cat_s, copy_s = [], []
    target = torch.cat(flat_views)  # touched once
    for _ in range(repeats):
        started = time.perf_counter()
        fresh = torch.cat(flat_views)
        cat_s.append(time.perf_counter() - started)
        del fresh
        started = time.perf_counter()
        offset = 0
        for view in flat_views:
            target[offset : offset + view.numel()].copy_(view)
            offset += view.numel()
        copy_s.append(time.perf_counter() - started)
    return {"cat_s": cat_s, "copy_s": copy_s}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="bf16 model size to aim for (GB, 1e9 bytes)"
    )
    parser.add_argument("--bucket-mib", type=int, default=512, help="bucket size (MiB)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="exports (and baselines) to time; best is shown"
    )
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp

    from atropos_megatron.trainer.parallel import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, port, args, results)) for rank in range(2)]
    os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    by_rank = dict(results.get(timeout=1800) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    errors = {rank: r["error"] for rank, r in by_rank.items() if "error" in r}
    if errors:
        raise SystemExit("\n".join(f"rank {rank} failed:\n{e}" for rank, e in errors.items()))
    sender = by_rank[0]
    total = sender["exported_bytes"]

    def row(name: str, seconds: list[float] | float, note: str) -> str:
        best = min(seconds) if isinstance(seconds, list) else seconds
        return f"| {name} | {best:.2f} | {total / best / 1e9:.2f} | {note} |"

    print(
        f"\nLlama-shaped, {sender['num_layers']} layers, {total / 1e9:.2f} GB of bf16 HF tensors; TP=2 on gloo "
        f"(2 ranks, 1 thread each), {args.bucket_mib} MiB buckets; best of {args.repeats} "
        f"(wall {time.perf_counter() - started:.0f} s incl. start-up)\n"
    )
    print("| path | s | GB/s (of the model's bytes) | notes |")
    print("|---|---|---|---|")
    print(
        row(
            "export_hf_buckets (TP=2, gloo)",
            sender["export_s"],
            f"{sender['buckets']} buckets; runs: {', '.join(f'{s:.2f}' for s in sender['export_s'])} s",
        )
    )
    print(row("baseline: torch.cat into one fresh buffer", sender["cat_s"], "one process, same tensors"))
    print(row("baseline: copy_ into a touched buffer", sender["copy_s"], "memcpy ceiling"))
    half = by_rank[1]["local_param_bytes"]
    print(
        f"| reference: one gloo gather of TP shards | {sender['gather_s']:.2f} | "
        f"{half / sender['gather_s'] / 1e9:.2f} (of the {half / 1e9:.2f} GB moved) | one flat message |"
    )
    print(
        f"\nsender's extra peak RSS during the export: {sender['extra_peak_bytes'] / 2**20:.0f} MiB "
        f"(bucket {args.bucket_mib} MiB; model shard {sender['local_param_bytes'] / 2**20:.0f} MiB)"
    )
    import megatron.core

    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": {"torch": torch.__version__, "megatron-core": megatron.core.__version__},
        "args": vars(args),
        "ranks": by_rank,
    }
    (out / "weight_export.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
