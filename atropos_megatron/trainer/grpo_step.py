"""One GRPO update on Megatron: old and reference log-prob passes, then the loss pass, over micro-batches.

Everything runs through ``step.forward_backward`` (Megatron's pipeline schedules), so the same code
serves every TP/PP/VPP/DP layout. Log-probs exist only on the last pipeline stage, which is also the
only stage that computes the loss, so they never travel.

Scaling: Megatron divides each micro-batch's loss by the number of micro-batches, and DDP averages
gradients over data-parallel ranks. Our per-token weights already make the micro-batch losses of all
ranks *sum* to the batch loss (``data/batching.py``), so the loss handed to Megatron is multiplied
by ``micro-batches x DP`` to undo both averages.

Those weights are also the loss aggregation (``grpo.loss_aggregation``): the loss never reads the mode,
so the loss pass first checks that every micro-batch was planned for this pass's config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from atropos_megatron.algo.reduce import aggregation_key
from atropos_megatron.config import GRPOConfig
from atropos_megatron.data.batching import MicroBatch
from atropos_megatron.kernels.grpo_loss import fused_grpo_loss
from atropos_megatron.kernels.logprobs import VocabShard, fused_token_logprobs
from atropos_megatron.trainer import parallel
from atropos_megatron.trainer.step import forward_backward

SUMMED_METRICS = ("grpo/pg_loss", "grpo/loss")
"""Metrics that are already weighted parts of the batch total: they add up across micro-batches."""


def vocab_shard(logits: torch.Tensor, vocab_size: int) -> VocabShard:
    """This rank's slice of the vocabulary for Megatron's vocab-parallel output layer."""
    return _local_vocab_shard(logits.shape[-1], vocab_size)


def weight_shard(weight: torch.Tensor, vocab_size: int) -> VocabShard:
    """The same slice for the output layer's weight shard ``[V/TP, H]`` (``grpo.fused_linear``)."""
    return _local_vocab_shard(weight.shape[0], vocab_size)


def _local_vocab_shard(local_vocab: int, vocab_size: int) -> VocabShard:
    group = parallel.tensor_parallel_group() if parallel.current_layout().tp > 1 else None
    return VocabShard.of_tp_rank(local_vocab, vocab_size, group)


@torch.no_grad()
def token_logprobs_pass(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    *,
    vocab_size: int,
    kernel: str,
    fused_linear: str = "never",
) -> list[torch.Tensor] | None:
    """Log-probs ``[b, s]`` of every micro-batch's labels under ``chunks`` (last stage; None elsewhere).

    ``fused_linear`` (``grpo.fused_linear``): ``never``, from the model's logits; else from the hidden
    states and the output weight, for the trained tokens only (0 elsewhere), in chunks where
    ``always`` or where ``auto`` finds the logits large, so that no ``[tokens, vocab/TP]`` logits exist.
    """
    from atropos_megatron.kernels.fused_linear_grpo import fused_linear_token_logprobs, single_chunk_bytes

    from_hidden = fused_linear != "never"
    hidden_out = output_hidden_states(chunks) if from_hidden else contextlib.nullcontext()
    with eval_mode(chunks), hidden_out as weight:  # eval: no (LoRA) dropout in a policy's log-probs

        def loss_fn(batch: MicroBatch, output: torch.Tensor):
            if from_hidden:
                logprobs = fused_linear_token_logprobs(
                    output,
                    weight,
                    batch["labels"],
                    temperature=batch["temperature"],
                    shard=weight_shard(weight, vocab_size),
                    backend=kernel,
                    mask=batch["loss_mask"],
                    single_chunk_bytes=single_chunk_bytes(fused_linear),
                )
            else:
                logprobs, _ = fused_token_logprobs(
                    output,
                    batch["labels"],
                    temperature=batch["temperature"],
                    shard=vocab_shard(output, vocab_size),
                    backend=kernel,
                )
            return output.new_zeros(()), {"logprobs": logprobs}

        results = forward_backward(chunks, micro_batches, loss_fn=loss_fn, forward_only=True)
    if not parallel.current_layout().is_last_stage:
        return None
    return [result["logprobs"] for result in results]


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The chunks in eval mode inside (dropout off), their previous modes restored after."""
    previous = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for chunk, training in zip(chunks, previous, strict=True):
            chunk.train(training)


def grpo_loss_pass(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[MicroBatch],
    *,
    cfg: GRPOConfig,
    vocab_size: int,
    fused_linear: str = "never",
) -> list[dict[str, Any]]:
    """Forward and backward of the GRPO loss; gradients accumulate in the DDP buffers.

    ``fused_linear`` (``grpo.fused_linear``): ``never``, from the model's logits; else from the hidden
    states and the output weight, trained tokens only, in chunks or (``auto``, small enough) in one.

    On the last stage each micro-batch carries ``ref_logprobs`` when ``cfg.kl_coef > 0``, and
    ``old_logprobs`` unless the pass's own log-probs (detached) are pi_old. Returns each micro-batch's
    metrics there (``[]`` elsewhere).
    """
    from atropos_megatron.kernels.fused_linear_grpo import fused_linear_grpo_loss, single_chunk_bytes

    require_planned_for(micro_batches, cfg)
    scale = len(micro_batches) * parallel.current_layout().dp
    from_hidden = fused_linear != "never"
    hidden_out = output_hidden_states(chunks) if from_hidden else contextlib.nullcontext()
    with hidden_out as weight:

        def loss_fn(batch: MicroBatch, output: torch.Tensor):
            inputs = [batch["labels"], batch.get("old_logprobs")]  # None: this pass's own (on-policy)
            inputs += [batch[name] for name in ("advantages", "loss_mask", "weights")]
            options = dict(
                cfg=cfg,
                ref_logprobs=batch.get("ref_logprobs"),
                inference_logprobs=batch.get("inference_logprobs"),
                sequence_ids=batch.get("sequence_ids"),
                temperature=batch["temperature"],
            )
            if from_hidden:
                loss, metrics = fused_linear_grpo_loss(
                    output, weight, *inputs, shard=weight_shard(weight, vocab_size),
                    single_chunk_bytes=single_chunk_bytes(fused_linear), **options,
                )  # fmt: skip
            else:  # the logits are dead after the loss: their storage takes the gradient (inplace)
                loss, metrics = fused_grpo_loss(
                    output, *inputs, shard=vocab_shard(output, vocab_size), inplace=True, **options
                )
            metrics = {name: float(value) for name, value in metrics.items()}
            metrics["grpo/loss"] = float(loss)
            metrics["tokens"] = batch["trained_tokens"]
            return loss * scale, metrics

        return forward_backward(chunks, micro_batches, loss_fn=loss_fn)


@contextlib.contextmanager
def output_hidden_states(chunks: Sequence[torch.nn.Module]) -> Iterator[torch.Tensor | None]:
    """Inside, the last pipeline stage's model returns its final hidden states ``[b, s, H]`` instead of
    logits; yields the weight its output layer would have used (``[V/TP, H]``; the embedding when
    tied), None on other stages.

    The output layer's forward is replaced (its parameters, names and checkpoints are untouched) by
    what it does to its input before the matmul: under TP, the identity whose backward all-reduces
    the input's gradient (each rank's loss sees only its vocabulary shard), or under sequence
    parallelism the all-gather whose backward reduce-scatters it.
    """
    from megatron.core import tensor_parallel

    from atropos_megatron.weights.export import unwrap_chunk

    patched, weight = [], None
    for chunk in chunks:
        model = unwrap_chunk(chunk)
        if not getattr(model, "post_process", False):
            continue
        layer = model.output_layer
        tied = model.share_embeddings_and_output_weights
        weight = model.shared_embedding_or_output_weight() if tied else layer.weight
        if getattr(model.config, "mtp_num_layers", None):
            raise ValueError("grpo.fused_linear does not support multi-token prediction layers")

        def hidden_out(hidden, weight=None, runtime_gather_output=None, *, _layer=layer):
            if _layer.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=True, group=_layer.tp_group
                )
            else:
                hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=_layer.tp_group)
            return _ContiguousGrad.apply(hidden), None

        layer.forward = hidden_out  # an instance attribute: nn.Module calls it instead of the class's
        patched.append(layer)
    try:
        yield weight
    finally:
        for layer in patched:
            del layer.forward


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    GPTModel returns ``[s, b, H] -> [b, s, H]`` transposed, so for ``b > 1`` the hidden states' gradient
    arrives as a non-contiguous view, and Megatron's copy-to-TP region all-reduces ``grad.contiguous()``
    (a copy) and then returns the unreduced original (megatron-core 0.16.1 ``mappings._reduce``): each
    TP rank would keep only its vocabulary shard's share of ``d/dhidden``.
    """

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def require_planned_for(micro_batches: Sequence[MicroBatch], cfg: GRPOConfig) -> None:
    """Raise unless every micro-batch's ``weights`` were made for ``cfg``'s aggregation.

    Without it, a loss run with one ``grpo.loss_aggregation`` on micro-batches planned with another
    would silently train with the planner's mode (the weights decide; the loss cannot tell).
    """
    expected = aggregation_key(cfg)
    for batch in micro_batches:
        planned = batch.get("aggregation")
        if planned != expected:
            raise ValueError(
                f"micro-batch weights were made for (grpo.loss_aggregation, grpo.loss_norm_length)={planned}"
                f" but the loss runs with {expected}: plan micro-batches (data.batching.plan_micro_batches)"
                " with the GRPO config of the loss"
            )


def combine_metrics(per_micro_batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge micro-batch metrics into one partial record: ``(sum of value x tokens, tokens)`` for means,
    sums for batch totals, extremes for ``*_max`` / ``*_min``. Merge records of ranks the same way
    (:func:`merge_partials`)."""
    return _merge(_partial(metrics) for metrics in per_micro_batch)


def merge_partials(partials: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Reduce :func:`combine_metrics` records (one per rank) to final values."""
    return {
        name: (value[0] / value[1] if value[1] else 0.0) if isinstance(value, tuple) else float(value)
        for name, value in _merge(partials).items()
    }


def _partial(metrics: dict[str, Any]) -> dict[str, Any]:
    """One micro-batch's metrics as a mergeable record (extremes of a micro-batch that trains nothing
    are placeholders and left out)."""
    tokens = metrics.get("tokens", 0)
    record: dict[str, Any] = {}
    for name, value in metrics.items():
        if name == "tokens" or (not tokens and name.endswith(("_max", "_min"))):
            continue
        record[name] = (
            value if name in SUMMED_METRICS or name.endswith(("_max", "_min")) else (value * tokens, tokens)
        )
    return record


def _merge(records) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for record in records:
        for name, value in record.items():
            if name not in merged:
                merged[name] = value
            elif isinstance(value, tuple):
                merged[name] = (merged[name][0] + value[0], merged[name][1] + value[1])
            elif name.endswith("_max"):
                merged[name] = max(merged[name], value)
            elif name.endswith("_min"):
                merged[name] = min(merged[name], value)
            else:
                merged[name] = merged[name] + value
    return merged


def gather_loss_metrics(per_micro_batch: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """The step's loss metrics over all data-parallel ranks, on global rank 0 (None elsewhere).

    Only the last pipeline stage's TP-rank-0 ranks hold loss metrics (TP ranks hold equal copies).
    Collective over the whole job.
    """
    layout = parallel.current_layout()
    record = combine_metrics(per_micro_batch) if layout.is_last_stage and layout.tp_rank == 0 else {}
    gathered: list[Any] | None = [None] * layout.world_size if layout.rank == 0 else None
    dist.gather_object(record, gathered, dst=0)
    if gathered is None:
        return None
    return merge_partials([r for r in gathered if r])
