"""GRPO with plain HF transformers + torch: the demo task's learnability check and the trainer's baseline.

Two uses:

- ``hf_grpo_step(model, optimizer, batch)`` is one GRPO optimizer step on a prepared batch (token ids,
  loss mask, per-token advantages, old log-probs): PPO-clip token loss, token-mean aggregation, grad
  clip, optimizer step. No Megatron, no fused kernels, nothing of ours: the named baseline that the
  Megatron trainer is measured against on the same model and the same batch.
- Run as a script, it trains the demo's tiny Qwen2 (``atropos_megatron.demo.assets``) on the demo
  task directly, with no servers: sample a group per prompt, score, group-normalise, one step, and
  print the reward per step. It is how the task and its hyper-parameters were chosen: a random
  model must gain >= 0.4 mean reward within ~40 steps, or the end-to-end demo cannot show learning.

    .venv/bin/python benchmarks/hf_grpo_step.py                    # 40 steps, 8 prompts x 8, lr 3e-3
    .venv/bin/python benchmarks/hf_grpo_step.py --steps 60 --lr 1e-3 --seed 1

Prints one line per step and a summary; writes benchmarks/out/hf_grpo_step.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class GRPOBatch:
    """One training batch, label-aligned: position ``t`` scores the token at ``t + 1``.

    ``B`` sequences right-padded to ``T`` tokens (padding after a sequence cannot affect it under a
    causal mask, so no attention mask is needed).
    """

    tokens: torch.Tensor
    """``[B, T]`` int64 prompt + completion ids."""
    loss_mask: torch.Tensor
    """``[B, T-1]`` fp32: 1 where ``tokens[:, t+1]`` is a sampled (trained) completion token."""
    advantages: torch.Tensor
    """``[B, T-1]`` fp32 advantage of each trained token (0 elsewhere)."""
    old_logprobs: torch.Tensor
    """``[B, T-1]`` fp32 log-prob of ``tokens[:, t+1]`` under the policy that sampled it."""


def token_logprobs(model, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T-1]`` fp32 log-prob of each next token (logits divided by ``temperature``)."""
    logits = model(input_ids=tokens[:, :-1]).logits.float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def hf_grpo_step(
    model,
    optimizer: torch.optim.Optimizer,
    batch: GRPOBatch,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    temperature: float = 1.0,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One GRPO step: PPO-clip loss per token, mean over all trained tokens of the batch, one update.

    ``loss = sum_t mask * -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) / sum_t mask`` with
    ``r = exp(logprob - old_logprob)``. No KL term, no entropy bonus (the demo's config uses none).

    Returns:
        ``loss``, ``grpo/clip_frac`` (share of trained tokens whose ratio was clipped against the
        advantage), ``grad_norm`` (before clipping), ``tokens`` and ``time/step_s``.
    """
    start = time.perf_counter()
    model.train()
    logprobs = token_logprobs(model, batch.tokens, temperature=temperature)
    ratio = torch.exp(logprobs - batch.old_logprobs)
    unclipped = ratio * batch.advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * batch.advantages
    token_loss = -torch.minimum(unclipped, clipped)
    trained = batch.loss_mask.sum().clamp(min=1)
    loss = (token_loss * batch.loss_mask).sum() / trained
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    clip_frac = ((clipped < unclipped).float() * batch.loss_mask).sum() / trained
    return {
        "loss": loss.item(),
        "grpo/clip_frac": clip_frac.item(),
        "grad_norm": grad_norm.item(),
        "tokens": float(batch.loss_mask.sum().item()),
        "time/step_s": time.perf_counter() - start,
    }


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``[P, G]`` rewards -> ``[P * G]`` ``(r - mean) / (std + eps)`` per group (unbiased std);
    a group whose rewards are all equal gets exactly 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    advantages = (rewards - mean) / (std + eps)
    flat = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(advantages), advantages).reshape(-1)


@torch.no_grad()
def sample_groups(
    model,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, list[int]]:
    """Sample ``group_size`` completions per prompt from the full distribution (no top-k/top-p).

    All prompts must have the same length (the demo task's do). Full recompute per token: at 14
    tokens a KV cache would only add code.

    Returns:
        ``[P * G, prompt_len + max_new_tokens]`` tokens (``pad_id`` after an EOS) and each row's
        completion length (EOS included when sampled).
    """
    if len({len(p) for p in prompt_ids}) != 1:
        raise ValueError("sample_groups needs prompts of one length")
    model.eval()
    tokens = torch.tensor([ids for ids in prompt_ids for _ in range(group_size)])
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    lengths = [max_new_tokens] * tokens.shape[0]
    for step in range(max_new_tokens):
        logits = model(input_ids=tokens).logits[:, -1].float() / temperature
        next_ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        for row in torch.nonzero((next_ids == eos_id) & ~done).flatten().tolist():
            lengths[row] = step + 1
        done |= next_ids == eos_id
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
    return tokens, lengths


def build_batch(
    model, tokens: torch.Tensor, prompt_len: int, lengths: list[int], rewards: torch.Tensor
) -> GRPOBatch:
    """Loss mask over each completion, group advantages broadcast to its tokens, and old log-probs
    recomputed by ``model`` before the update (so the first update's ratio is exactly 1)."""
    loss_mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for row, length in enumerate(lengths):
        loss_mask[row, prompt_len - 1 : prompt_len - 1 + length] = 1.0
    advantages = group_advantages(rewards)[:, None] * loss_mask
    model.eval()
    with torch.no_grad():
        old_logprobs = token_logprobs(model, tokens)
    return GRPOBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages, old_logprobs=old_logprobs)


# ------------------------------------------------------------------------------------------------
# The learnability run
# ------------------------------------------------------------------------------------------------


def train_demo_task(args: argparse.Namespace) -> list[dict]:
    """Train the demo model on the demo task for ``args.steps`` steps; one record per step."""
    from atropos_megatron.demo import assets

    tokenizer = assets.build_tokenizer()
    model = assets.build_model(seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    records = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        prompts = [assets.sample_prompt(rng) for _ in range(args.prompts)]
        prompt_ids = [tokenizer.encode(p) for p in prompts]
        tokens, lengths = sample_groups(
            model,
            prompt_ids,
            group_size=args.group_size,
            max_new_tokens=assets.COMPLETION_TOKENS,
            eos_id=assets.EOS_ID,
            pad_id=assets.PAD_ID,
            generator=generator,
        )
        prompt_len = len(prompt_ids[0])
        texts = [
            tokenizer.decode(row[prompt_len : prompt_len + n], skip_special_tokens=True)
            for row, n in zip(tokens.tolist(), lengths, strict=True)
        ]
        rewards = [assets.score_completion(prompts[i // args.group_size], t) for i, t in enumerate(texts)]
        reward_tensor = torch.tensor(rewards).view(args.prompts, args.group_size)
        generate_s = time.perf_counter() - start
        batch = build_batch(model, tokens, prompt_len, lengths, reward_tensor)
        metrics = hf_grpo_step(model, optimizer, batch)
        record = {
            "step": step,
            "reward/mean": statistics.fmean(rewards),
            "reward/std": statistics.pstdev(rewards),
            "time/generate_s": generate_s,
            **metrics,
            "example": f"{prompts[0]}{texts[0]}",
        }
        records.append(record)
        print(
            f"step {step:3d}  reward {record['reward/mean']:.3f} +- {record['reward/std']:.3f}  "
            f"loss {metrics['loss']:+.4f}  generate {generate_s * 1e3:5.0f} ms  "
            f"step {metrics['time/step_s'] * 1e3:5.0f} ms  e.g. {record['example']!r}",
            flush=True,
        )
    return records


def summarize(records: list[dict], *, window: int = 5, target_gain: float = 0.4) -> dict:
    """First/last ``window`` mean reward, and the first step whose trailing-window mean is
    ``target_gain`` above the first window's (None if never)."""
    rewards = [r["reward/mean"] for r in records]
    first = statistics.fmean(rewards[:window])
    reached = None
    for end in range(window, len(rewards) + 1):
        if statistics.fmean(rewards[end - window : end]) >= first + target_gain:
            reached = end
            break
    return {
        "first_mean": first,
        "last_mean": statistics.fmean(rewards[-window:]),
        "window": window,
        "target_gain": target_gain,
        "step_reaching_target": reached,
        "step_s_median": statistics.median(r["time/step_s"] for r in records),
        "generate_s_median": statistics.median(r["time/generate_s"] for r in records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Plain HF + torch GRPO on the demo task (no servers): the learnability check.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="model init, prompts and sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/out/hf_grpo_step.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    records = train_demo_task(args)
    summary = summarize(records)
    reached = summary["step_reaching_target"]
    print(
        f"\nreward: first {summary['window']} steps {summary['first_mean']:.3f} -> last "
        f"{summary['window']} {summary['last_mean']:.3f} (gain {summary['last_mean'] - summary['first_mean']:+.3f}); "
        f"+{summary['target_gain']} reached at step {reached if reached else 'never'}; "
        f"median step {summary['step_s_median'] * 1e3:.0f} ms, generation {summary['generate_s_median'] * 1e3:.0f} ms"
    )
    result = {
        "benchmark": "hf_grpo_step",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "steps": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
