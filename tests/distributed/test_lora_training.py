"""GRPO with LoRA: the same steps at TP=1, TP=2 and PP=2, only adapters move, adapter-only checkpoints.

One tiny HF Qwen2 (GQA, QKV bias, tied embeddings) is the frozen base; ``model.lora.rank=4`` on every
projection, the KL penalty on (its reference is the base with the adapters off). Three steps on the
same synthetic batches at each layout; the exported weights are the merged ``W + scale * B A``:

- the first step is on-policy and its KL to the reference is exactly 0 (B starts at zero, so the
  adapted model *is* the base), and every layout takes the TP=1 steps (losses to fp32 noise, the
  merged weights' updates to 1e-3 of their size);
- weights without adapters (embedding, norms, biases) export bit-identical to the base;
- a checkpoint holds the adapters and their optimizer state only (no base tensor); it resumes at
  another layout to the uninterrupted step, and refuses a base with other weights, a run without
  LoRA and other adapter shapes, naming what differs; a new run starts from a PEFT adapter or from
  such a checkpoint (``model.lora.adapter``);
- bf16 at TP=2 trains too (step 0 exactly the base; merged export in bf16).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.distributed.test_trainer import STEPS, UPDATE_TOLERANCE, _assert_close, _hf_weights, _train
from tests.harness import run_ranks
from tests.hf_models import save_tiny_checkpoint

pytestmark = pytest.mark.distributed

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]
LAYOUTS = {"tp2": ["parallel.tensor_parallel_size=2"], "pp2": ["parallel.pipeline_parallel_size=2"]}


def _config(hf_dir: str, run_dir: str, extra: list[str]):
    from atropos_megatron.config import load_config

    return load_config(
        "examples/configs/debug_tiny.yaml",
        [
            f"model.hf_path={hf_dir}",
            f"logging.run_dir={run_dir}",
            "grpo.kl_coef=0.05",
            "optimizer.lr=1e-2",  # adapters start at B = 0: a larger step moves them measurably
            "data.micro_batch_tokens=256",
            *LORA,
            *extra,
        ],
    )


def _losses(metrics: list[dict]) -> list[dict]:
    keys = ("grpo/loss", "grpo/kl_ref", "optim/grad_norm", "grpo/ratio_max", "grpo/ratio_min")
    return [{k: m[k] for k in keys if k in m} for m in metrics]


def _reference_body(rank, world_size, hf_dir, run_dir):
    from atropos_megatron.trainer.lora import trainable_parameters

    trainer, metrics = _train(_config(hf_dir, run_dir, []), range(STEPS))
    trained = {name for name, _ in trainable_parameters([c.module for c in trainer.state.chunks])}
    return _losses(metrics), _hf_weights(trainer), trainer.reference, trained


def _layouts_body(rank, world_size, hf_dir, tmp):
    results = {}
    for name, extra in LAYOUTS.items():
        trainer, metrics = _train(_config(hf_dir, f"{tmp}/{name}", extra), range(STEPS))
        results[name] = (_losses(metrics), _hf_weights(trainer))
    return results


def _bf16_body(rank, world_size, hf_dir, run_dir):
    """bf16 at TP=2: adapters and base in bf16, two steps, then the merged export."""
    import math

    trainer, metrics = _train(
        _config(hf_dir, run_dir, ["model.dtype=bf16", "parallel.tensor_parallel_size=2"]), range(2)
    )
    merged = _hf_weights(trainer)
    dtypes = None if merged is None else {str(t.dtype) for t in merged.values()}
    finite = all(math.isfinite(m["grpo/loss"]) for m in metrics if "grpo/loss" in m)
    return _losses(metrics), dtypes, finite


def _refusal(cfg) -> str:
    try:
        _train(cfg, range(0))
    except ValueError as exc:
        return str(exc)
    return "no error"


def _checkpoint_body(rank, world_size, hf_dir, other_base, peft_dir, tmp):
    """TP=2: steps 0-1, checkpoint, step 2; resume at PP=2 and redo step 2; then the refusals; then a
    run that starts from a PEFT adapter (model.lora.adapter)."""
    import torch
    from safetensors.torch import load_file

    from atropos_megatron.weights.lora_checkpoint import read_adapter_checkpoint
    from atropos_megatron.weights.lora_state import adapter_state

    run = f"{tmp}/run"
    tp2 = ["parallel.tensor_parallel_size=2"]
    _, uninterrupted = _train(_config(hf_dir, run, tp2), range(STEPS), save_after=1)
    resume = ["checkpoint.load=latest"]
    trainer, resumed = _train(
        _config(hf_dir, run, [*resume, "parallel.pipeline_parallel_size=2"]), range(2, STEPS)
    )
    refusals = {
        "other base": _refusal(_config(other_base, run, resume)),
        "no lora": _refusal(_config(hf_dir, run, [*resume, "model.lora.rank=0"])),
        "other rank": _refusal(_config(hf_dir, run, [*resume, "model.lora.rank=8"])),
    }
    started, _ = _train(
        _config(hf_dir, f"{tmp}/from-peft", [*tp2, f"model.lora.adapter={peft_dir}"]), range(0)
    )
    state = adapter_state([c.module for c in started.state.chunks])
    expected = load_file(f"{peft_dir}/adapter_model.safetensors")
    from_peft = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # ... or from a LoRA run's checkpoint (adapters only, no optimizer state: a new run, not a resume)
    saved = f"{run}/checkpoints/step_00000002"
    started, _ = _train(_config(hf_dir, f"{tmp}/from-ckpt", [*tp2, f"model.lora.adapter={saved}"]), range(0))
    state = adapter_state([c.module for c in started.state.chunks])
    expected = read_adapter_checkpoint(saved).tensors
    from_ckpt = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    return (
        _losses(uninterrupted)[2],
        trainer.progress.step,
        _losses(resumed)[0],
        refusals,
        (from_peft, from_ckpt),
    )


def _random_peft_adapter(hf_dir: str, out: Path) -> None:
    """A PEFT adapter for the base (every projection, r=4, alpha=8, random non-zero A and B)."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import random_peft_model

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    random_peft_model(model, seed=5, r=4, lora_alpha=8, target_modules="all-linear").save_pretrained(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny_checkpoint("qwen2", path)
    return str(path)


def test_lora_grpo_steps_are_the_same_at_every_layout_and_move_only_adapters(hf_dir, tmp_path: Path, report):
    losses, merged, reference, trained = run_ranks(
        _reference_body, 1, hf_dir, str(tmp_path / "tp1"), timeout_s=120
    )[0]
    assert reference is None, "LoRA keeps a second copy of the model as the reference"
    assert trained and all(".lora." in name for name in trained), sorted(trained)[:5]
    assert losses[0]["grpo/ratio_max"] == losses[0]["grpo/ratio_min"] == 1.0
    assert losses[0]["grpo/kl_ref"] == 0.0, "fresh adapters (B = 0) must leave the base model exactly"
    assert losses[-1]["grpo/kl_ref"] > 0.0, "three steps did not move the adapters: the test is void"

    base = load_file(Path(hf_dir) / "model.safetensors")
    assert merged.keys() == base.keys()
    adapted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "_proj.weight")
    for name, tensor in merged.items():
        if name.endswith(adapted):
            assert not tensor.equal(base[name]), f"{name}: the merged adapters did not change it"
        else:
            assert tensor.equal(base[name]), f"{name} has no adapter and must stay the base's"

    results = run_ranks(_layouts_body, 2, hf_dir, str(tmp_path), timeout_s=240)[0]
    for name, (layout_losses, weights) in results.items():
        _assert_close(losses, layout_losses, name)
        gap = sum(((weights[k] - merged[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((merged[k] - base[k]) ** 2).sum() for k in weights).sqrt()
        report(f"LoRA {name}: |merged update - TP=1's| / |TP=1 update| = {gap / update:.1e}")
        assert gap / update <= UPDATE_TOLERANCE, f"{name}: the merged weights moved differently from TP=1's"


def test_lora_checkpoint_holds_only_adapters_resumes_at_another_layout_and_checks_its_base(
    hf_dir, tmp_path: Path, report
):
    from megatron.core import dist_checkpointing

    other_base = tmp_path / "other-base"
    shutil.copytree(hf_dir, other_base)
    tensors = load_file(other_base / "model.safetensors")
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1.0  # same names, shapes and sizes; other weights
    save_file(tensors, other_base / "model.safetensors", metadata={"format": "pt"})

    peft_dir = tmp_path / "peft"
    _random_peft_adapter(hf_dir, peft_dir)
    expected, step, resumed, refusals, from_peft = run_ranks(
        _checkpoint_body, 2, hf_dir, str(other_base), str(peft_dir), str(tmp_path), timeout_s=300
    )[0]
    assert from_peft[0], "model.lora.adapter did not start the adapters from the PEFT adapter's tensors"
    assert from_peft[1], "model.lora.adapter did not start the adapters from the LoRA checkpoint's"
    assert step == STEPS
    report(f"LoRA resume TP=2 -> PP=2: step-3 loss {resumed['grpo/loss']:.8f} vs {expected['grpo/loss']:.8f}")
    _assert_close([expected], [resumed], "resume at PP=2")

    saved = dist_checkpointing.load_tensors_metadata(str(tmp_path / "run" / "checkpoints" / "step_00000002"))
    model_keys = [key for key in saved if not key.startswith("optimizer")]
    assert model_keys and all(".lora." in key for key in model_keys), sorted(model_keys)[:5]
    assert "other weights" in refusals["other base"], refusals["other base"]
    assert "holds LoRA adapters" in refusals["no lora"], refusals["no lora"]
    assert "model.lora.rank=4" in refusals["other rank"], refusals["other rank"]


def test_lora_trains_in_bf16(hf_dir, tmp_path: Path):
    losses, dtypes, finite = run_ranks(_bf16_body, 2, hf_dir, str(tmp_path / "bf16"), timeout_s=180)[0]
    assert finite and dtypes == {"torch.bfloat16"}
    assert losses[0]["grpo/kl_ref"] == 0.0, "fresh bf16 adapters (B = 0) must leave the base exactly"
    assert losses[0]["grpo/ratio_max"] == losses[0]["grpo/ratio_min"] == 1.0
    assert losses[1]["grpo/kl_ref"] > 0.0, "the bf16 adapters did not move"
