"""``grpo.fused_linear``: the trainer's loss pass from hidden states takes the logits path's GRPO steps.

The same three steps as ``test_trainer.py`` (tiny Qwen2 with tied embeddings, KL and entropy on,
several micro-batches) with the loss computed by ``kernels/fused_linear_grpo.py`` from the last hidden
states and the output weight, against the logits path at TP=1 in the same test: at TP=1, TP=2, TP=2
with sequence parallelism and PP=2 (where the last stage keeps its own copy of the tied embedding),
losses, KL, entropy and gradient norms agree to fp32 noise and the weights move the same way; the
reference (and, where recomputed, the old) log-probs come from hidden states too (no pass
materialises logits), and the first step's PPO ratio is exactly 1. ``auto`` (the default) computes
this model's trained-token logits in one piece, once, and is checked at TP=2 with SP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.distributed.test_trainer import (
    STEPS,
    UPDATE_TOLERANCE,
    _assert_close,
    _config,
    _hf_weights,
    _losses,
    _train,
)
from tests.harness import run_ranks
from tests.hf_models import save_tiny_checkpoint

pytestmark = pytest.mark.distributed

FUSED = ["grpo.fused_linear=always"]
LAYOUTS = {
    "tp2": ["parallel.tensor_parallel_size=2", *FUSED],
    # auto: this tiny model's trained-token logits fit in one piece, computed once and reused.
    "tp2+sp, auto (one chunk)": [
        "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true", "grpo.fused_linear=auto",
    ],
    "pp2, old log-probs recomputed": [
        "parallel.pipeline_parallel_size=2", *FUSED, "grpo.old_logprobs=recompute",
    ],
}  # fmt: skip


def _reference_body(rank, world_size, hf_dir, tmp):
    logits_path, metrics = _train(_config(hf_dir, f"{tmp}/logits", ["grpo.fused_linear=never"]), range(STEPS))
    fused, fused_metrics = _train(_config(hf_dir, f"{tmp}/fused", FUSED), range(STEPS))
    return (_losses(metrics), _hf_weights(logits_path)), (_losses(fused_metrics), _hf_weights(fused))


def _layouts_body(rank, world_size, hf_dir, tmp):
    results = {}
    for name, extra in LAYOUTS.items():
        trainer, metrics = _train(_config(hf_dir, f"{tmp}/{name}", extra), range(STEPS))
        results[name] = (_losses(metrics), _hf_weights(trainer))
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny_checkpoint("qwen2", path)
    return str(path)


def test_the_fused_linear_loss_pass_takes_the_logits_paths_steps_at_every_layout(
    hf_dir, tmp_path: Path, report
):
    (expected, expected_weights), fused_tp1 = run_ranks(
        _reference_body, 1, hf_dir, str(tmp_path), timeout_s=120
    )[0]
    assert expected[-1]["grpo/kl_ref"] > 0.0, "three steps did not move the actor: the test is void"
    first = fused_tp1[0][0]  # on-policy: pi_old is the loss pass's own
    assert first["grpo/ratio_min"] == first["grpo/ratio_max"] == 1.0 and first["grpo/kl_ref"] == 0.0
    results = {"tp1": fused_tp1, **run_ranks(_layouts_body, 2, hf_dir, str(tmp_path), timeout_s=240)[0]}
    initial = load_file(Path(hf_dir) / "model.safetensors")
    for name, (losses, weights) in results.items():
        _assert_close(expected, losses, f"fused linear at {name}")
        gap = sum(((weights[k] - expected_weights[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((expected_weights[k] - initial[k]) ** 2).sum() for k in weights).sqrt()
        report(f"fused linear loss at {name}: |update - logits path's| / |update| = {gap / update:.1e}")
        assert gap / update <= UPDATE_TOLERANCE, f"{name}: the weights moved differently from the logits path"
