"""Megatron DDP, the Megatron optimizer and its learning-rate schedule, built from our config.

The actor's chunks are wrapped in Megatron's ``DistributedDataParallel`` (gradients in one fp32
buffer, reduced once per step) and handed to ``get_megatron_optimizer``: the distributed optimizer
shards Adam state and fp32 main weights over the data-parallel ranks (ZeRO-1); gradient clipping and
bf16/fp16 main-weight bookkeeping are Megatron's. The schedule is Megatron's
``OptimizerParamScheduler``, stepped once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from atropos_megatron.config import ModelConfig, OptimizerConfig
from atropos_megatron.trainer.model import TORCH_DTYPES


@dataclass
class TrainState:
    """The actor, wrapped for training, with what updates it."""

    chunks: list[torch.nn.Module]
    """DDP-wrapped model chunks (one per virtual pipeline stage)."""
    optimizer: Any
    """Megatron optimizer (``ChainedOptimizer``/``DistributedOptimizer``/...)."""
    scheduler: Any
    """Megatron ``OptimizerParamScheduler``."""


def build_train_state(
    chunks: Sequence[torch.nn.Module], model: ModelConfig, cfg: OptimizerConfig, *, total_steps: int
) -> TrainState:
    """Wrap ``chunks`` in DDP and build the optimizer and schedule (collective over the job)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from atropos_megatron.trainer.megatron_patches import apply_distopt_checkpoint_patches

    if cfg.use_distributed_optimizer:
        apply_distopt_checkpoint_patches()
    transformer_config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    wrapped = [
        # Only the first chunk buckets its gradients (Megatron-LM does the same for VPP).
        DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # every data-parallel replica starts from the same weights
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=cfg.name,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            sgd_momentum=0.0,
            clip_grad=cfg.clip_grad,
            bf16=model.dtype == "bf16",
            fp16=model.dtype == "fp16",
            params_dtype=TORCH_DTYPES[model.dtype],
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        ),
        wrapped,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    # What Megatron's schedules call between micro-batches and after the last one.
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.grad_scale_func = optimizer.scale_loss
    return TrainState(chunks=wrapped, optimizer=optimizer, scheduler=scheduler)


def zero_grads(state: TrainState) -> None:
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()


def optimizer_step(state: TrainState) -> dict[str, float]:
    """Clip, step and advance the schedule; the metrics Megatron reports for the step."""
    lr = float(
        state.optimizer.param_groups[0]["lr"]
    )  # the rate this step uses (set by the last schedule step)
    updated, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(increment=1)
    return {
        "optim/lr": lr,
        "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "optim/skipped": float(not updated),
    }
