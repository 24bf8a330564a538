"""The GRPO trainer's update is the same at every parallel layout, and resuming reproduces it exactly.

All layouts start from one tiny HF checkpoint (so their initial weights are identical) and train three
steps on the same synthetic batches with the KL penalty on (so the frozen reference model runs too).
The reference run is TP=1 on one process; TP=2 (on padded rows instead of packed THD ones), PP=2 and
DP=2 (distributed optimizer sharded over two ranks) run in turn on one pair of processes. Losses and
the final weights, gathered to HF tensors, must agree to fp32 noise; the first step's PPO ratio must
be exactly 1 (old log-probs are the loss pass's own, or recomputed with the same weights by the same
code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.harness import run_ranks
from tests.hf_models import save_tiny_checkpoint

pytestmark = pytest.mark.distributed

STEPS = 3
LOSS_TOLERANCE = 1e-5
UPDATE_TOLERANCE = 1e-3
"""Relative difference of the weight updates (final - initial): Adam divides by the root of tiny
second moments, so fp32 reduction-order noise in a gradient becomes ~1e-5 in a weight after three
steps, while the updates themselves are ~1e-3 per weight."""
LAYOUTS = {
    # One sequence per padded row instead of THD rows (data.packing: false): the same steps.
    "tp2, padded rows": ["parallel.tensor_parallel_size=2", "data.packing=false"],
    # With grpo.old_logprobs: auto (one update per batch) the loss pass is its own pi_old; here a
    # separate pass recomputes it first, which must take the same steps.
    "pp2, old log-probs recomputed": ["parallel.pipeline_parallel_size=2", "grpo.old_logprobs=recompute"],
    "dp2": [],
}


def _config(hf_dir: str, run_dir: str, extra: list[str]):
    from atropos_megatron.config import load_config

    return load_config(
        "examples/configs/debug_tiny.yaml",
        [
            f"model.hf_path={hf_dir}",
            f"logging.run_dir={run_dir}",
            "grpo.kl_coef=0.05",
            "grpo.entropy_coef=0.01",
            "data.micro_batch_tokens=256",  # several micro-batches per step
            *extra,
        ],
    )


def _train(cfg, steps: range, *, save_after: int | None = None):
    """Set up a trainer for ``cfg`` and take ``steps``; returns (trainer, per-step loss metrics)."""
    from atropos_megatron.trainer.loop import Trainer
    from tests.rollouts import synthetic_batch

    trainer = Trainer(cfg)
    trainer.setup()
    metrics = []
    for step in steps:
        metrics.append(trainer.train_on(synthetic_batch(step)))
        if save_after == step:
            trainer.save_checkpoint()
    return trainer, metrics


def _hf_weights(trainer) -> dict | None:
    from atropos_megatron.weights.export import export_hf_tensors

    tensors = {name: t.clone() for name, t in export_hf_tensors(trainer.state.chunks, trainer.model)}
    return tensors or None


def _losses(metrics: list[dict]) -> list[dict]:
    keys = ("grpo/loss", "grpo/kl_ref", "grpo/entropy", "optim/grad_norm", "grpo/ratio_max", "grpo/ratio_min")
    return [{k: m[k] for k in keys if k in m} for m in metrics]


def _reference_body(rank, world_size, hf_dir, run_dir):
    trainer, metrics = _train(_config(hf_dir, run_dir, []), range(STEPS))
    # Two updates on one batch: the second mini-batch is measured against the policy before the first.
    _, (two_updates,) = _train(_config(hf_dir, f"{run_dir}-2", ["grpo.updates_per_batch=2"]), range(1))
    return _losses(metrics), _hf_weights(trainer), metrics[0]["grpo/approx_kl_old"], two_updates


def _layouts_body(rank, world_size, hf_dir, tmp):
    results = {}
    for name, extra in LAYOUTS.items():
        trainer, metrics = _train(_config(hf_dir, f"{tmp}/{name}", extra), range(STEPS))
        results[name] = (_losses(metrics), _hf_weights(trainer), metrics[0].get("grpo/approx_kl_old"))
    return results


def _resume_body(rank, world_size, hf_dir, tmp):
    """DP=2: steps 0-1, checkpoint, step 2; then resume from the checkpoint (DP=2 and TP=2) and redo step 2."""
    run = f"{tmp}/resume"
    _, uninterrupted = _train(_config(hf_dir, run, []), range(STEPS), save_after=1)
    # A training checkpoint is also a model checkpoint: a new run can start from its weights.
    checkpoint = f"{run}/checkpoints/step_00000002"
    restored, _ = _train(_config(hf_dir, run, ["checkpoint.load=latest"]), range(0))
    started, _ = _train(_config("null", f"{tmp}/fresh", [f"model.dist_checkpoint={checkpoint}"]), range(0))
    restored_weights, started_weights = _hf_weights(restored), _hf_weights(started)
    same_start = restored_weights is None or all(
        restored_weights[k].equal(started_weights[k]) for k in restored_weights
    )
    resumed = {}
    for name, extra in (("dp2", []), ("tp2", ["parallel.tensor_parallel_size=2"])):
        trainer, metrics = _train(_config(hf_dir, run, ["checkpoint.load=latest", *extra]), range(2, STEPS))
        resumed[name] = (trainer.progress.step, _losses(metrics))
    return _losses(uninterrupted)[2], resumed, same_start


GOLDEN = Path(__file__).parent.parent / "golden" / "trainer_tiny_qwen2.json"
"""The TP=1 run's per-step metrics, recorded once: a change in the trainer's numbers (loss, KL, entropy,
gradient norm) fails here even when every layout still agrees with every other. After an intended
change, rewrite it with ``ATROPOS_MEGATRON_UPDATE_GOLDEN=1 pytest tests/distributed/test_trainer.py``."""


def _check_golden(losses: list[dict]) -> None:
    if os.environ.get("ATROPOS_MEGATRON_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(losses, indent=1) + "\n")
    _assert_close(json.loads(GOLDEN.read_text()), losses, "golden TP=1 metrics")


def _assert_close(expected: list[dict], actual: list[dict], what: str) -> None:
    for step, (e, a) in enumerate(zip(expected, actual, strict=True)):
        assert e.keys() == a.keys(), f"{what} step {step}: metrics {sorted(e)} vs {sorted(a)}"
        for key in e:
            assert abs(e[key] - a[key]) <= LOSS_TOLERANCE * max(1.0, abs(e[key])), (
                f"{what} step {step}: {key} {a[key]} != expected {e[key]}"
            )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny_checkpoint("qwen2", path)
    return str(path)


def test_every_layout_takes_the_same_steps_as_tp1(hf_dir, tmp_path: Path, report):
    (reference_losses, reference_weights, reference_kl, two_updates) = run_ranks(
        _reference_body, 1, hf_dir, str(tmp_path / "tp1"), timeout_s=120
    )[0]
    # The first step is on-policy: the recomputed old log-probs are the current ones, bit for bit.
    assert reference_losses[0]["grpo/ratio_max"] == reference_losses[0]["grpo/ratio_min"] == 1.0
    assert reference_kl == 0.0
    assert reference_losses[0]["grpo/kl_ref"] == 0.0  # the reference model starts as the actor
    assert reference_losses[-1]["grpo/kl_ref"] > 0.0, "three steps did not move the actor: the test is void"
    _check_golden(reference_losses)
    assert two_updates["grpo/updates"] == 2 and two_updates["grpo/approx_kl_old"] > 0.0
    assert two_updates["grpo/ratio_max"] > 1.0 or two_updates["grpo/ratio_min"] < 1.0

    results = run_ranks(_layouts_body, 2, hf_dir, str(tmp_path), timeout_s=240)[0]
    initial = load_file(Path(hf_dir) / "model.safetensors")
    for name, (losses, weights, first_kl) in results.items():
        _assert_close(reference_losses, losses, name)
        assert first_kl == 0.0, f"{name}: PPO-KL of the first step is {first_kl}, not 0"
        assert weights.keys() == reference_weights.keys()
        gap = sum(((weights[k] - reference_weights[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((reference_weights[k] - initial[k]) ** 2).sum() for k in weights).sqrt()
        diff = max((weights[k] - reference_weights[k]).abs().max().item() for k in weights)
        report(
            f"{name}: final loss {losses[-1]['grpo/loss']:.6f}; |update - TP=1 update| / |TP=1 update| = "
            f"{gap / update:.1e} (max |weight diff| {diff:.1e})"
        )
        assert gap / update <= UPDATE_TOLERANCE, f"{name}: the weights moved differently from TP=1's"


def test_resume_reproduces_the_next_step_and_a_checkpoint_seeds_a_new_run(hf_dir, tmp_path: Path, report):
    expected, resumed, same_start = run_ranks(_resume_body, 2, hf_dir, str(tmp_path), timeout_s=240)[0]
    assert same_start, "model.dist_checkpoint did not start from the checkpoint's weights"
    for name, (step, losses) in resumed.items():
        assert step == STEPS, f"{name}: resumed run ended at step {step}"
        report(f"resumed at {name}: step-3 loss {losses[0]['grpo/loss']:.8f} vs {expected['grpo/loss']:.8f}")
        if name == "dp2":  # same layout: the same numbers, not merely close ones
            assert losses[0] == expected, (
                f"resume at the same layout changed step 3: {losses[0]} != {expected}"
            )
        else:
            _assert_close([expected], losses, f"resume at {name}")
