"""``atropos-megatron train --dry-run``: what a run would build, checked before any GPU is touched.

Reads only the config (and an HF ``config.json`` or a checkpoint's sidecar for the architecture), so
it runs on a laptop for a 70B recipe: the layout is validated, each pipeline rank's parameters are
counted exactly, and the per-GPU memory is estimated (`trainer/memory.py` says how).
"""

from __future__ import annotations

import os
from dataclasses import replace

from atropos_megatron.config import TrainConfig
from atropos_megatron.trainer.memory import estimate_memory, parameter_counts
from atropos_megatron.trainer.model import check_model_layout


def dry_run(cfg: TrainConfig, *, world_size: int | None = None) -> str:
    """The report as text. Raises ValueError (naming the problem) when the layout cannot work."""
    from atropos_megatron.trainer.loop import resolve_model
    from atropos_megatron.trainer.megatron_patches import te_available

    model, _ = resolve_model(cfg.model)
    check_model_layout(model, cfg.parallel)
    world = world_size or _launcher_world_size() or cfg.parallel.model_parallel_size
    cfg = replace(cfg, model=model)
    estimate = estimate_memory(cfg, world, fused_attention=te_available())
    layout = cfg.parallel
    lines = [
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
        f"({model.query_groups} kv), ffn {model.ffn_hidden_size}, vocab {model.vocab_size}, {model.dtype}",
        f"layout: world {world} = TP {layout.tensor_parallel_size} x PP {layout.pipeline_parallel_size}"
        f"{f' (VPP {layout.virtual_pipeline_parallel_size})' if layout.virtual_pipeline_parallel_size else ''}"
        f" x CP {layout.context_parallel_size} x DP {estimate.data_parallel_size}",
        "parameters per tensor-parallel rank:",
    ]
    for stage in parameter_counts(model, layout):
        lines.append(
            f"  pipeline rank {stage.pp_rank} chunk {stage.chunk}: {stage.num_layers} layers, "
            f"{stage.total:,} parameters"
        )
    lines.append(estimate.format_table())
    lines.append(
        f"reference model: {'built (grpo.kl_coef > 0)' if cfg.grpo.kl_coef > 0 else 'not built (grpo.kl_coef = 0)'}; "
        f"attention: {'fused (Transformer Engine)' if te_available() else 'local spec (unfused, s^2 scores)'}"
    )
    return "\n".join(lines)


def _launcher_world_size() -> int | None:
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None
