"""Weight export at every layout gives back the HF checkpoint the model was loaded from, bit for bit.

One set of 4 gloo ranks loads a tiny HF checkpoint (untied Llama; tied Qwen2 with a padded vocabulary)
into each layout with the trainer's own loader, exports it, and the sender compares every exported
tensor with the checkpoint's (fp32: equal; a bf16 export: equal to the checkpoint cast to bf16). The
4-layer models let PP=2 x VPP=2 split them; with 4 ranks, every layout but TP=2 x PP=2 also has
data-parallel replicas, which must take no part.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

WORLD_SIZE = 4
LAYOUTS = {
    "TP=1 (DP=4)": {},
    "TP=2 (DP=2)": dict(tensor_parallel_size=2),
    "PP=2 (DP=2)": dict(pipeline_parallel_size=2),
    "TP=2xPP=2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "PP=2xVPP=2 (DP=2)": dict(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2),
}
BUCKET_BYTES = 16 * 1024  # smaller than the embedding (250 x 64 x 4 bytes): it must travel alone


def _export_body(rank, world_size, root):
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.export import export_hf_buckets, is_export_sender
    from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from tests.hf_models import save_tiny_checkpoint

    parallel.init_distributed(ParallelConfig(), seed=0)
    summary = {}
    for model_type in ("llama", "qwen2"):
        case = Path(root) / model_type
        if rank == 0:
            save_tiny_checkpoint(model_type, case, num_hidden_layers=4)
        dist.barrier()
        source = load_file(case / "model.safetensors")
        cfg = model_config_from_hf(read_hf_config(case))
        padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
        assert padded > cfg.vocab_size  # the padding must be cut on export
        for name, sizes in LAYOUTS.items():
            layout = ParallelConfig(**sizes)
            coords = parallel.setup_model_parallel(layout, seed=1)
            chunks = build_model(cfg, layout)
            checkpoint = SafetensorsCheckpoint(case)
            load_hf_weights(
                chunks, checkpoint, cfg, padded_vocab=padded, tp_rank=coords.tp_rank, tp_size=coords.tp
            )
            if name == "TP=2 (DP=2)":
                chunks = [_wrap(_wrap(chunk)) for chunk in chunks]  # DDP(Float16Module(GPTModel))
            dtypes = (None, torch.bfloat16) if name == "TP=2xPP=2" else (None,)
            for dtype in dtypes:
                sent = []
                buckets = export_hf_buckets(
                    chunks, cfg, bucket_bytes=BUCKET_BYTES, dtype=dtype, progress=sent.append
                )
                received = [_check_bucket(b) for b in buckets]
                key = (model_type, name, str(dtype))
                summary[key] = (is_export_sender(), len(received), sum(sent))
                if is_export_sender():
                    _check_tensors(key, [pair for bucket in received for pair in bucket], source, dtype)
                else:
                    assert not received, f"{key}: rank {rank} is not the sender but got buckets"
    summary["unmarked"] = _export_of_unmarked_model(cfg)
    return summary


def _export_of_unmarked_model(cfg):
    """Megatron marks how weights are split only while initialising them: without the marks the export
    must refuse (before any communication) rather than send one TP shard as the full tensor."""
    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.weights.export import export_hf_buckets

    layout = ParallelConfig(tensor_parallel_size=2)
    coords = parallel.setup_model_parallel(layout, seed=1)
    chunks = build_model(cfg, layout, initialize=False)
    try:
        list(export_hf_buckets(chunks, cfg, bucket_bytes=BUCKET_BYTES))
    except ValueError as exc:
        assert "linear_qkv.weight" in str(exc) and "perform_initialization" in str(exc), exc
        return "refused"
    return "replica" if coords.dp_rank else "exported"


def _wrap(module):
    """Stands in for Megatron's DDP / Float16Module, which keep the model as ``.module``."""
    import torch

    wrapper = torch.nn.Module()
    wrapper.module = module
    return wrapper


def _check_bucket(bucket):
    """The bucket's tensors, cloned (the test keeps them past the bucket), after checking its bounds."""
    assert bucket.nbytes <= BUCKET_BYTES or len(bucket.tensors) == 1, (bucket.nbytes, len(bucket.tensors))
    assert len({spec.dtype for spec in bucket.tensors}) == 1
    return [(name, tensor.clone()) for name, tensor in bucket.named_tensors()]


def _check_tensors(key, exported, source, dtype):
    import torch

    names = [name for name, _ in exported]
    assert len(names) == len(set(names)), (
        f"{key}: duplicated {sorted({n for n in names if names.count(n) > 1})}"
    )
    assert sorted(names) == sorted(source), f"{key}: {sorted(set(names) ^ set(source))}"
    for name, tensor in exported:
        expected = source[name] if dtype is None else source[name].to(dtype)
        assert tensor.dtype == expected.dtype, f"{key}: {name} is {tensor.dtype}"
        assert torch.equal(tensor, expected), f"{key}: {name} differs"


def test_export_returns_the_loaded_checkpoint_at_every_layout(tmp_path, report):
    results = run_ranks(_export_body, WORLD_SIZE, str(tmp_path), timeout_s=240)
    assert [summary.pop("unmarked") for summary in results] == ["refused", "refused", "replica", "replica"]
    keys = results[0].keys()
    assert len(keys) == 2 * (len(LAYOUTS) + 1)
    for key in keys:
        senders = [rank for rank, summary in enumerate(results) if summary[key][0]]
        assert senders == [0], f"{key}: senders {senders}"
        _, buckets, total_bytes = results[0][key]
        assert buckets > 2 and total_bytes > 0
        assert all(summary[key][1:] == (0, 0) for summary in results[1:])
    report(
        "bit-exact: "
        + ", ".join(f"{m} {layout}{'' if d == 'None' else ' bf16'}" for m, layout, d in keys)
        + f"; buckets per export (llama, TP=1) {results[0][('llama', 'TP=1 (DP=4)', 'None')][1]}"
    )
