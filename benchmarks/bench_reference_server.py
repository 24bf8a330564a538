"""Reference SGLang-protocol server: generation throughput vs in-process ``transformers.generate``.

Builds a random Qwen2-shaped model (default ~22M parameters, vocab 32000, fp32), starts
``atropos-megatron serve`` on it as a subprocess, and measures generated tokens per second for:

- ``server n=1``: one ``/generate`` request;
- ``server n=16``: one request with ``n=16`` (one batch of 16 rows);
- ``server 16 concurrent``: 16 simultaneous ``n=1`` requests (batched together by the worker);

against the baseline, plain ``model.generate`` in this process on the same model and prompt (batch
1 and batch 16, sampling, same token counts). Every request samples exactly ``--new-tokens`` tokens
(``ignore_eos``). The server's cost over the baseline is HTTP + JSON + per-step Python (sampling,
stop checks, logprobs). Not a production number: use real SGLang for that.

    .venv/bin/python benchmarks/bench_reference_server.py
    .venv/bin/python benchmarks/bench_reference_server.py --device cuda --hidden 1024 --layers 12

Prints a table and writes benchmarks/out/reference_server.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_checkpoint(directory: Path, args: argparse.Namespace) -> int:
    """Save a random Qwen2-shaped model + word-level tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.hf_models import tiny_tokenizer

    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 192),
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory / "model")
    tiny_tokenizer(args.vocab).save_pretrained(directory / "tok")  # no config.json beside it: see tests
    return sum(p.numel() for p in model.parameters())


def time_server(
    url: str, prompt: list[int], new_tokens: int, *, n: int, concurrent: int, rounds: int
) -> float:
    import httpx

    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True, "n": n}}  # fmt: skip

    def one() -> int:
        out = httpx.post(url + "/generate", json=body, timeout=600).raise_for_status().json()
        samples = out if isinstance(out, list) else [out]
        return sum(s["meta_info"]["completion_tokens"] for s in samples)

    rates = []
    with ThreadPoolExecutor(concurrent) as pool:
        for round_ in range(rounds + 1):  # the first round warms up
            start = time.perf_counter()
            tokens = sum(pool.map(lambda _: one(), range(concurrent)))
            if round_:
                rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def time_baseline(
    model_dir: Path, prompt: list[int], new_tokens: int, *, batch: int, device: str, rounds: int
) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt] * batch, device=device)
    rates = []
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        if round_:
            rates.append((out.shape[1] - len(prompt)) * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=384, help="hidden size (default 384)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (median; +1 warm-up)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    from tests.reference_server import ReferenceServer

    work = Path(tempfile.mkdtemp(prefix="bench_reference_server_"))
    params = build_checkpoint(work, args)
    prompt = [(7 * i) % (args.vocab - 2) + 2 for i in range(args.prompt_tokens)]
    rows: dict[str, float] = {}
    with ReferenceServer(
        work / "model", tokenizer_path=work / "tok", device=args.device, max_batch=16
    ) as server:
        for name, n, concurrent in (
            ("server n=1", 1, 1),
            ("server n=16", 16, 1),
            ("server 16 concurrent", 1, 16),
        ):
            rows[name] = time_server(
                server.url, prompt, args.new_tokens, n=n, concurrent=concurrent, rounds=args.rounds
            )
    for batch in (1, 16):  # after the server exited: the baseline gets the machine to itself too
        rows[f"transformers generate, batch {batch}"] = time_baseline(
            work / "model", prompt, args.new_tokens, batch=batch, device=args.device, rounds=args.rounds
        )

    print(f"\nQwen2-shaped {params / 1e6:.1f}M params fp32 on {args.device}; prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, median of {args.rounds}\n")  # fmt: skip
    print("| path | tokens/s | vs transformers, same batch |")
    print("|---|---:|---:|")
    base = {1: rows["transformers generate, batch 1"], 16: rows["transformers generate, batch 16"]}
    for name, rate in rows.items():
        batch = 1 if name.endswith("n=1") or name.endswith("batch 1") else 16
        print(f"| {name} | {rate:.0f} | {rate / base[batch]:.2f} |")
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
              "device": args.device, "params": params, "args": vars(args), "tokens_per_s": rows}  # fmt: skip
    (out / "reference_server.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
