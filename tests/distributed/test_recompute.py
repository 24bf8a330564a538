"""``parallel.recompute``: Megatron's activation recomputation takes the same GRPO steps and saves memory.

Three steps of ``test_trainer.py``'s run with ``selective`` (core attention) and ``full`` recomputation,
at TP=1 and TP=2, against the run without it (TP=1, same test): losses to fp32 noise and the same
weight updates. And the point of it, measured: the activations the loss pass saves for backward
(peak bytes autograd holds for backward, by saved-tensor hooks) shrink.
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

MODES = {
    "selective": ["parallel.recompute=selective"],
    "full": ["parallel.recompute=full", "parallel.recompute_num_layers=1"],
}


def _saved_peak_bytes(cfg) -> int:
    """Peak bytes of activations autograd holds for backward during one loss pass of a fresh trainer.

    Saved-tensor hooks count a tensor from when autograd saves it until backward reads it back (then it
    is freed with its node); parameters, which autograd also "saves", are not activations. With
    recomputation the forward saves only layer inputs and backward saves (and reads) a layer's
    activations again while it recomputes it: the peak, not the sum, is what shrinks.
    """
    import torch

    from atropos_megatron.data.batching import build_rollouts, plan_micro_batches
    from atropos_megatron.trainer.grpo_step import grpo_loss_pass
    from atropos_megatron.trainer.loop import Trainer
    from tests.rollouts import synthetic_batch

    trainer = Trainer(cfg)
    trainer.setup()
    rollouts, _ = build_rollouts(synthetic_batch(0), cfg.grpo)
    plan = plan_micro_batches(rollouts, data=cfg.data, grpo=cfg.grpo, dp_rank=0, dp_size=1)
    trainer._attach_old_logprobs(plan, recompute=True)
    params = {p.data_ptr() for chunk in trainer.state.chunks for p in chunk.parameters()}
    live = peak = 0

    def pack(tensor):
        nonlocal live, peak
        nbytes = 0 if tensor.data_ptr() in params else tensor.numel() * tensor.element_size()
        live += nbytes
        peak = max(peak, live)
        return tensor, nbytes

    def unpack(packed):
        nonlocal live
        tensor, nbytes = packed
        live -= nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        grpo_loss_pass(trainer.state.chunks, plan, cfg=cfg.grpo, vocab_size=trainer.model.vocab_size)
    return peak


def _reference_body(rank, world_size, hf_dir, tmp):
    baseline, metrics = _train(_config(hf_dir, f"{tmp}/none", []), range(STEPS))
    results = {"none": (_losses(metrics), _hf_weights(baseline))}
    for name, extra in MODES.items():
        trainer, metrics = _train(_config(hf_dir, f"{tmp}/{name}", extra), range(STEPS))
        results[name] = (_losses(metrics), _hf_weights(trainer))
    saved = {name: _saved_peak_bytes(_config(hf_dir, f"{tmp}/saved-{name}", [*extra, "grpo.kl_coef=0"])) for name, extra in
             {"none": [], **MODES}.items()}  # fmt: skip
    return results, saved


def _tp2_body(rank, world_size, hf_dir, tmp):
    results = {}
    for name, extra in MODES.items():
        trainer, metrics = _train(
            _config(hf_dir, f"{tmp}/tp2-{name}", [*extra, "parallel.tensor_parallel_size=2"]), range(STEPS)
        )
        results[f"tp2 {name}"] = (_losses(metrics), _hf_weights(trainer))
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny_checkpoint("qwen2", path)
    return str(path)


def test_recompute_takes_the_same_steps_and_saves_fewer_activations(hf_dir, tmp_path: Path, report):
    results, saved = run_ranks(_reference_body, 1, hf_dir, str(tmp_path), timeout_s=180)[0]
    results.update(run_ranks(_tp2_body, 2, hf_dir, str(tmp_path), timeout_s=240)[0])
    expected, expected_weights = results.pop("none")
    initial = load_file(Path(hf_dir) / "model.safetensors")
    for name, (losses, weights) in results.items():
        _assert_close(expected, losses, f"recompute {name}")
        gap = sum(((weights[k] - expected_weights[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((expected_weights[k] - initial[k]) ** 2).sum() for k in weights).sqrt()
        assert gap / update <= UPDATE_TOLERANCE, f"recompute {name}: the weights moved differently"
    report(
        "activations held for backward, peak of one loss pass (TP=1): "
        + ", ".join(f"{name} {nbytes / 2**20:.2f} MiB" for name, nbytes in saved.items())
    )
    assert saved["selective"] < saved["none"] and saved["full"] < saved["selective"]
