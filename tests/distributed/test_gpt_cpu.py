"""A tiny Megatron GPTModel trains on CPU (fp32 and bf16) through the real pipeline schedule."""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed


def _train_a_few_steps(rank, world_size, dtype):
    import torch
    from megatron.core import tensor_parallel

    from atropos_megatron.config import load_config
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.trainer.step import forward_backward

    cfg = load_config(None, [f"model.dtype={dtype}", "model.vocab_size=200", "model.num_query_groups=2"])
    parallel.init_distributed(cfg.parallel, seed=cfg.seed)
    (model,) = build_model(cfg.model, cfg.parallel)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=gen)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(32).expand(4, 32),
    }

    shapes = []

    def cross_entropy(mb, logits):
        shapes.append((tuple(logits.shape), logits.dtype))
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), mb["labels"]).mean(), {}

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        with torch.no_grad():
            forward_only_outputs = forward_backward(
                [model], [batch], loss_fn=cross_entropy, forward_only=True
            )
        forward_backward([model], [batch], loss_fn=cross_entropy)
        grads = [p.grad for p in model.parameters()]
        optimizer.step()
        losses.append(cross_entropy(batch, model(batch["tokens"], batch["position_ids"], None))[0].item())
    return {
        "losses": losses,
        "logits": shapes[0],
        "all_grads_finite_and_present": all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "forward_only_outputs": len(forward_only_outputs),
    }


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_gpt_forward_backward_learns(dtype, report):
    import torch

    (result,) = run_ranks(_train_a_few_steps, 1, dtype, timeout_s=90)
    shape, logits_dtype = result["logits"]
    assert shape == (4, 32, 256)  # vocab 200 padded to a multiple of 128
    assert logits_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert result["all_grads_finite_and_present"]
    assert result["forward_only_outputs"] == 1  # one metrics dict per micro-batch
    losses = result["losses"]
    report(f"{dtype}: cross-entropy over 5 Adam steps {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.3, losses


def test_cpu_patches_stay_off_when_cuda_is_present(monkeypatch):
    import torch

    from atropos_megatron.trainer import megatron_patches

    current_device = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert megatron_patches.apply_cpu_patches() is False
    assert torch.cuda.current_device is current_device
