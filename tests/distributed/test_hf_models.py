"""Megatron models built from HF configs, loaded through the mapping, give HF's logits at every layout.

For each architecture (Llama 3.1 with llama3 RoPE scaling, Qwen2 with QKV bias and tied embeddings,
Qwen3 with q/k norm and a wide head_dim, Mistral), a tiny HF model with random weights is the
reference; two gloo ranks run it as TP=1 (x DP=2), TP=2 and PP=2 and compare fp32 logits.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-4
LAYOUTS = {"TP=1": {}, "TP=2": dict(tensor_parallel_size=2), "PP=2": dict(pipeline_parallel_size=2)}
BATCH, SEQ = 2, 12


def _body(rank, world_size):
    import torch

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.weights.hf_architectures import model_config_from_hf
    from tests.hf_models import VARIANTS, hf_state, tiny_hf_model
    from tests.layouts import full_logits, load_hf_state

    parallel.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 250, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
    measured = {}
    for model_type in VARIANTS:
        hf_model = tiny_hf_model(model_type)
        with torch.no_grad():
            expected = hf_model(tokens).logits
        cfg = model_config_from_hf(hf_model.config.to_dict(), max_position_embeddings=SEQ)
        for name, sizes in LAYOUTS.items():
            chunks, _ = load_hf_state(cfg, hf_state(hf_model), sizes)
            got = full_logits(chunks, batch, cfg.vocab_size)
            if got is not None:
                measured[f"{model_type} {name}"] = (got - expected).abs().max().item()
    return measured


def test_hf_logits_equal_megatron_logits_at_every_layout(report):
    results = run_ranks(_body, 2, timeout_s=300)
    merged = {}
    for measured in results:
        for key, diff in measured.items():
            merged[key] = max(diff, merged.get(key, 0.0))
    assert len(merged) == 4 * len(LAYOUTS)
    report(
        "max |HF - Megatron| logits (fp32): " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(merged.items()))
    )
    for key, diff in merged.items():
        assert diff < TOLERANCE, f"{key}: {diff}"
