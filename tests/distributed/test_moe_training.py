"""GRPO on a mixture-of-experts model: the same steps at every expert-parallel layout as at EP=1.

A tiny HF Qwen3-MoE (4 experts, top-2, one dense layer) is the start; three steps on the same synthetic
batches with the KL penalty on (the frozen reference runs too) at EP=1 on one process, then EP=2 with
each dispatcher on two ranks and EP=2 x TP=2 (sequence parallel) and EP=2 x PP=2 on four. Losses,
gradient norms and the final weights (exported as per-expert HF tensors) must agree with EP=1 to fp32
noise. The router losses are off for this comparison: they are computed per micro-batch and rank, so
they change with the data-parallel split by design. Routing metrics, which are sums over the step's
tokens, agree between the layouts that split the data alike. Then the load-balancing loss does its job:
with a large coefficient the busiest expert's load falls.
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

TWO_RANKS = {
    "ep2": ["parallel.expert_parallel_size=2"],
    "ep2 allgather": ["parallel.expert_parallel_size=2", "parallel.moe_token_dispatcher=allgather"],
}
FOUR_RANKS = {
    "ep2 tp2": [
        "parallel.expert_parallel_size=2",
        "parallel.tensor_parallel_size=2",
        "parallel.sequence_parallel=true",
    ],
    "ep2 pp2": ["parallel.expert_parallel_size=2", "parallel.pipeline_parallel_size=2"],
}
ROUTER_LOSSES_OFF = ["grpo.moe_aux_loss_coef=0", "grpo.moe_z_loss_coef=0"]


def _routing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k.startswith("moe/")} for m in metrics]


def _run_layouts(rank, world_size, hf_dir, tmp, layouts):
    results = {}
    for name, extra in layouts.items():
        trainer, metrics = _train(
            _config(hf_dir, f"{tmp}/{name}", [*ROUTER_LOSSES_OFF, *extra]), range(STEPS)
        )
        results[name] = (_losses(metrics), _routing(metrics), _hf_weights(trainer))
    return results


def _aux_loss_body(rank, world_size, hf_dir, tmp):
    """EP=2, eight steps each without and with a large load-balancing coefficient.

    On padded rows (``data.packing: false``): their padding positions, identical tokens the routers
    send to the same experts, make the start clearly unbalanced (packed rows start near 1.0, the
    floor, where eight steps of drift hide the loss's effect)."""
    loads = {}
    for coef in (0.0, 1.0):
        extra = [
            "parallel.expert_parallel_size=2", f"grpo.moe_aux_loss_coef={coef}", "optimizer.lr=1e-2",
            "data.packing=false",
        ]  # fmt: skip
        _, metrics = _train(_config(hf_dir, f"{tmp}/aux{coef}", extra), range(8))
        loads[coef] = [m["moe/aux_loss"] for m in metrics]
    return loads


def _resume_body(rank, world_size, hf_dir, tmp):
    """EP=2: steps 0-1, checkpoint, step 2; then resume at EP=2 and redo step 2. At EP=1 (one optimizer
    for experts and the rest, where EP=2 has two) the resume is refused; the weights still load."""
    run, ep2 = f"{tmp}/resume", ["parallel.expert_parallel_size=2"]
    _, uninterrupted = _train(_config(hf_dir, run, [*ROUTER_LOSSES_OFF, *ep2]), range(STEPS), save_after=1)
    cfg = _config(hf_dir, run, [*ROUTER_LOSSES_OFF, "checkpoint.load=latest", *ep2])
    trainer, metrics = _train(cfg, range(2, STEPS))
    try:
        _train(_config(hf_dir, run, [*ROUTER_LOSSES_OFF, "checkpoint.load=latest"]), range(0))
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    checkpoint = f"{run}/checkpoints/step_00000002"
    weights_only, _ = _train(
        _config("null", f"{tmp}/fresh", [f"model.dist_checkpoint={checkpoint}"]), range(0)
    )
    same_weights = _hf_weights(weights_only)
    return (
        _losses(uninterrupted)[2],
        (trainer.progress.step, _losses(metrics)),
        refusal,
        same_weights is not None,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    save_tiny_checkpoint("qwen3_moe", path)
    return str(path)


def test_every_expert_layout_takes_the_same_steps_as_ep1(hf_dir, tmp_path: Path, report):
    (reference,) = run_ranks(_run_layouts, 1, hf_dir, str(tmp_path), {"ep1": []}, timeout_s=300)
    reference_losses, reference_routing, reference_weights = reference["ep1"]
    assert reference_losses[0]["grpo/ratio_max"] == reference_losses[0]["grpo/ratio_min"] == 1.0
    assert reference_losses[-1]["grpo/kl_ref"] > 0.0, "three steps did not move the actor: the test is void"
    assert 1.0 <= reference_routing[0]["moe/load_max_over_mean"] <= 4.0
    shares = [v for k, v in reference_routing[0].items() if k.startswith("moe/expert_share/")]
    assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-9

    results = run_ranks(_run_layouts, 2, hf_dir, str(tmp_path), TWO_RANKS, timeout_s=400)[0]
    results.update(run_ranks(_run_layouts, 4, hf_dir, str(tmp_path), FOUR_RANKS, timeout_s=600)[0])
    initial = load_file(Path(hf_dir) / "model.safetensors")
    for name, (losses, routing, weights) in results.items():
        _assert_close(reference_losses, losses, name)
        # Same data split (DP=2) as the two-rank EP=2 run: the same tokens per expert, counted once.
        _assert_close(results["ep2"][1], routing, f"{name} routing metrics")
        assert weights.keys() == reference_weights.keys() == initial.keys()
        gap = sum(((weights[k] - reference_weights[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((reference_weights[k] - initial[k]) ** 2).sum() for k in weights).sqrt()
        report(
            f"{name}: final loss {losses[-1]['grpo/loss']:.6f} (EP=1 {reference_losses[-1]['grpo/loss']:.6f}); "
            f"|update - EP=1 update| / |EP=1 update| = {gap / update:.1e}"
        )
        assert gap / update <= UPDATE_TOLERANCE, f"{name}: the weights moved differently from EP=1's"


def test_the_load_balancing_loss_evens_out_the_experts(hf_dir, tmp_path: Path, report):
    loads = run_ranks(_aux_loss_body, 2, hf_dir, str(tmp_path), timeout_s=400)[0]
    report(f"moe/aux_loss over 8 steps: coef 0 {loads[0.0][0]:.3f} -> {loads[0.0][-1]:.3f}; "
           f"coef 1 {loads[1.0][0]:.3f} -> {loads[1.0][-1]:.3f}")  # fmt: skip
    assert loads[0.0][0] == loads[1.0][0]  # same start
    assert loads[1.0][-1] < loads[0.0][-1] and loads[1.0][-1] < loads[1.0][0]


def test_a_checkpoint_at_ep2_resumes_the_next_step(hf_dir, tmp_path: Path, report):
    expected, (step, losses), refusal, loaded = run_ranks(
        _resume_body, 2, hf_dir, str(tmp_path), timeout_s=400
    )[0]
    assert step == STEPS
    _assert_close([expected], losses, "resumed at EP=2")
    assert (
        refusal is not None and "expert_parallel_size > 1" in refusal and "model.dist_checkpoint" in refusal
    )
    assert loaded  # a new run at EP=1 starts from the EP=2 checkpoint's weights
    report(f"step 2 loss {expected['grpo/loss']:.6f}, resumed at EP=2: {losses[0]['grpo/loss']:.6f}")
