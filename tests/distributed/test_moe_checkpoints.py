"""MoE weights through every path: the converter, the streaming HF loader, distributed checkpoints
across expert-parallel layouts, and the weight export, each against what ``transformers`` stores.

Per architecture (Qwen3-MoE, Mixtral): ``convert hf-to-mcore --tp 2 --ep 2`` and back is bit-exact;
four gloo ranks stream the HF checkpoint into EP=2 x TP=2 (each EP rank reading only its experts),
export it (bit-exact HF tensors, per-expert names), save it, load that checkpoint at EP=1 and the
converter's at EP=2 x PP=2, each with HF's logits; the EP=2 checkpoint converts back bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

TOLERANCE = 4e-6  # fp32 logits; HF's own fp32 logits are ~2e-6 from fp64 on these models
ARCHITECTURES = ("qwen3_moe", "mixtral")
LAYOUTS = {
    "EP=1": {},
    "EP=2 TP=2": dict(expert_parallel_size=2, tensor_parallel_size=2, sequence_parallel=True),
    "EP=2 PP=2": dict(expert_parallel_size=2, pipeline_parallel_size=2),
}


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _convert_body(rank, world_size, root, direction):
    from atropos_megatron.weights.convert import hf_to_mcore, mcore_to_hf
    from tests.hf_models import save_tiny_checkpoint

    results = {}
    for model_type in ARCHITECTURES:
        case = Path(root) / model_type
        if direction == "to-mcore":
            save_tiny_checkpoint(model_type, case / "hf", max_position_embeddings=12)
            report = hf_to_mcore(case / "hf", case / "mcore", tp=2, ep=2, verify_logits=True)
            mcore_to_hf(case / "mcore", case / "hf_round_trip", max_shard_bytes=64 * 1024)
        else:  # the checkpoint the trainer's layout wrote at EP=2 x TP=2, back to HF
            report = mcore_to_hf(case / "ep2_tp2", case / "hf_from_ep2", verify_logits=True)
        results[model_type] = (report.agreement.max_abs_diff, report.verified)
    return results


def _layouts_body(rank, world_size, root):
    from transformers import AutoModelForCausalLM

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.dist_checkpoint import load_model, save_model
    from atropos_megatron.weights.export import export_hf_tensors, is_export_sender
    from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights, side_files
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from tests.layouts import full_logits

    parallel.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "position_ids": torch.arange(12).expand(2, 12)}
    measured, exported, read_bytes = {}, {}, {}

    def fresh(name, seed):
        layout = ParallelConfig(**LAYOUTS[name])
        coords = parallel.setup_model_parallel(layout, seed=seed)  # a different random init each time
        return build_model(cfg, layout), coords

    def check(label, chunks):
        got = full_logits(chunks, batch, cfg.vocab_size)
        if got is not None:
            measured[label] = (got - expected).abs().max().item()
        tensors = dict(export_hf_tensors(chunks, cfg))
        if is_export_sender():
            exported[label] = sorted(tensors) == sorted(stored) and all(
                torch.equal(tensors[name], tensor) for name, tensor in stored.items()
            )

    for model_type in ARCHITECTURES:
        case = Path(root) / model_type
        hf_model = AutoModelForCausalLM.from_pretrained(case / "hf").eval()
        with torch.no_grad():
            expected = hf_model(tokens).logits
        cfg = model_config_from_hf(read_hf_config(case / "hf"))
        padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
        source, stored = SafetensorsCheckpoint(case / "hf"), _hf_tensors(case / "hf")

        chunks, coords = fresh("EP=2 TP=2", seed=3)
        counted = []
        load_hf_weights(
            chunks, source, cfg, padded_vocab=padded, tp_rank=coords.tp_rank, tp_size=coords.tp,
            progress=counted.append,
        )  # fmt: skip
        read_bytes[model_type] = (sum(counted), source.total_bytes)
        check(f"{model_type} HF->EP=2 TP=2", chunks)
        save_model(chunks, case / "ep2_tp2", model=cfg, padded_vocab=padded, hf_files=side_files(case / "hf"))

        chunks, coords = fresh("EP=1", seed=4)
        load_model(chunks, case / "ep2_tp2")
        check(f"{model_type} EP=2 TP=2 ckpt->EP=1", chunks)

        chunks, coords = fresh("EP=2 PP=2", seed=5)
        load_model(chunks, case / "mcore")
        check(f"{model_type} converted ckpt->EP=2 PP=2", chunks)
    return measured, exported, read_bytes


def test_moe_weights_convert_load_save_and_export_across_expert_layouts(tmp_path, report):
    (converted,) = run_ranks(_convert_body, 1, str(tmp_path), "to-mcore", timeout_s=400)
    results = run_ranks(_layouts_body, 4, str(tmp_path), timeout_s=600)
    (from_ep2,) = run_ranks(_convert_body, 1, str(tmp_path), "to-hf", timeout_s=400)

    lines = []
    for model_type in ARCHITECTURES:
        case = tmp_path / model_type
        source = _hf_tensors(case / "hf")
        assert any(".experts.3." in name for name in source)  # per-expert names, as on disk
        for converted_dir in ("hf_round_trip", "hf_from_ep2"):
            back = _hf_tensors(case / converted_dir)
            assert sorted(back) == sorted(source), converted_dir
            for name, tensor in source.items():
                assert torch.equal(back[name], tensor), f"{model_type} {converted_dir}: {name} changed"
        for label, (diff, passes) in ((f"{model_type} converter", converted[model_type]),
                                      (f"{model_type} EP=2 ckpt->HF", from_ep2[model_type])):  # fmt: skip
            lines.append(f"{label} {diff:.1e}")
            assert passes and diff < TOLERANCE, (label, diff)

    merged, exported, read = {}, {}, {}
    for measured, exports, read_bytes in results:
        exported.update(exports)
        read.setdefault("ranks", []).append(read_bytes)
        for key, diff in measured.items():
            merged[key] = max(diff, merged.get(key, 0.0))
    assert len(merged) == 3 * len(ARCHITECTURES) and len(exported) == len(merged)
    for key, diff in merged.items():
        assert diff < TOLERANCE, f"{key}: {diff}"
    assert all(exported.values()), exported
    # Each EP rank streams only its own experts (half of them) and what every rank needs.
    for model_type in ARCHITECTURES:
        per_rank = [ranks[model_type] for ranks in read["ranks"]]
        assert all(got < total for got, total in per_rank), per_rank
    report(
        "bit-exact round trips and exports; logits: "
        + ", ".join(lines + [f"{k} {v:.1e}" for k, v in sorted(merged.items())])
        + "; bytes read per rank of the HF checkpoint: "
        + ", ".join(f"{m} {read['ranks'][0][m][0]}/{read['ranks'][0][m][1]}" for m in ARCHITECTURES)
    )
