"""Tokens/s of one GRPO step: the Megatron trainer against plain HF transformers + torch, same model and batch.

Both sides start from one HF checkpoint (built here, random weights) and take one full GRPO step on the
same batch: recompute the old log-probs, PPO-clip token loss (token-mean, no KL), backward, clip,
AdamW. The baseline is ``benchmarks/hf_grpo_step.py`` (one padded forward over the whole batch, log-
softmax in fp32); ours is ``Trainer.train_on`` (token-budget packed micro-batches, fused vocab-
parallel loss, Megatron DDP + distributed optimizer) on one rank. The first step's losses must agree
(same maths), which the script checks before timing anything.

    .venv/bin/python benchmarks/bench_trainer_step.py                       # CPU, fp32, small model
    python benchmarks/bench_trainer_step.py --device cuda --dtype bf16 --hidden 2048 --layers 16 \\
        --heads 16 --kv-heads 4 --ffn 5632 --vocab 151936 --sequences 64     # GPU, with MFU

Tokens/s counts every token of the batch (prompt and completion) per wall second of the whole step.
Achieved GFLOP/s use the step's model FLOPs, ``8 x matmul parameters x tokens`` (forward of the
old-log-prob pass, forward + backward of the loss pass; attention scores left out), for both sides,
over the step time; ``fraction_of_matmul_peak`` divides them by this machine's own fp32/bf16 GEMM
throughput, measured in the same run (the best of a few 2048^3 matmuls): the physical limit here.
With ``grpo.old_logprobs: auto`` (the default) the trainer skips the old-log-prob forward (one update
per batch: the loss pass is pi_old), so it executes 6/8 of those FLOPs; ``--old-logprobs recompute``
makes it run the same passes as the baseline. MFU (GPU only) is the same model FLOPs over
``--peak-tflops`` (H200 dense bf16: 989). Writes benchmarks/out/bench_trainer_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.hf_grpo_step import GRPOBatch, hf_grpo_step, token_logprobs  # noqa: E402


def build_checkpoint(args, directory: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)


def make_batch(args, seed: int):
    """A bridge-style batch: groups of random prompts and completions (``tests.rollouts``)."""
    from tests.rollouts import synthetic_batch

    return synthetic_batch(
        seed,
        groups=args.sequences // args.group_size,
        group_size=args.group_size,
        vocab=args.vocab,
        prompt_lens=(args.prompt_len // 2, args.prompt_len + 1),
        completion_lens=(args.completion_len // 2, args.completion_len + 1),
    )


def hf_batch(batch, cfg, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same batch right-padded for the HF baseline: tokens, loss mask and advantages."""
    from atropos_megatron.data.batching import build_rollouts

    rollouts, _ = build_rollouts(batch, cfg.grpo)
    width = max(r.length for r in rollouts) + 1
    tokens = torch.zeros(len(rollouts), width, dtype=torch.int64)
    mask = torch.zeros(len(rollouts), width - 1)
    advantages = torch.zeros(len(rollouts), width - 1)
    for i, r in enumerate(rollouts):
        tokens[i, : r.length] = r.input_ids
        tokens[i, r.length] = r.labels[-1]
        mask[i, : r.length] = r.loss_mask.float()
        advantages[i, : r.length] = r.advantages
    return tokens.to(device), mask.to(device), advantages.to(device)


def run_baseline(args, hf_dir: Path, batches, cfg) -> tuple[list[float], float]:
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, eps=1e-8)
    times, first_loss = [], None
    for batch in batches:
        tokens, mask, advantages = hf_batch(batch, cfg, args.device)
        _sync(args.device)
        start = time.perf_counter()
        model.eval()
        with torch.no_grad():
            old = token_logprobs(model, tokens)
        metrics = hf_grpo_step(model, optimizer, GRPOBatch(tokens, mask, advantages, old), max_grad_norm=1.0)
        _sync(args.device)
        times.append(time.perf_counter() - start)
        first_loss = metrics["loss"] if first_loss is None else first_loss
    return times, first_loss


def run_megatron(args, hf_dir: Path, batches, run_dir: Path) -> tuple[list[float], float, object]:
    from atropos_megatron.trainer.loop import Trainer

    trainer = Trainer(trainer_config(args, hf_dir, run_dir))
    trainer.setup()
    times, first_loss = [], None
    for batch in batches:
        _sync(args.device)
        start = time.perf_counter()
        metrics = trainer.train_on(batch)
        _sync(args.device)
        times.append(time.perf_counter() - start)
        first_loss = metrics["grpo/loss"] if first_loss is None else first_loss
    return times, first_loss, trainer


def trainer_config(args, hf_dir: Path, run_dir: Path):
    from atropos_megatron.config import load_config

    return load_config(
        None,
        [
            f"model.hf_path={hf_dir}", f"model.dtype={args.dtype}", f"logging.run_dir={run_dir}",
            f"optimizer.lr={args.lr}", "optimizer.clip_grad=1.0", "grpo.clip_low=0.2", "grpo.clip_high=0.2",
            f"data.max_token_len={args.prompt_len + args.completion_len}",
            f"data.micro_batch_tokens={args.micro_batch_tokens}", f"grpo.kernel={args.kernel}",
            f"grpo.fused_linear={args.fused_linear}", f"grpo.old_logprobs={args.old_logprobs}",
        ],
    )  # fmt: skip


def matmul_parameters(args) -> int:
    """Weights that multiply every token: attention and MLP projections, and the output layer."""
    head_dim = args.hidden // args.heads
    qkv = args.hidden * (args.hidden + 2 * args.kv_heads * head_dim)
    layer = qkv + args.hidden * args.hidden + 3 * args.hidden * args.ffn  # SwiGLU: gate, up, down
    return args.layers * layer + args.vocab * args.hidden


def matmul_peak_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """This machine's GEMM throughput in ``dtype`` (best of ``repeats`` ``size``^3 matmuls)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sequences", type=int, default=32, help="sequences per batch")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=192)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument(
        "--fused-linear", choices=("auto", "always", "never"), default="auto",
        help="grpo.fused_linear for the trainer (always: loss and log-probs from hidden states in chunks)",
    )  # fmt: skip
    parser.add_argument("--kernel", default="auto", help="grpo.kernel for the trainer (auto, triton, torch)")
    parser.add_argument(
        "--old-logprobs", choices=("auto", "recompute"), default="auto",
        help="grpo.old_logprobs for the trainer (recompute: an old-log-prob forward, as the baseline runs)",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (GPU)")
    args = parser.parse_args(argv)

    from atropos_megatron.config import load_config

    batches = [make_batch(args, seed) for seed in range(args.steps + 1)]
    tokens = [int(b.seq_lens.sum()) + len(b.seq_lens) for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        build_checkpoint(args, hf_dir)
        cfg = load_config(None, [f"model.hf_path={hf_dir}"])
        baseline_times, baseline_loss = run_baseline(args, hf_dir, batches, cfg)
        ours_times, ours_loss, trainer = run_megatron(args, hf_dir, batches, Path(tmp) / "run")
        params = sum(p.numel() for chunk in trainer.state.chunks for p in chunk.parameters())
    if abs(ours_loss - baseline_loss) > 1e-3 * max(1.0, abs(baseline_loss)):
        print(
            f"error: first-step losses differ: trainer {ours_loss} vs baseline {baseline_loss}",
            file=sys.stderr,
        )
        return 1
    peak = matmul_peak_gflops(args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype, "parameters": params, "matmul_parameters": matmul_parameters(args),
        "tokens_per_step": statistics.median(tokens[1:]),
        "model_gflop_per_step": 8 * matmul_parameters(args) * statistics.median(tokens[1:]) / 1e9,
        "machine_matmul_gflops": peak, "trainer_old_logprobs": args.old_logprobs,
        "first_step_loss": {"trainer": ours_loss, "baseline": baseline_loss},
    }  # fmt: skip
    for name, times in (("hf_torch_baseline", baseline_times), ("megatron_trainer", ours_times)):
        step_s = statistics.median(times[1:])
        gflops = result["model_gflop_per_step"] / step_s
        entry = {
            "step_s": step_s, "tokens_per_s": result["tokens_per_step"] / step_s,
            "model_gflops": gflops, "fraction_of_matmul_peak": gflops / peak,
        }  # fmt: skip
        if args.device == "cuda":
            entry["mfu"] = 8 * params * result["tokens_per_step"] / step_s / (args.peak_tflops * 1e12)
        result[name] = entry
    result["speedup"] = (
        result["megatron_trainer"]["tokens_per_s"] / result["hf_torch_baseline"]["tokens_per_s"]
    )
    out = REPO / "benchmarks" / "out" / "bench_trainer_step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
