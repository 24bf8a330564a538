"""LoRA vs full fine-tuning of the Megatron trainer, same model and batches: memory, optimizer state, sync bytes.

Builds one random HF Qwen2 checkpoint (GQA, QKV bias, untied embeddings; defaults: hidden 512, 8
layers, FFN 1408, 8 heads / 2 kv, vocabulary 32000: 55M parameters), then trains it for ``--steps``
GRPO steps on the same synthetic batches twice, each configuration in its OWN fresh Python process so
that the process's peak RSS is that configuration's peak:

- **full fine-tuning** (the baseline): every weight trains, and the KL penalty (``grpo.kl_coef > 0``)
  makes the trainer build a frozen reference copy of the model;
- **LoRA** (``model.lora.rank``, default 16, alpha 2r, every projection): adapters on a frozen base; the
  optimizer holds only the adapters, and the KL reference is the base with the adapters off (no copy).

Per configuration it reports:

- peak RSS after the imports, after ``Trainer.setup()`` and after the steps (``VmHWM``: ``ru_maxrss``
  would carry the parent's peak over fork + exec, see ``_peak_rss``); on CPU it includes the Python,
  torch and Megatron overhead (the "after imports" row), the HF checkpoint load and the activations and
  logits of the step;
- parameters held by the actor and trained; the model weights, Megatron DDP's gradient buffers
  (``grad_data``), the optimizer state (every tensor in the Megatron optimizer's state plus its main
  params where they are not the model's own storage: fp32 main copies of bf16 weights) and the
  reference model, in bytes, each next to ``--dry-run``'s figure (``trainer.memory.estimate_memory``);
- the bytes one weight sync moves: ``merged`` = every HF tensor ``export_hf_tensors`` yields (W +
  scale·B·A: the whole model, as full fine-tuning sends), ``adapter`` = the PEFT-named adapter tensors
  alone, as ``weights.lora_sync: adapter`` sends them (``export_adapter_tensors``);
- the step time (median of the steps after the first). As a check that both runs start from the same
  model, the first step's mean entropy must agree and its KL to the reference must be 0 (B = 0: the
  adapted model is the base).

    .venv/bin/python benchmarks/bench_lora.py                        # CPU, fp32, ~2.5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_lora.py --rank 64 --layers 4 --steps 3 --json runs/lora.json

Prints a markdown table; writes the raw numbers, device, date and versions as JSON (``--json``,
default benchmarks/out/bench_lora.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 2**20
CONFIGS = ("full", "lora")


# ------------------------------------------------------------------------------------------------
# Shared: model, batches, config
# ------------------------------------------------------------------------------------------------


def build_checkpoint(args: argparse.Namespace, directory: Path) -> None:
    """A random fp32 Qwen2 (QKV bias, untied embeddings) saved as an HF checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)


def make_batch(args: argparse.Namespace, seed: int):
    """A bridge-style batch of random prompts and completions (``tests.rollouts``); same seed, same batch."""
    from tests.rollouts import synthetic_batch

    return synthetic_batch(
        seed,
        groups=args.sequences // args.group_size,
        group_size=args.group_size,
        vocab=args.vocab,
        prompt_lens=(args.prompt_len // 2, args.prompt_len + 1),
        completion_lens=(args.completion_len // 2, args.completion_len + 1),
    )


def trainer_config(args: argparse.Namespace, name: str, hf_dir: Path, run_dir: Path):
    from atropos_megatron.config import load_config

    overrides = [
        f"model.hf_path={hf_dir}", f"model.dtype={args.dtype}", f"logging.run_dir={run_dir}",
        f"optimizer.lr={args.lr}", "optimizer.clip_grad=1.0", f"grpo.kl_coef={args.kl_coef}",
        f"data.batch_size={args.sequences}", f"data.max_token_len={args.prompt_len + args.completion_len}",
        f"data.micro_batch_tokens={args.micro_batch_tokens}", f"seed={args.seed}",
    ]  # fmt: skip
    if name == "lora":
        overrides += [f"model.lora.rank={args.rank}", f"model.lora.alpha={args.alpha or 2 * args.rank}"]
    return load_config(None, overrides)


def estimate(args: argparse.Namespace, name: str, hf_dir: Path) -> dict:
    """``--dry-run``'s figures for one rank (pure arithmetic on the config)."""
    from atropos_megatron.trainer.memory import estimate_memory

    est = estimate_memory(trainer_config(args, name, hf_dir, Path("unused")), world_size=1)
    stage = est.peak
    return {
        "params": stage.params,
        "trained_params": stage.trained_params,
        "weights_bytes": stage.weights_bytes,
        "grads_bytes": stage.grads_bytes,
        "optimizer_bytes": stage.optimizer_bytes,
        "reference_bytes": stage.reference_bytes,
        "total_gpu_bytes": stage.total_bytes,
    }


# ------------------------------------------------------------------------------------------------
# One configuration, in its own process
# ------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    """A memory field of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """This process's peak resident set so far, bytes.

    ``VmHWM``, the high-water mark of this process image's memory. Not ``ru_maxrss``: Linux carries the
    parent's peak across fork + exec into it (``subprocess`` starts children with vfork), so every child
    of this benchmark would report at least the parent's peak. ``ru_maxrss`` only where there is no /proc.
    """
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int | None:
    """This process's resident set now (``VmRSS``), bytes."""
    return _status_bytes("VmRSS")


def _unique_bytes(tensors, exclude_storages: set[int] = frozenset()) -> int:
    """Bytes of ``tensors``, each (data pointer, size) once, leaving out views of ``exclude_storages``."""
    seen, total = set(), 0
    for t in tensors:
        if t.untyped_storage().data_ptr() in exclude_storages:
            continue
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def optimizer_bytes(optimizer, model_storages: set[int]) -> dict:
    """Every tensor in the Megatron optimizer's state (Adam's moments, steps) and its main params where
    they are not the model's own storage (fp32 copies of bf16/fp16 weights; an fp32 model's main params
    are views of its DDP parameter buffer and cost nothing)."""
    import torch

    inner = [
        getattr(o, "optimizer", o) for o in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
    ]
    state = [v for opt in inner for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    main = [p for opt in inner for group in opt.param_groups for p in group["params"]]
    state_bytes = _unique_bytes(state)
    main_bytes = _unique_bytes(main, model_storages)
    return {
        "state_bytes": state_bytes,
        "main_param_bytes": main_bytes,
        "total_bytes": state_bytes + main_bytes,
    }


def run_configuration(spec: dict) -> dict:
    """Set up the trainer, train the batches, measure; runs in a fresh process (``--child``)."""
    args = argparse.Namespace(**spec["args"])
    name, hf_dir, run_dir = spec["name"], Path(spec["hf_dir"]), Path(spec["run_dir"])
    import torch

    from atropos_megatron.trainer.loop import Trainer
    from atropos_megatron.weights.export import export_adapter_tensors, export_hf_tensors

    batches = [make_batch(args, seed) for seed in range(args.steps)]
    out: dict = {
        "threads": torch.get_num_threads(),
        "ru_maxrss_at_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out["peak_rss_after_imports"], out["rss_after_imports"] = _peak_rss(), _rss_now()

    started = time.perf_counter()
    trainer = Trainer(trainer_config(args, name, hf_dir, run_dir))
    trainer.setup()
    out["setup_s"] = time.perf_counter() - started
    out["peak_rss_after_setup"], out["rss_after_setup"] = _peak_rss(), _rss_now()

    step_s, metrics = [], []
    for batch in batches:
        started = time.perf_counter()
        m = trainer.train_on(batch)
        step_s.append(time.perf_counter() - started)
        metrics.append({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
    out["peak_rss_after_steps"], out["rss_after_steps"] = _peak_rss(), _rss_now()
    out["step_s"] = step_s
    out["metrics"] = metrics
    out["tokens_per_step"] = [int(b.seq_lens.sum()) + len(b.seq_lens) for b in batches]

    chunks = trainer.state.chunks
    params = {id(p): p for chunk in chunks for p in chunk.parameters()}.values()
    out["params"] = sum(p.numel() for p in params)
    out["trained_params"] = sum(p.numel() for p in params if p.requires_grad)
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in params)
    buffers = [b for chunk in chunks for b in (*chunk.buffers, *chunk.expert_parallel_buffers)]
    out["grad_buffer_bytes"] = sum(b.grad_data.nbytes for b in buffers)
    model_storages = {p.untyped_storage().data_ptr() for p in params}
    model_storages |= {b.param_data.untyped_storage().data_ptr() for b in buffers if b.param_data is not None}
    model_storages |= {b.grad_data.untyped_storage().data_ptr() for b in buffers}
    out["optimizer"] = optimizer_bytes(trainer.state.optimizer, model_storages)
    reference = trainer.reference or []
    out["reference_bytes"] = sum(
        p.numel() * p.element_size() for chunk in reference for p in chunk.parameters()
    )

    # What one weight sync moves: the merged HF tensors (always), and the adapters alone (LoRA).
    merged = [(n, t.nbytes, tuple(t.shape)) for n, t in export_hf_tensors(chunks, trainer.model)]
    out["sync_merged_bytes"] = sum(nbytes for _, nbytes, _ in merged)
    out["sync_merged_tensors"] = len(merged)
    if trainer.lora:
        adapters = [t.nbytes for _, t in export_adapter_tensors(chunks, trainer.model.lora)]
        out["sync_adapter_bytes"] = sum(adapters)
        out["sync_adapter_tensors"] = len(adapters)
    else:
        out["sync_adapter_bytes"] = out["sync_adapter_tensors"] = None
    out["peak_rss_after_export"], out["rss_after_export"] = _peak_rss(), _rss_now()
    return out


def _jsonable(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def spawn_configuration(args: argparse.Namespace, name: str, hf_dir: Path, tmp: Path) -> dict:
    """Run one configuration in a fresh Python process; its result as a dict."""
    spec = {"args": _jsonable(args), "name": name, "hf_dir": str(hf_dir), "run_dir": str(tmp / f"run-{name}")}
    spec_path, result_path, log_path = (
        tmp / f"{name}.{suffix}" for suffix in ("spec.json", "result.json", "log")
    )
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path), str(result_path)]
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"{name}: the child process failed (status {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _ratio(lora: float | None, full: float | None) -> str:
    return "-" if not lora or not full else f"{lora / full:.3f}"


def format_table(result: dict) -> str:
    full, lora = result["runs"]["full"], result["runs"]["lora"]
    est_full, est_lora = result["estimate"]["full"], result["estimate"]["lora"]
    steps = result["args"]["steps"]

    def measured_vs_estimate(est: dict, key: str, measured: int) -> str:
        return f"{_mib(measured)} (est. {_mib(est[key])})"

    def row(label: str, a: str, b: str, ratio: str = "") -> str:
        return f"| {label} | {a} | {b} | {ratio} |"

    rank = result["args"]["rank"]
    lines = [
        f"| | full fine-tuning (baseline) | LoRA r={rank}, all projections | LoRA / full |",
        "|---|---:|---:|---:|",
        row("parameters held (actor)", _count(full["params"]), _count(lora["params"]),
            _ratio(lora["params"], full["params"])),
        row("parameters trained", _count(full["trained_params"]),
            f"{_count(lora['trained_params'])} ({lora['trained_params'] / lora['params']:.2%})",
            _ratio(lora["trained_params"], full["trained_params"])),
        row("model weights, measured (est.)", measured_vs_estimate(est_full, "weights_bytes", full["weights_bytes"]),
            measured_vs_estimate(est_lora, "weights_bytes", lora["weights_bytes"]),
            _ratio(lora["weights_bytes"], full["weights_bytes"])),
        row("gradient buffers (DDP `grad_data`), measured (est.)",
            measured_vs_estimate(est_full, "grads_bytes", full["grad_buffer_bytes"]),
            measured_vs_estimate(est_lora, "grads_bytes", lora["grad_buffer_bytes"]),
            _ratio(lora["grad_buffer_bytes"], full["grad_buffer_bytes"])),
        row("optimizer state (+ main params), measured (est.)",
            measured_vs_estimate(est_full, "optimizer_bytes", full["optimizer"]["total_bytes"]),
            measured_vs_estimate(est_lora, "optimizer_bytes", lora["optimizer"]["total_bytes"]),
            _ratio(lora["optimizer"]["total_bytes"], full["optimizer"]["total_bytes"])),
        row("KL reference model, measured (est.)",
            f"{_mib(full['reference_bytes'])} (est. {_mib(est_full['reference_bytes'])}): a copy",
            f"{_mib(lora['reference_bytes'])} (est. {_mib(est_lora['reference_bytes'])}): base, adapters off",
            _ratio(lora["reference_bytes"], full["reference_bytes"])),
        row("peak RSS after imports (Python, torch, Megatron)", _mib(full["peak_rss_after_imports"]),
            _mib(lora["peak_rss_after_imports"])),
        row("**peak RSS after `setup()`**", _mib(full["peak_rss_after_setup"]), _mib(lora["peak_rss_after_setup"]),
            _ratio(lora["peak_rss_after_setup"], full["peak_rss_after_setup"])),
        row(f"**peak RSS after {steps} steps**", _mib(full["peak_rss_after_steps"]), _mib(lora["peak_rss_after_steps"]),
            _ratio(lora["peak_rss_after_steps"], full["peak_rss_after_steps"])),
        row(f"weight sync, merged (what is sent: {full['sync_merged_tensors']} HF tensors)",
            _mib(full["sync_merged_bytes"]), _mib(lora["sync_merged_bytes"]),
            _ratio(lora["sync_merged_bytes"], full["sync_merged_bytes"])),
        row(f"weight sync, adapters only ({lora['sync_adapter_tensors']} PEFT tensors, weights.lora_sync: adapter)",
            "-", _mib(lora["sync_adapter_bytes"]), _ratio(lora["sync_adapter_bytes"], full["sync_merged_bytes"])),
        row(f"step time (median of steps 2-{steps})", f"{statistics.median(full['step_s'][1:]):.2f} s",
            f"{statistics.median(lora['step_s'][1:]):.2f} s",
            _ratio(statistics.median(lora["step_s"][1:]), statistics.median(full["step_s"][1:]))),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one configuration, in this fresh process
        spec_path, result_path = argv[1:3]
        result = run_configuration(json.loads(Path(spec_path).read_text()))
        Path(result_path).write_text(json.dumps(result))
        return 0

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (all seven projections)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model dtype (CPU: fp32)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sequences", type=int, default=8, help="sequences per batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt (shortest: half)")
    parser.add_argument("--completion-len", type=int, default=96, help="longest completion (shortest: half)")
    parser.add_argument("--micro-batch-tokens", type=int, default=512)
    parser.add_argument(
        "--kl-coef", type=float, default=0.05, help="grpo.kl_coef (> 0: full FT builds a reference)"
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--steps", type=int, default=4, help="GRPO steps per configuration (timing: all but the first)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "bench_lora.json")
    args = parser.parse_args(argv)
    if args.kl_coef <= 0:
        parser.error("--kl-coef must be > 0: the comparison includes full fine-tuning's reference copy")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")

    import megatron.core
    import torch
    import transformers

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        hf_dir = tmp / "hf"
        build_checkpoint(args, hf_dir)
        estimates = {name: estimate(args, name, hf_dir) for name in CONFIGS}
        runs = {}
        for name in CONFIGS:
            print(f"running {name} in a fresh process ...", file=sys.stderr, flush=True)
            runs[name] = spawn_configuration(args, name, hf_dir, tmp)
    args_record = {**_jsonable(args), "alpha": args.alpha or 2 * args.rank}
    result = {
        "benchmark": "bench_lora",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {runs['full']['threads']} torch threads)",
        "versions": {
            "torch": torch.__version__,
            "megatron-core": megatron.core.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "load_avg_1min": os.getloadavg()[0],
        "args": args_record,
        "estimate": estimates,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
    }
    # B = 0: at the first step the LoRA model is the base, so a model-dependent figure must agree.
    first = {name: runs[name]["metrics"][0] for name in CONFIGS}
    result["first_step"] = {
        name: {k: first[name].get(k) for k in ("grpo/entropy", "grpo/kl_ref", "grpo/loss")}
        for name in CONFIGS
    }
    # What the held tensors predict for full - LoRA, against the measured peak RSS difference.
    full, lora = runs["full"], runs["lora"]
    result["accounted_difference_bytes"] = sum(
        full[key] - lora[key] for key in ("weights_bytes", "grad_buffer_bytes", "reference_bytes")
    ) + (full["optimizer"]["total_bytes"] - lora["optimizer"]["total_bytes"])
    result["measured_difference_bytes"] = {
        phase: full[f"peak_rss_after_{phase}"] - lora[f"peak_rss_after_{phase}"]
        for phase in ("setup", "steps")
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nQwen2-shaped, {_count(full['params'])} parameters (hidden {args.hidden}, {args.layers} layers, "
        f"FFN {args.ffn}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}), {args.dtype}; "
        f"{args.sequences} sequences/batch (~{statistics.median(full['tokens_per_step']):.0f} tokens), "
        f"grpo.kl_coef={args.kl_coef}, {args.steps} steps per configuration, each in its own process; "
        f"{result['device']}; wall {result['wall_s']:.0f} s\n"
    )
    print(format_table(result))
    measured = result["measured_difference_bytes"]
    print(
        f"\nfull - LoRA: weights + grads + optimizer + reference {_mib(result['accounted_difference_bytes'])}; "
        f"peak RSS {_mib(measured['setup'])} after setup, {_mib(measured['steps'])} after the steps"
    )
    entropy = {name: first[name].get("grpo/entropy") for name in CONFIGS}
    kl = {name: first[name].get("grpo/kl_ref") for name in CONFIGS}
    print(
        f"first step (same model: B = 0): entropy {entropy}, KL to the reference {kl}; raw numbers: {args.json}"
    )
    if None in entropy.values() or abs(entropy["full"] - entropy["lora"]) > 1e-4 * abs(entropy["full"]):
        print(
            "error: the first step's entropies differ: the two runs did not start from the same model",
            file=sys.stderr,
        )
        return 1
    if any(abs(value or 0.0) > 1e-6 for value in kl.values()):
        print("error: the first step's KL to the reference is not 0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
