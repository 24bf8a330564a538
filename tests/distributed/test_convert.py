"""Checkpoint conversion end to end: HF -> Megatron torch_dist -> HF, and checkpoints across layouts.

The HF side is a real ``save_pretrained`` directory of a tiny random model with a locally built
tokenizer; the Megatron side is a real ``dist_checkpointing`` checkpoint. Every comparison is with
what ``transformers`` itself computes or stores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-4
REPO = Path(__file__).resolve().parents[2]


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ------------------------------------------------------------------------------------------------
# Round trip, every architecture, in one process (the converter's functions, not the CLI)
# ------------------------------------------------------------------------------------------------

ROUND_TRIPS = [(model_type, "fp32") for model_type in ("llama", "qwen2", "qwen3", "mistral")] + [
    ("qwen2", "bf16")
]


def _round_trip_body(rank, world_size, root):
    from atropos_megatron.weights.convert import hf_to_mcore, mcore_to_hf
    from tests.hf_models import save_tiny_checkpoint

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = {}
    for model_type, dtype in ROUND_TRIPS:
        case = Path(root) / f"{model_type}-{dtype}"
        save_tiny_checkpoint(model_type, case / "hf", dtype=dtypes[dtype])
        to_mcore = hf_to_mcore(case / "hf", case / "mcore", tp=2, pp=2, verify_logits=True)
        # Small shards: the index and several files are exercised even for a tiny model.
        to_hf = mcore_to_hf(case / "mcore", case / "hf_out", max_shard_bytes=64 * 1024, verify_logits=True)
        results[(model_type, dtype)] = (to_mcore.agreement, to_mcore.tolerance, to_hf.agreement)
    _megatron_lm_style_checkpoint(Path(root) / "megatron-lm")
    return results


def _megatron_lm_style_checkpoint(case: Path) -> None:
    """A checkpoint as Megatron-LM writes it: vocabulary padded to 128 x TP (here 384 rows), no sidecar,
    no HF config inside. mcore-to-hf needs --hf-config for it and must still be bit-exact."""
    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.weights.convert import ConversionError, mcore_to_hf, single_process_group
    from atropos_megatron.weights.dist_checkpoint import HF_CONFIG_DIR, SIDECAR, save_model
    from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from tests.hf_models import save_tiny_checkpoint

    save_tiny_checkpoint("llama", case / "hf")
    cfg = model_config_from_hf(read_hf_config(case / "hf"))
    with single_process_group():
        (chunk,) = build_model(cfg, ParallelConfig(), padded_vocab=384)
        source = SafetensorsCheckpoint(case / "hf")
        load_hf_weights([chunk], source, cfg, padded_vocab=384, tp_rank=0, tp_size=1)
        save_model([chunk], case / "mcore", model=cfg, padded_vocab=384)
    (case / "mcore" / SIDECAR).unlink()
    assert not (case / "mcore" / HF_CONFIG_DIR).exists()
    try:
        mcore_to_hf(case / "mcore", case / "no_config")
        raise AssertionError("a checkpoint without an HF config converted without --hf-config")
    except ConversionError as exc:
        assert "--hf-config" in str(exc)
    mcore_to_hf(case / "mcore", case / "hf_out", hf_config_dir=case / "hf")


def test_hf_to_megatron_to_hf_is_bit_exact_for_every_architecture(tmp_path, report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (results,) = run_ranks(_round_trip_body, 1, str(tmp_path), timeout_s=400)
    lines = []
    for (model_type, dtype), (to_mcore, tolerance, to_hf) in results.items():
        case = tmp_path / f"{model_type}-{dtype}"
        lines.append(f"{model_type} {dtype}: HF vs Megatron {to_mcore.max_abs_diff:.1e}")
        assert to_mcore.passes(tolerance), (model_type, dtype, to_mcore.describe())
        assert to_mcore.top1_agreement == 1.0 if dtype == "fp32" else to_mcore.top1_agreement > 0.9
        assert to_hf.passes(tolerance), (model_type, dtype, to_hf.describe())
        if dtype == "fp32":
            assert to_mcore.max_abs_diff < TOLERANCE
        source, converted = _hf_tensors(case / "hf"), _hf_tensors(case / "hf_out")
        assert sorted(converted) == sorted(source)
        for name, tensor in source.items():
            assert converted[name].dtype == tensor.dtype, name
            assert torch.equal(converted[name], tensor), f"{model_type} {dtype}: {name} changed"
        assert len(list((case / "hf_out").glob("model-*-of-*.safetensors"))) > 1
        assert (case / "hf_out" / "model.safetensors.index.json").is_file()
        # Loadable by transformers as is, tokenizer included, with the source's config.
        for file in (case / "hf").iterdir():
            if file.suffix != ".safetensors" and file.name != "config.json":
                assert (case / "hf_out" / file.name).read_bytes() == file.read_bytes(), file.name
        text = "w5 w7 w249"
        tokenizer = AutoTokenizer.from_pretrained(case / "hf_out")
        assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(case / "hf")(text).input_ids
        config = AutoModelForCausalLM.from_pretrained(case / "hf_out").config
        assert config.to_dict()["tie_word_embeddings"] == (model_type == "qwen2")
    source, converted = (
        _hf_tensors(tmp_path / "megatron-lm" / "hf"),
        _hf_tensors(tmp_path / "megatron-lm" / "hf_out"),
    )
    assert sorted(converted) == sorted(source)
    assert all(torch.equal(converted[name], tensor) for name, tensor in source.items())
    report("round trip bit-exact; " + ", ".join(lines))


# ------------------------------------------------------------------------------------------------
# Checkpoints across layouts: written at TP=2, read at TP=1 and PP=2, written at TP=1, read at TP=2
# ------------------------------------------------------------------------------------------------

LAYOUTS = {"TP=1": {}, "TP=2": dict(tensor_parallel_size=2), "PP=2": dict(pipeline_parallel_size=2)}


def _layouts_body(rank, world_size, root):
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.trainer.step import forward_backward
    from atropos_megatron.weights.dist_checkpoint import load_model, save_model
    from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from tests.hf_models import save_tiny_checkpoint

    parallel.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "position_ids": torch.arange(12).expand(2, 12)}
    measured = {}

    def logits_of(chunks, coords):
        out = []

        def keep(batch, output, out=out):
            out.append(tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()))
            return output.sum() * 0.0, {}

        forward_backward(chunks, [batch], loss_fn=keep, forward_only=True)
        return out[0] if coords.is_last_stage else None

    def fresh(layout_name, seed):
        layout = ParallelConfig(**LAYOUTS[layout_name])
        coords = parallel.setup_model_parallel(layout, seed=seed)  # a different random init each time
        return build_model(cfg, layout), coords

    def check(label, chunks, coords):
        got = logits_of(chunks, coords)
        if got is not None:
            measured[label] = (got[..., : cfg.vocab_size] - expected).abs().max().item()

    for model_type in ("qwen2", "llama"):  # tied + padded vocabulary; untied
        case = Path(root) / model_type
        if rank == 0:
            hf_model = save_tiny_checkpoint(model_type, case / "hf", max_position_embeddings=12)
        dist.barrier()
        if rank != 0:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(case / "hf").eval()
        with torch.no_grad():
            expected = hf_model(tokens).logits
        cfg = model_config_from_hf(read_hf_config(case / "hf"))
        padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
        source = SafetensorsCheckpoint(case / "hf")

        # The trainer's initial load: streamed from safetensors into each layout.
        for name in ("TP=2", "PP=2"):
            chunks, coords = fresh(name, seed=3)
            load_hf_weights(
                chunks, source, cfg, padded_vocab=padded, tp_rank=coords.tp_rank, tp_size=coords.tp
            )
            check(f"{model_type} HF->{name}", chunks, coords)
            if name == "TP=2":
                save_model(chunks, case / "tp2", model=cfg, padded_vocab=padded)
        for name in ("TP=1", "PP=2"):
            chunks, coords = fresh(name, seed=4)
            load_model(chunks, case / "tp2")
            check(f"{model_type} TP=2 ckpt->{name}", chunks, coords)
            if name == "TP=1":
                save_model(chunks, case / "tp1", model=cfg, padded_vocab=padded)
        chunks, coords = fresh("TP=2", seed=5)
        load_model(chunks, case / "tp1")
        check(f"{model_type} TP=1 ckpt->TP=2", chunks, coords)
    return measured


def test_checkpoints_load_at_other_layouts(tmp_path, report):
    results = run_ranks(_layouts_body, 2, str(tmp_path), timeout_s=400)
    merged = {}
    for measured in results:
        for key, diff in measured.items():
            merged[key] = max(diff, merged.get(key, 0.0))
    assert len(merged) == 2 * 5
    report("max |HF - Megatron| logits: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(merged.items())))
    for key, diff in merged.items():
        assert diff < TOLERANCE, f"{key}: {diff}"


# ------------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ------------------------------------------------------------------------------------------------


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_command_line_round_trip_verify_and_errors(tmp_path):
    from tests.hf_models import save_tiny_checkpoint

    save_tiny_checkpoint("qwen3", tmp_path / "hf")
    done = _convert(
        "hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "mcore", "--tp", "2", "--verify"
    )
    assert done.returncode == 0, done.stderr
    assert "verify PASS" in done.stdout
    assert not (tmp_path / "mcore.partial").exists()
    sidecar = json.loads((tmp_path / "mcore" / "atropos_megatron.json").read_text())
    assert sidecar["model"]["qk_layernorm"] and sidecar["padded_vocab_size"] == 256

    # Verification that fails exits 1: bf16 HF and Megatron round differently, so not to within 0.
    failed = _convert(
        "mcore-to-hf", "--mcore", tmp_path / "mcore", "--out", tmp_path / "strict", "--dtype", "bf16",
        "--verify", "--tolerance", "0",
    )  # fmt: skip
    assert failed.returncode == 1, failed.stderr
    assert "verify FAIL" in failed.stdout

    # A config that does not describe the checkpoint's model is refused before anything is written.
    other = tmp_path / "other_config"
    other.mkdir()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    mismatch = _convert(
        "mcore-to-hf", "--mcore", tmp_path / "mcore", "--out", tmp_path / "x", "--hf-config", other
    )  # fmt: skip
    assert mismatch.returncode == 2 and "norm_epsilon" in mismatch.stderr
    assert not (tmp_path / "x").exists()

    # Existing output is never overwritten.
    again = _convert("hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "mcore")
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "3"], "tensor_parallel_size=3 does not divide model.num_attention_heads=4"),
        (["--pp", "4"], "does not divide model.num_layers=2"),
        (["--make-vocab-size-divisible-by", "250", "--tp", "4"], "does not divide the padded vocabulary"),
    ],
)
def test_layouts_that_do_not_fit_fail_before_any_work(tmp_path, args, message):
    from tests.hf_models import save_tiny_checkpoint

    save_tiny_checkpoint("llama", tmp_path / "hf")
    done = _convert("hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "out", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_inputs_are_named(tmp_path):
    no_hf = _convert("hf-to-mcore", "--hf", tmp_path / "nope", "--out", tmp_path / "out")
    assert no_hf.returncode == 2 and "no config.json" in no_hf.stderr
    (tmp_path / "empty").mkdir()
    no_ckpt = _convert("mcore-to-hf", "--mcore", tmp_path / "empty", "--out", tmp_path / "out")
    assert no_ckpt.returncode == 2 and "not a Megatron distributed checkpoint" in no_ckpt.stderr
