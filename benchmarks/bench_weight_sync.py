"""Weight sync: the bridge's gRPC weight stream vs raw gRPC, and pushes per transport vs an in-process copy.

Two parts in one run, each beside a baseline measured in the same run on the same bytes.

Part 1, stream throughput (goal of the bridge: >= 70% of a raw gRPC bytes stream on loopback).
``--size-gb`` of bf16 tensors, packed by ``pack_buckets`` into ``--bucket-mib`` buckets, go

- ``bridge``: through ``BridgeClient.open_weight_push(transport="grpc")`` to an in-process bridge
  (``mode=agent``) with *no* inference servers: what is measured is the client's queue and protobuf
  messages, the stream, and the bridge assembling each bucket in shared memory;
- ``raw`` (baseline): through a minimal client-streaming gRPC method defined here (generic handler,
  identity serializers: the messages are the bytes), whose server only sums the chunks' lengths.

Both cut the buckets into the same 4 MiB chunks (``bytes`` slices of the same buffers), run client
and server in this process, and use the same server thread pool and max-message options. Runs
alternate raw / bridge; the median of ``--stream-runs`` is shown, with every run.

Part 2, export + sync to a real inference server, per transport. A random Qwen2-shaped bf16
checkpoint (Qwen2-1.5B widths: hidden 1536, FFN 8960, 12 heads, 2 KV heads; vocabulary 32000, tied;
layers chosen to reach ``--size-gb``) is served by one reference server (``atropos-megatron serve
--dtype bf16``, a subprocess). Its HF state dict goes through ``pack_buckets`` into ``WeightPusher.send``
for each transport (``grpc``, ``distributed`` on gloo, ``disk`` to a temp dir), timed end to end: from
packing the first bucket to the bridge's answer, the server updated. After each push ``GET
/model_info`` must report the new weight_version. Baselines, same run: a plain in-process copy of the
same tensors (``copy_`` into a preallocated, already touched buffer; ``torch.cat`` into a fresh one).
Also shown: packing alone (the copy every transport starts with) and the server's own apply time
(its log), to see where the time goes. The first ``distributed`` push also creates the process group.

    .venv/bin/python benchmarks/bench_weight_sync.py                  # ~1 GB, 512 MiB buckets
    .venv/bin/python benchmarks/bench_weight_sync.py --size-gb 2 --sync-runs 3

Prints markdown tables and writes benchmarks/out/weight_sync.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.hf_models, tests.reference_server

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # BridgeConfig's and BridgeClient's default, used on both paths
SERVER_WORKERS = 16  # the bridge server's thread pool (bridge/server.py)
RAW_METHOD = "/bench.RawStream/Push"
STREAM_TENSOR_BYTES = 32 * 2**20  # part 1: tensors of 32 MiB
QWEN2 = dict(hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=32000)
TRANSPORTS = ("grpc", "distributed", "disk")
SERVER_APPLY = re.compile(r"weights updated from \w+: .* in ([\d.]+) s")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _chunks(buckets, chunk_bytes: int):
    """The buckets' bytes as ``bytes`` slices of ``chunk_bytes`` (what ``send_bucket`` does with a buffer)."""
    for bucket in buckets:
        view = memoryview(bucket.data.numpy())
        for start in range(0, len(view), chunk_bytes):
            yield bytes(view[start : start + chunk_bytes])


# -- part 1: stream throughput ------------------------------------------------------------------


def _grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def start_raw_server():
    """A gRPC server with one client-streaming method taking raw bytes; answers the byte count."""
    import grpc

    def push(chunks, context) -> bytes:
        return str(sum(len(chunk) for chunk in chunks)).encode()

    handler = grpc.method_handlers_generic_handler(
        "bench.RawStream",
        {"Push": grpc.stream_unary_rpc_method_handler(push)},  # no (de)serializers
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS), options=_grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def time_raw(channel, buckets, chunk_bytes: int) -> float:
    push = channel.stream_unary(RAW_METHOD)  # identity: requests and response are bytes
    started = time.perf_counter()
    received = int(push(_chunks(buckets, chunk_bytes), timeout=600))
    seconds = time.perf_counter() - started
    assert received == sum(b.nbytes for b in buckets), (received, "bytes received by the raw server")
    return seconds


def time_bridge(client, buckets, version: str) -> float:
    started = time.perf_counter()
    stream = client.open_weight_push(version, transport="grpc")
    for bucket in buckets:  # as WeightPusher._push_grpc sends them
        specs = [(t.name, str(t.dtype).removeprefix("torch."), t.shape) for t in bucket.tensors]
        stream.send_bucket(bucket.index, specs, memoryview(bucket.data.numpy()))
    response = stream.finish()
    seconds = time.perf_counter() - started
    assert response.bytes == sum(b.nbytes for b in buckets), (response.bytes, "bytes the bridge took")
    return seconds


def stream_buckets(size_gb: float, bucket_bytes: int) -> list:
    import torch

    from atropos_megatron.weights.export import pack_buckets

    count = max(1, round(size_gb * 1e9 / STREAM_TENSOR_BYTES))
    named = ((f"w{i}", torch.randn(STREAM_TENSOR_BYTES // 2, dtype=torch.bfloat16)) for i in range(count))
    return list(pack_buckets(named, bucket_bytes=bucket_bytes))


def measure_stream(args: argparse.Namespace) -> dict:
    """Part 1: alternating raw / bridge pushes of the same buckets; seconds of each run."""
    import grpc

    from atropos_megatron.bridge.client import CHUNK_BYTES, BridgeClient
    from atropos_megatron.bridge.server import build_service, create_server
    from atropos_megatron.config import BridgeConfig, WeightsConfig

    buckets = stream_buckets(args.size_gb, args.bucket_mib * 2**20)
    cfg = BridgeConfig(mode="agent", max_message_bytes=MAX_MESSAGE_BYTES, request_timeout_s=600)
    service = build_service(cfg, WeightsConfig(health_interval_s=0))
    bridge_server, bridge_port = create_server(cfg, service, "127.0.0.1:0")
    raw_server, raw_port = start_raw_server()
    client = BridgeClient(f"127.0.0.1:{bridge_port}", timeout_s=600, max_message_bytes=MAX_MESSAGE_BYTES)
    channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=_grpc_options())
    times: dict[str, list[float]] = {"raw": [], "bridge": []}
    try:
        time_raw(channel, buckets[:1], CHUNK_BYTES)  # warm-up: connect, first allocations
        time_bridge(client, buckets[:1], "warm-up")
        for run in range(args.stream_runs):
            times["raw"].append(time_raw(channel, buckets, CHUNK_BYTES))
            times["bridge"].append(time_bridge(client, buckets, f"stream-{run}"))
    finally:
        channel.close()
        client.close()
        raw_server.stop(0).wait()
        bridge_server.stop(0).wait()
        service.weights.stop()
    return {
        "bytes": sum(b.nbytes for b in buckets),
        "buckets": len(buckets),
        "chunk_bytes": CHUNK_BYTES,
        "seconds": times,
    }


# -- part 2: export + sync per transport --------------------------------------------------------


def layers_for(size_gb: float) -> int:
    """Decoder layers that bring the bf16 Qwen2-shaped model closest to ``size_gb`` (at least 1)."""
    h, ffn, vocab = QWEN2["hidden"], QWEN2["ffn"], QWEN2["vocab"]
    kv = h // QWEN2["heads"] * QWEN2["kv_heads"]
    per_layer = 2 * h * h + 2 * kv * h + (h + 2 * kv) + 3 * h * ffn + 2 * h
    fixed = vocab * h + h  # tied embedding + final norm
    return max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))


def build_checkpoint(directory: Path, size_gb: float):
    """Save a random bf16 Qwen2-shaped checkpoint (+ a word-level tokenizer); returns its HF tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.hf_models import hf_state, tiny_tokenizer

    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=QWEN2["hidden"],
        intermediate_size=QWEN2["ffn"],
        num_hidden_layers=layers_for(size_gb),
        num_attention_heads=QWEN2["heads"],
        num_key_value_heads=QWEN2["kv_heads"],
        vocab_size=QWEN2["vocab"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory / "model")
    tiny_tokenizer(QWEN2["vocab"]).save_pretrained(directory / "tok")  # beside no config.json
    state = {name: tensor.detach() for name, tensor in hf_state(model).items()}
    return state, config.num_hidden_layers


def copy_baselines(state: dict, runs: int) -> dict:
    """Seconds of ``copy_`` of every tensor into a touched flat buffer and of ``torch.cat`` into a fresh one."""
    import torch

    views = [t.reshape(-1).view(torch.uint8) for t in state.values()]
    target = torch.cat(views)  # touched once
    times: dict[str, list[float]] = {"copy_": [], "cat": []}
    for _ in range(runs):
        started = time.perf_counter()
        offset = 0
        for view in views:
            target[offset : offset + view.numel()].copy_(view)
            offset += view.numel()
        times["copy_"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fresh = torch.cat(views)
        times["cat"].append(time.perf_counter() - started)
        del fresh
    return times


def time_packing(state: dict, bucket_bytes: int, runs: int) -> list[float]:
    """Seconds of ``pack_buckets`` alone (each bucket dropped): the copy every transport starts with."""
    from atropos_megatron.weights.export import pack_buckets

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for bucket in pack_buckets(state.items(), bucket_bytes=bucket_bytes):
            del bucket
        times.append(time.perf_counter() - started)
    return times


def served_version(url: str) -> str:
    import httpx

    return httpx.get(url + "/model_info", timeout=30).raise_for_status().json()["weight_version"]


def server_apply_seconds(log: str) -> float:
    """The server's own update time (receive/map + copy into the model, summed over its update calls),
    from the lines of its log (``log``: what it printed during one push)."""
    return sum(float(seconds) for seconds in SERVER_APPLY.findall(log))


def time_push(pusher, state: dict, bucket_bytes: int, version: str, server) -> dict:
    """One end-to-end push (pack -> bridge -> server updated), checked on the server."""
    from atropos_megatron.weights.export import pack_buckets

    log_offset = len(server.output())
    started = time.perf_counter()
    response = pusher.send(pack_buckets(state.items(), bucket_bytes=bucket_bytes), weight_version=version)
    seconds = time.perf_counter() - started
    if not all(s.updated and s.weight_version == version for s in response.servers):
        raise RuntimeError(f"push {version} did not update the server: {response}")
    if served_version(server.url) != version:
        raise RuntimeError(f"/model_info does not report weight_version {version!r} after the push")
    return {
        "seconds": seconds,
        "bridge_seconds": response.seconds,  # header arrival -> servers versioned, on the bridge
        "server_apply_seconds": server_apply_seconds(server.output()[log_offset:]),
    }


def measure_sync(args: argparse.Namespace, work: Path) -> dict:
    """Part 2: every transport, ``--sync-runs`` times each (rounds alternate transports), + baselines."""
    from atropos_megatron.bridge.client import BridgeClient
    from atropos_megatron.bridge.server import build_service, create_server
    from atropos_megatron.config import BridgeConfig, ModelConfig, WeightsConfig
    from atropos_megatron.weights.transfer import WeightPusher
    from tests.reference_server import ReferenceServer

    bucket_bytes = args.bucket_mib * 2**20
    started = time.perf_counter()
    state, layers = build_checkpoint(work, args.size_gb)
    build_s = time.perf_counter() - started
    total = sum(t.numel() * t.element_size() for t in state.values())
    baselines = copy_baselines(state, args.sync_runs)
    baselines["pack_buckets"] = time_packing(state, bucket_bytes, args.sync_runs)

    server = ReferenceServer(
        work / "model", tokenizer_path=work / "tok", dtype="bf16", weight_version="initial",
        startup_timeout_s=600,
    )  # fmt: skip
    pushes: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    bridge = client = service = None
    pushers: dict[str, WeightPusher] = {}
    try:
        started = time.perf_counter()
        server.start()
        start_s = time.perf_counter() - started
        weights = dict(inference_servers=[server.url], bucket_bytes=bucket_bytes, health_interval_s=0,
                       disk_dir=str(work / "pushed"), request_timeout_s=600)  # fmt: skip
        cfg = BridgeConfig(mode="agent", request_timeout_s=600)
        service = build_service(cfg, WeightsConfig(**weights))
        bridge, port = create_server(cfg, service, "127.0.0.1:0")
        client = BridgeClient(f"127.0.0.1:{port}", timeout_s=600)
        for transport in TRANSPORTS:
            pushers[transport] = WeightPusher(
                WeightsConfig(**weights, transport=transport), ModelConfig(), client
            )
        for run in range(args.sync_runs):
            for transport in TRANSPORTS:
                version = f"{transport}-{run}"
                pushes[transport].append(time_push(pushers[transport], state, bucket_bytes, version, server))
    finally:
        for pusher in pushers.values():
            pusher.close()
        if client is not None:
            client.close()
        if bridge is not None:
            bridge.stop(0).wait()
        if service is not None:
            service.weights.stop()
        server.close()
    return {
        "bytes": total,
        "tensors": len(state),
        "num_layers": layers,
        "build_checkpoint_s": build_s,
        "server_start_s": start_s,
        "baselines": baselines,
        "pushes": pushes,
    }


# -- report -------------------------------------------------------------------------------------


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


def print_stream(stream: dict, args: argparse.Namespace) -> None:
    total, raw = stream["bytes"], _median(stream["seconds"]["raw"])
    print(f"\n### Part 1: weight stream over gRPC, {total / 1e9:.2f} GB bf16 in {stream['buckets']} buckets "
          f"of {args.bucket_mib} MiB, {stream['chunk_bytes'] // 2**20} MiB messages, loopback, one process; "
          f"median of {args.stream_runs}\n")  # fmt: skip
    print("| path | median s | GB/s | vs raw gRPC | runs (s) |")
    print("|---|---:|---:|---:|---|")
    names = {"raw": "baseline: raw gRPC bytes stream (sum of lengths)",
             "bridge": "BridgeClient.open_weight_push(grpc) -> bridge, no servers (shm buckets)"}  # fmt: skip
    for key, name in names.items():
        seconds = stream["seconds"][key]
        median = _median(seconds)
        print(
            f"| {name} | {median:.2f} | {total / median / 1e9:.2f} | {raw / median:.2f} | {_runs(seconds)} |"
        )


def print_sync(sync: dict, args: argparse.Namespace) -> None:
    total, copy = sync["bytes"], _median(sync["baselines"]["copy_"])
    print(f"\n### Part 2: export + sync to one reference server, Qwen2-shaped {sync['num_layers']} layers, "
          f"{total / 1e9:.2f} GB bf16 ({sync['tensors']} tensors), {args.bucket_mib} MiB buckets; "
          f"median of {args.sync_runs}\n")  # fmt: skip
    print("| path | median s | GB/s | x copy_ time | bridge s | server apply s | runs (s) |")
    print("|---|---:|---:|---:|---:|---:|---|")

    def row(name: str, seconds: list[float], bridge: str = "", apply: str = "") -> None:
        median = _median(seconds)
        print(f"| {name} | {median:.2f} | {total / median / 1e9:.2f} | {median / copy:.1f} | {bridge} | "
              f"{apply} | {_runs(seconds)} |")  # fmt: skip

    row("baseline: copy_ into a touched buffer", sync["baselines"]["copy_"])
    row("baseline: torch.cat into a fresh buffer", sync["baselines"]["cat"])
    row("pack_buckets alone (buckets dropped)", sync["baselines"]["pack_buckets"])
    for transport, pushes in sync["pushes"].items():
        bridge = _median([p["bridge_seconds"] for p in pushes])
        apply = _median([p["server_apply_seconds"] for p in pushes])
        row(
            f"WeightPusher.send, {transport}", [p["seconds"] for p in pushes], f"{bridge:.2f}", f"{apply:.2f}"
        )
    print(f"\n(checkpoint built + saved in {sync['build_checkpoint_s']:.1f} s; server started in "
          f"{sync['server_start_s']:.1f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="bytes pushed in each part (GB, 1e9 bytes; default 1.0)"
    )
    parser.add_argument("--bucket-mib", type=int, default=512, help="bucket size (MiB; default 512)")
    parser.add_argument("--stream-runs", type=int, default=3, help="part 1 runs of each path (median)")
    parser.add_argument("--sync-runs", type=int, default=3, help="part 2 pushes per transport (median)")
    parser.add_argument("--skip-stream", action="store_true", help="run part 2 only")
    parser.add_argument("--skip-sync", action="store_true", help="run part 1 only")
    args = parser.parse_args()

    import grpc
    import torch

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    try:
        stream = None if args.skip_stream else measure_stream(args)
        sync = None if args.skip_sync else measure_sync(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{machine}, torch {torch.__version__}, grpcio {grpc.__version__}; wall {wall:.0f} s")
    if stream:
        print_stream(stream, args)
    if sync:
        print_sync(sync, args)
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "versions": {"torch": torch.__version__, "grpcio": grpc.__version__},
        "args": vars(args),
        "wall_s": wall,
        "stream": stream,
        "sync": sync,
    }
    (out / "weight_sync.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
