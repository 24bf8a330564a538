"""The one seam to Megatron's pipeline schedules: forward (and backward) over micro-batches.

Every pass over the model — the GRPO training step, the old/reference log-prob passes, tests —
goes through :func:`forward_backward`, which hands Megatron a forward-step function and a loss
function bound to the micro-batch. With pipeline parallelism only the last stage computes the loss;
the other stages return ``[]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(micro_batch, output) -> (loss, metrics)``. ``output`` is this rank's logits shard
``[b, s, V/TP]``; ``loss`` is a scalar that Megatron divides by the number of micro-batches before
backward; ``metrics`` is collected per micro-batch and returned on the last pipeline stage."""


def forward_backward(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[Batch],
    *,
    loss_fn: LossFn,
    forward_only: bool = False,
) -> list[dict[str, Any]]:
    """Run Megatron's schedule (1F1B, interleaved or none, per the layout) over ``micro_batches``.

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage).
        micro_batches: each with ``tokens`` ``[b, s]`` int64, ``position_ids`` ``[b, s]`` and
            optionally ``cu_seqlens`` + ``max_seqlen`` (packed: ``b`` = 1, the row's sequences in THD
            form), ``attention_mask`` (bool ``[b, 1, s, s]``, True = masked) and ``routed_experts``
            (``[b, s, layers, k]``, -1 = unknown: the experts to replay where a ``RoutingReplay`` is
            installed on the chunks); all of one shape.
        loss_fn: see :data:`LossFn`.
        forward_only: skip backward (evaluation, log-prob passes).

    Returns:
        The metrics dict of each micro-batch on the last pipeline stage, ``[]`` elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    batch_size, seq_length = micro_batches[0]["tokens"].shape

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        replay = _routing_replay(model)
        if replay is not None:  # MoE with grpo.routing_replay: the engine's experts for these tokens
            replay.begin_forward(batch.get("routed_experts"), for_backward=not forward_only)
        try:
            output = model(
                batch["tokens"],
                batch["position_ids"],
                attention_mask=batch.get("attention_mask"),
                packed_seq_params=packed_seq_params(batch),
            )
        finally:
            if replay is not None:
                replay.end_forward()
        return output, functools.partial(loss_fn, batch)

    for chunk in chunks:
        replay = _routing_replay(chunk)
        if replay is not None:
            replay.reset()
    # The interleaved schedule pulls micro-batches for each chunk from that chunk's own iterator.
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=batch_size,
        forward_only=forward_only,
    )


def on_model_device(batch: dict[str, Any]) -> dict[str, Any]:
    """The micro-batch's tensors on this rank's GPU (the model's device); unchanged on CPU."""
    if not torch.cuda.is_available():
        return batch
    device = torch.device("cuda", torch.cuda.current_device())
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def packed_seq_params(batch: Batch):
    """Megatron's ``PackedSeqParams`` (THD) for a packed micro-batch; None for padded rows."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens, longest = batch["cu_seqlens"], int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def _routing_replay(model: torch.nn.Module):
    """The chunk's ``trainer.routing_replay.RoutingReplay``, if one is installed (through DDP wrappers)."""
    from atropos_megatron.weights.export import unwrap_chunk

    return getattr(unwrap_chunk(model), "routing_replay", None)
