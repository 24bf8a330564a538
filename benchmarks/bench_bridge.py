"""One large batch through Atropos -> bridge -> trainer client, against reading Atropos's /batch directly.

Starts the real Atropos API (``run-api``) and a bridge on loopback, posts ``--sequences`` sequences of
``--tokens`` tokens (groups of 8, with masks and inference log-probs, as environments send them), then
times, in the same run, from the environment's POST until the trainer holds the batch:

- ``direct``: POST, then the trainer's own ``GET /batch`` + JSON decoding (the baseline);
- ``bridge``: POST, then ``BridgeClient.next_batch()`` (the bridge polls ``/batch``, validates, shifts
  labels, writes the spool, sends over gRPC; the trainer decodes numpy arrays).

Both include the same POST, so the ratio understates per-hop costs; the absolute difference is the
bridge's added latency.

    .venv/bin/python benchmarks/bench_bridge.py                       # 1024 x 2048 tokens, 3 rounds

Prints a table and writes benchmarks/out/bridge.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
GROUP = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_api(port: int) -> subprocess.Popen:
    run_api = Path(sys.executable).parent / "run-api"
    proc = subprocess.Popen(
        [str(run_api), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("run-api did not start")


def _groups(sequences: int, tokens: int, seed: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = tokens // 4
    groups = []
    for _ in range(sequences // GROUP):
        ids = rng.integers(0, 32000, size=(GROUP, tokens)).tolist()
        masks = [[-100] * prompt + row[prompt:] for row in ids]
        logprobs = [[1.0] * prompt + (-rng.random(tokens - prompt)).tolist() for _ in range(GROUP)]
        groups.append({"tokens": ids, "masks": masks, "scores": rng.random(GROUP).tolist(),
                       "inference_logprobs": logprobs})  # fmt: skip
    return groups


def _post(url: str, groups: list[dict]) -> None:
    body = json.dumps(groups)
    httpx.post(f"{url}/scored_data_list", content=body, headers={"content-type": "application/json"},
               timeout=600).raise_for_status()  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from atropos_megatron.bridge.client import BridgeClient
    from atropos_megatron.bridge.server import build_service, create_server
    from atropos_megatron.config import BridgeConfig

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    api = _start_api(port)
    spool = Path(tempfile.mkdtemp(prefix="bench_bridge_"))
    times: dict[str, list[float]] = {"direct": [], "bridge": []}
    try:
        # Baseline first: the trainer registers and reads /batch itself.
        registration = dict(wandb_group="b", wandb_project="b", batch_size=args.sequences,
                            max_token_len=args.tokens + 1, checkpoint_dir="", save_checkpoint_interval=0,
                            starting_step=0, num_steps=1000)  # fmt: skip
        httpx.post(f"{url}/register", json=registration, timeout=30).raise_for_status()
        for round_ in range(args.rounds):
            groups = _groups(args.sequences, args.tokens, seed=round_)
            started = time.perf_counter()
            _post(url, groups)
            batch = httpx.get(f"{url}/batch", timeout=600).json()["batch"]
            times["direct"].append(time.perf_counter() - started)
            assert batch is not None and sum(len(g["tokens"]) for g in batch) == args.sequences
        # Then through the bridge (poll every 10 ms so that polling does not dominate).
        cfg = BridgeConfig(atropos_url=url, spool_dir=str(spool), poll_interval_s=0.01, poll_max_interval_s=0.01,
                           max_message_bytes=1024**3)  # fmt: skip
        service = build_service(cfg)
        server, bridge_port = create_server(cfg, service, "127.0.0.1:0")
        client = BridgeClient(f"127.0.0.1:{bridge_port}", max_message_bytes=1024**3, timeout_s=600)
        client.register_run(run_name="bench", batch_size=args.sequences, max_token_len=args.tokens + 1,
                            starting_step=0, num_steps=1000, vocab_size=32000)  # fmt: skip
        for round_ in range(args.rounds):
            groups = _groups(args.sequences, args.tokens, seed=100 + round_)
            started = time.perf_counter()
            _post(url, groups)
            batch = client.next_batch(wait_s=600)
            times["bridge"].append(time.perf_counter() - started)
            assert batch is not None and batch.num_sequences == args.sequences
            client.ack(batch.batch_id)
        client.close()
        server.stop(0)
        service.pipeline.stop()
    finally:
        api.kill()
        shutil.rmtree(spool, ignore_errors=True)

    direct, bridge = statistics.median(times["direct"]), statistics.median(times["bridge"])
    print(f"\n{args.sequences} sequences x {args.tokens} tokens, median of {args.rounds}\n")
    print("| path (POST -> batch in the trainer) | median s | vs direct |")
    print("|---|---|---|")
    print(f"| direct: trainer GETs /batch + json | {direct:.2f} | 1.00 |")
    print(f"| Atropos -> bridge -> BridgeClient | {bridge:.2f} | {bridge / direct:.2f} |")
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "sequences": args.sequences, "tokens": args.tokens, "times": times}  # fmt: skip
    (out / "bridge.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
