"""Megatron models of tiny HF checkpoints at a given layout, and their logits, for the layout tests.

Used inside ``tests.harness.run_ranks`` bodies (it imports Megatron lazily, after the rank started).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def load_hf_state(cfg, state: Mapping[str, torch.Tensor], sizes: Mapping, *, seed: int = 1):
    """``(chunks, coords)``: a model of ``cfg`` at the layout ``ParallelConfig(**sizes)`` holding the HF
    tensors ``state`` (a different random init underneath each time, so a tensor the load misses shows)."""
    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.hf_mapping import hf_to_megatron
    from atropos_megatron.weights.megatron_shards import load_full_state_dict

    layout = ParallelConfig(**sizes)
    coords = parallel.setup_model_parallel(layout, seed=seed)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, coords.tp)
    chunks = build_model(cfg, layout)
    full = dict(hf_to_megatron(state.items(), cfg, padded_vocab=padded))
    load_full_state_dict(chunks, full, tp_rank=coords.tp_rank, tp_size=coords.tp)
    return chunks, coords


def full_logits(chunks, batch: dict, vocab_size: int) -> torch.Tensor | None:
    """One forward pass's logits over the real vocabulary (gathered over TP) on the last pipeline
    stage; None on the other stages."""
    from megatron.core import tensor_parallel

    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.step import forward_backward

    kept = []

    def keep(batch, output):
        kept.append(tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()))
        return output.sum() * 0.0, {}

    forward_backward(chunks, [batch], loss_fn=keep, forward_only=True)
    return kept[0][..., :vocab_size] if parallel.current_layout().is_last_stage else None
