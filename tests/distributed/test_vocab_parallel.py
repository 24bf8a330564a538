"""Vocab-parallel log-probs and GRPO loss on 2 gloo ranks equal the single-rank (TP=1) results.

Each rank holds half of a padded vocabulary (V = 101 real ids padded to 102, 51 columns per rank, as
Megatron's vocab-parallel output layer gives them); only ``[T]`` statistics cross ranks. Each rank's
values must equal TP=1's and the fp64 spec's, and its gradient must equal the matching columns of the
full gradient, including on ranks that do not own a token's label.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

VOCAB, PADDED, TP = 101, 102, 2
OBJECTIVES = {
    "ppo-clip+kl-k3+entropy": dict(clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01),
    "gspo+tis-sequence": dict(
        policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, importance_correction="sequence"
    ),
    "kl-k2+tis-token": dict(kl_coef=0.1, kl_estimator="k2", importance_correction="token"),
}


def _body(rank, world_size):
    import torch
    import torch.distributed as dist

    from atropos_megatron.config import GRPOConfig
    from atropos_megatron.kernels import torch_ops, triton_ops
    from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
    from atropos_megatron.kernels.logprobs import VocabShard, fused_token_logprobs
    from tests.kernel_reference import grpo_inputs, grpo_loss_fp64, logprobs_fp64, relative_error

    triton_ops.MAX_BLOCK_V, torch_ops.DEFAULT_CHUNK_TOKENS = 16, 8  # several slices per shard
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    local = PADDED // world_size
    columns = slice(rank * local, (rank + 1) * local)
    shard = VocabShard.of_tp_rank(local, VOCAB, group)
    errors = {}

    inputs = grpo_inputs(vocab=PADDED, seed=7)
    # Labels on both ranks' halves (the shard boundary is id 51), none in the padding.
    inputs["labels"] = torch.where(inputs["loss_mask"], inputs["labels"].clamp(max=VOCAB - 1), -100)
    logits, labels = inputs["logits"], inputs["labels"]
    temperature = torch.linspace(0.6, 1.2, labels.shape[0])[:, None]
    up_lp = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    up_h = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    safe_labels = labels.clamp(min=0)
    # The same op on this rank's vocabulary shard (TP=2) and on the whole vocabulary (TP=1).
    placements = {"tp2": (logits[..., columns], shard), "tp1": (logits, VocabShard(vocab_size=VOCAB))}

    def local_grad(name, grad):
        return grad[..., columns] if name == "tp1" else grad

    for backend in ("torch", "triton"):
        results = {}
        for name, (tensor, this_shard) in placements.items():
            leaf = tensor.clone().requires_grad_()
            lp, h = fused_token_logprobs(
                leaf,
                safe_labels,
                temperature=temperature,
                shard=this_shard,
                return_entropy=True,
                backend=backend,
            )
            ((lp * up_lp).sum() + (h * up_h).sum()).backward()
            results[name] = (lp.detach(), h.detach(), local_grad(name, leaf.grad))
        reference = logits.double().requires_grad_()
        ref_lp, ref_h = logprobs_fp64(reference, safe_labels, temperature=temperature, vocab_size=VOCAB)
        ((ref_lp * up_lp).sum() + (ref_h * up_h).sum()).backward()
        tp2, tp1 = results["tp2"], results["tp1"]
        errors[f"logprobs/{backend}/vs-tp1"] = max(
            relative_error(a, b) for a, b in zip(tp2, tp1, strict=True)
        )
        errors[f"logprobs/{backend}/vs-fp64"] = max(
            relative_error(tp2[0], ref_lp),
            relative_error(tp2[1], ref_h),
            relative_error(tp2[2], reference.grad[..., columns]),
        )

        for objective, overrides in OBJECTIVES.items():
            cfg = GRPOConfig(kernel=backend, **overrides)
            rest = {k: v for k, v in inputs.items() if k != "logits"}
            losses, grads = {}, {}
            for name, (tensor, this_shard) in placements.items():
                leaf = tensor.clone().requires_grad_()
                loss, _ = fused_grpo_loss(
                    leaf.clone(), **rest, cfg=cfg, temperature=temperature, shard=this_shard, inplace=True
                )
                loss.backward()
                losses[name], grads[name] = loss.detach(), local_grad(name, leaf.grad)
            ref_loss, _, ref_grad = grpo_loss_fp64(inputs, cfg, temperature=temperature, vocab_size=VOCAB)
            errors[f"grpo/{objective}/{backend}/vs-tp1"] = max(
                relative_error(losses["tp2"], losses["tp1"]), relative_error(grads["tp2"], grads["tp1"])
            )
            errors[f"grpo/{objective}/{backend}/vs-fp64"] = max(
                relative_error(losses["tp2"], ref_loss), relative_error(grads["tp2"], ref_grad[..., columns])
            )
    dist.destroy_process_group()
    return errors


def test_tp2_equals_tp1_and_the_fp64_spec(report):
    per_rank = run_ranks(_body, TP, timeout_s=300)
    worst = {key: max(errors[key] for errors in per_rank) for key in per_rank[0]}
    report(
        "TP=2 vs TP=1 worst relative error: "
        f"{max(v for k, v in worst.items() if k.endswith('vs-tp1')):.1e}; "
        f"vs fp64: {max(v for k, v in worst.items() if k.endswith('vs-fp64')):.1e}"
    )
    for key, error in worst.items():
        assert error < (1e-5 if key.endswith("vs-fp64") else 2e-6), key
