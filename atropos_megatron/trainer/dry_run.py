"""``atropos-megatron train --dry-run``: what a run would build, checked before any GPU is touched.

Reads only the config (and an HF ``config.json`` or a checkpoint's sidecar for the architecture), so
it runs on a laptop for a 70B recipe: the layout is validated, each pipeline rank's parameters are
counted exactly, and the per-GPU memory is estimated (`trainer/memory.py` says how). When
``model.hf_path`` names a checkpoint that is not on this machine (a cluster path), the architecture
fields of the config's ``model`` section stand in for its config.json. The world size is the one the
job will have: ``--world-size``, else the launcher's variables, else the ``launch`` section's trainer
ranks, else one model replica.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from atropos_megatron.config import LaunchConfig, ModelConfig, ParallelConfig, TrainConfig
from atropos_megatron.launch.topology import check_topology, trainer_procs_per_node, trainer_world_size
from atropos_megatron.trainer.checkpoint import lora_base_path
from atropos_megatron.trainer.memory import data_parallel_sizes, estimate_memory, parameter_counts
from atropos_megatron.trainer.model import check_model_layout, uses_te_spec


def dry_run(cfg: TrainConfig, *, world_size: int | None = None) -> str:
    """The report as text. Raises ValueError (naming the problem) when the layout cannot work."""
    try:
        check_topology(cfg.launch)
    except ValueError as exc:  # TopologyError: the launch section cannot be laid out
        raise ValueError(f"launch section: {exc}") from None
    base = lora_base_path(cfg.model) if cfg.model.lora.enabled else None
    model, note = _architecture(cfg.model)
    check_model_layout(model, cfg.parallel)
    if cfg.data.max_token_len > model.max_position_embeddings:
        raise ValueError(
            f"data.max_token_len={cfg.data.max_token_len} exceeds the model's max_position_embeddings="
            f"{model.max_position_embeddings}"
        )
    world, source = _world_size(cfg, world_size)
    layout = cfg.parallel
    try:
        data_parallel_sizes(layout, world)
    except ValueError as exc:  # name where the world size came from
        raise ValueError(
            str(exc).replace(f"world size {world}", f"world size {world} ({source})", 1)
        ) from None
    # The estimate reads hf_path itself; hand it the architecture resolved here instead.
    cfg = replace(cfg, model=replace(model, hf_path=None, dist_checkpoint=None))
    # The trainer's attention keeps no scores: TE's fused kernels, or SDPA on the local spec.
    estimate = estimate_memory(cfg, world, fused_attention=True)
    lines = [note] if note else []
    moe = model.moe.enabled
    dense_mlp = len(model.moe_layers) < model.num_layers
    lines += [
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
        f"({model.query_groups} kv), {f'ffn {model.ffn_hidden_size}, ' if dense_mlp else ''}"
        f"vocab {model.vocab_size}, {model.dtype}",
        *([_moe_line(model)] if moe else []),
        f"layout: world {world} ({source}) = TP {layout.tensor_parallel_size} x PP "
        f"{layout.pipeline_parallel_size}"
        f"{f' (VPP {layout.virtual_pipeline_parallel_size})' if layout.virtual_pipeline_parallel_size else ''}"
        f" x CP {layout.context_parallel_size} x DP {estimate.data_parallel_size}",
        *([_expert_layout_line(model, layout, estimate.expert_data_parallel_size)] if moe else []),
        f"parameters per tensor-parallel{' and expert-parallel' if moe else ''} rank:",
    ]
    for stage in parameter_counts(model, layout):
        layers = f"{stage.num_layers} layers" + (f" ({stage.moe_layers} MoE)" if moe else "")
        experts = f" ({stage.expert_params:,} in experts)" if moe else ""
        lines.append(
            f"  pipeline rank {stage.pp_rank} chunk {stage.chunk}: {layers}, "
            f"{stage.total:,} parameters{experts}"
        )
    lines.append(estimate.format_table())
    if cfg.grpo.kl_coef == 0:
        reference = "not built (grpo.kl_coef = 0)"
    elif model.lora.enabled:
        reference = "the frozen base with the LoRA adapters off (no second copy)"
    else:
        reference = "built (grpo.kl_coef > 0)"
    if model.lora.enabled:
        lora = model.lora
        lines.append(
            f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}{' (rsLoRA)' if lora.use_rslora else ''} on "
            f"{', '.join(lora.target_modules)}; the base ({base}) is frozen, "
            "checkpoints hold the adapters and their optimizer state only"
        )
    lines.append(
        f"reference model: {reference}; "
        f"attention: {'Transformer Engine (fused)' if uses_te_spec(model) else 'PyTorch SDPA (local spec)'}"
    )
    lines.append(spool_estimate(cfg))
    return "\n".join(lines)


def _moe_line(model: ModelConfig) -> str:
    """What each MoE layer holds and how it routes."""
    moe = model.moe
    dense = (
        f"; dense MLP ({model.ffn_hidden_size} wide) in layers {moe.dense_layers}" if moe.dense_layers else ""
    )
    return (
        f"MoE: {len(model.moe_layers)} of {model.num_layers} layers, {moe.num_experts} experts each "
        f"({model.expert_ffn_hidden_size} wide), top {moe.router_topk}"
        f"{' renormalised' if moe.normalize_topk else ''} per token{dense}"
    )


def _expert_layout_line(model: ModelConfig, layout: ParallelConfig, expert_data_parallel_size: int) -> str:
    """Where the experts live: EP, their TP split, the expert-DP group and the dispatcher."""
    ep, tp = layout.expert_parallel_size, layout.tensor_parallel_size
    return (
        f"experts: EP {ep} x expert TP {tp} x PP {layout.pipeline_parallel_size} x expert DP "
        f"{expert_data_parallel_size}; each GPU holds {model.moe.num_experts // ep} of "
        f"{model.moe.num_experts} experts per MoE layer, {f'each split {tp} ways by TP' if tp > 1 else 'whole'}; "
        f"expert gradients and optimizer state over expert DP; {layout.moe_token_dispatcher} dispatcher"
    )


SPOOL_BYTES_PER_TOKEN = 21
"""A spooled batch's bytes per token at most: input ids, labels (int32), loss mask (1 byte), and the
environment's advantages, inference and reference log-probs (float32) when it sends them."""


def spool_estimate(cfg: TrainConfig) -> str:
    """The bridge spool's worst-case disk use: every batch stays until a checkpoint commits it."""
    per_batch = cfg.data.batch_size * cfg.data.max_token_len * SPOOL_BYTES_PER_TOKEN
    interval = cfg.checkpoint.save_interval_steps
    kept = interval if interval else cfg.steps
    batches = kept + 1 + cfg.bridge.prefetch_batches  # + the one handed out + the queued ones
    why = (
        f"{interval} acknowledged until the next checkpoint (checkpoint.save_interval_steps)"
        if interval
        else f"checkpoint.save_interval_steps is 0: all {cfg.steps} steps' batches until the final checkpoint"
    )
    return (
        f"bridge spool ({cfg.bridge.spool_dir}): up to {batches} batches x {_size(per_batch)} = "
        f"{_size(batches * per_batch)} on disk ({why}, 1 handed out, "
        f"{cfg.bridge.prefetch_batches} prefetched; {cfg.data.batch_size} x {cfg.data.max_token_len} tokens "
        f"x {SPOOL_BYTES_PER_TOKEN} B at most)"
    )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 2**10:,.1f} KiB"


def _architecture(model: ModelConfig) -> tuple[ModelConfig, str | None]:
    """The architecture to count, and a note when the config's own fields stand in for a checkpoint.

    A recipe names its checkpoint by a cluster path (``/shared/models/...``) that a laptop does not
    have; the recipe's explicit architecture fields then describe the model instead. A real run always
    reads config.json.
    """
    from atropos_megatron.trainer.loop import resolve_model

    if model.hf_path is not None:
        path = Path(model.hf_path)
        config_json = path / "config.json" if path.is_dir() else path
        if not config_json.is_file():
            note = (
                f"note: {model.hf_path} is not on this machine; using the architecture in the config's "
                "model section"
            )
            return replace(model, hf_path=None, dist_checkpoint=None), note
    resolved, _ = resolve_model(model)
    return resolved, None


def _world_size(cfg: TrainConfig, world_size: int | None) -> tuple[int, str]:
    """The trainer's world size and where it came from (for the report's layout line)."""
    if world_size is not None:
        return world_size, "--world-size"
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]), f"launcher environment {name}"
    launch = cfg.launch
    # A config without a launch section has the defaults, which describe no particular job.
    if launch != LaunchConfig() and trainer_world_size(launch) > 1:
        nodes, procs = launch.train_nodes, trainer_procs_per_node(launch)
        return (
            trainer_world_size(launch),
            f"launch section: {nodes} training node{'s' if nodes > 1 else ''} x "
            f"{procs} trainer rank{'s' if procs > 1 else ''}",
        )
    return cfg.parallel.model_parallel_size, "one model replica"
