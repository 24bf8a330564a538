"""Parameter counts and per-GPU memory estimates for a layout, before anything is allocated.

The core of ``atropos-megatron train --dry-run``: pure arithmetic on the config sections (no torch
distributed, no Megatron import, no tensors). Parameter counts are exact for the GPT model that
`trainer/model.py` builds (the tests compare them with real Megatron models, per pipeline rank);
the memory figures are an estimate whose approximations are spelled out in :func:`estimate_memory`.
It replaces guessing TP/PP from experience and discovering an OOM twenty minutes into a job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from atropos_megatron.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from atropos_megatron.trainer.model import check_model_layout, padded_vocab_size
from atropos_megatron.weights.hf_architectures import resolve_architecture

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

GRAD_BYTES = 4
"""Megatron DDP's gradient buffer is fp32: the trainer reduces gradients in fp32
(``grad_reduce_in_fp32``) for bf16/fp16 models, and an fp32 model's grads are fp32 anyway. With
bf16 gradient reduction it would be 2 bytes per parameter."""

CUDA_OVERHEAD_BYTES = 3 * GIB // 2
"""Fixed per-GPU allowance not proportional to the model: the CUDA context and kernel images
(~0.5-1 GiB on Hopper), cuBLAS/NCCL workspaces and communication buffers, and caching-allocator
fragmentation. A round figure from experience, not a measurement of this code."""


# ------------------------------------------------------------------------------------------------
# Parameters (exact)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageParams:
    """Parameters of one model chunk (pipeline rank x virtual stage) held by ONE tensor-parallel rank."""

    pp_rank: int
    chunk: int
    """Virtual pipeline stage on this rank (always 0 without interleaving)."""
    num_layers: int
    """Transformer layers in this chunk."""
    layer_params: int
    """All transformer layers of this chunk together."""
    embedding_params: int
    """Word embeddings: on the first stage, and the tied copy Megatron keeps on the last stage."""
    output_params: int
    """Final norm and (untied) output layer: on the last stage only."""

    @property
    def total(self) -> int:
        return self.layer_params + self.embedding_params + self.output_params


def _norm_params(model: ModelConfig, width: int) -> int:
    """Megatron norms hold a weight, and a bias when they are LayerNorm (replicated across TP)."""
    return width * (2 if model.normalization == "LayerNorm" else 1)


def layer_parameters(model: ModelConfig, tensor_parallel_size: int) -> int:
    """Parameters of one transformer layer on one TP rank (Megatron's GPT layer spec).

    Column-parallel (``linear_qkv``, ``linear_fc1``) and row-parallel (``linear_proj``,
    ``linear_fc2``) matrices are split over TP; norms are replicated. No linear layer has a bias
    except the optional QKV bias (the model is built with ``add_bias_linear=False``).
    """
    tp = tensor_parallel_size
    h, ffn = model.hidden_size, model.ffn_hidden_size
    head_dim = model.head_dim or h // model.num_attention_heads
    q_width = model.num_attention_heads * head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.query_groups) * head_dim
    params = _norm_params(model, h)  # input_layernorm (TE fuses it into linear_qkv: same count)
    params += qkv_rows // tp * h + (qkv_rows // tp if model.add_qkv_bias else 0)
    if model.qk_layernorm:
        params += 2 * _norm_params(model, head_dim)  # q_layernorm, k_layernorm: one head wide
    params += h * (q_width // tp)  # linear_proj
    params += _norm_params(model, h)  # pre_mlp_layernorm
    fc1_rows = 2 * ffn if model.activation == "swiglu" else ffn  # gate and up projections fused
    params += fc1_rows // tp * h + h * (ffn // tp)  # linear_fc1, linear_fc2
    return params


def parameter_counts(model: ModelConfig, layout: ParallelConfig) -> list[StageParams]:
    """Exact parameters per model chunk for one TP rank, ordered by (pp_rank, chunk).

    Layers are split evenly: chunk ``c`` of pipeline rank ``p`` holds layers
    ``[(c * pp + p) * n, (c * pp + p + 1) * n)`` with ``n = num_layers / (pp * vpp)``. The first chunk of
    pipeline rank 0 holds the word embeddings; the last chunk of the last rank holds the final norm
    and the output layer. With tied embeddings the output layer has no weight of its own when PP=1;
    with PP>1 Megatron keeps a copy of the embedding on the last stage (``LanguageModule.
    setup_embeddings_and_output_weights``), and that copy is counted there. RoPE has no parameters.

    ``model`` must carry the architecture (see ``resolve_architecture`` for ``hf_path`` configs).

    Raises:
        ValueError: the model cannot be split as ``layout`` says (``check_model_layout``).
    """
    check_model_layout(model, layout)
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    vpp = layout.virtual_pipeline_parallel_size or 1
    vocab_rows = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp
    embedding = vocab_rows * model.hidden_size
    layers_per_chunk = model.num_layers // (pp * vpp)
    per_layer = layer_parameters(model, tp)
    stages = []
    for pp_rank in range(pp):
        for chunk in range(vpp):
            first = pp_rank == 0 and chunk == 0
            last = pp_rank == pp - 1 and chunk == vpp - 1
            output = 0
            if last:
                output = _norm_params(model, model.hidden_size)  # final_layernorm
                if not model.tie_word_embeddings or not first:
                    output += embedding  # output_layer, or the tied copy on the last stage
            stages.append(
                StageParams(
                    pp_rank=pp_rank,
                    chunk=chunk,
                    num_layers=layers_per_chunk,
                    layer_params=layers_per_chunk * per_layer,
                    embedding_params=embedding if first else 0,
                    output_params=output,
                )
            )
    return stages


def params_per_pipeline_rank(model: ModelConfig, layout: ParallelConfig) -> list[int]:
    """Parameters held by one GPU of each pipeline rank (all its chunks), indexed by pp_rank."""
    totals = [0] * layout.pipeline_parallel_size
    for stage in parameter_counts(model, layout):
        totals[stage.pp_rank] += stage.total
    return totals


def lora_layer_parameters(model: ModelConfig, tensor_parallel_size: int) -> int:
    """LoRA adapter parameters of one transformer layer on one TP rank (0 without LoRA).

    Per targeted projection ``A`` ``[r, in]`` and ``B`` ``[out, r]``, the factor that TP splits divided
    by TP (``weights/lora_layout.py``): ``B`` of column-parallel, ``A`` of row-parallel layers.
    """
    from atropos_megatron.weights.lora_layout import factor_shape, sites_for

    lora = model.lora
    if not lora.enabled:
        return 0
    total = 0
    for site, keys in sites_for(lora.target_modules):
        for key in keys:
            for factor in ("A", "B"):
                shape = factor_shape(site, key, factor, rank=lora.rank, model=model, tp=tensor_parallel_size)
                total += math.prod(shape)
    return total


def lora_dropout_activation_bytes(model: ModelConfig, layout: ParallelConfig, *, tokens: int) -> int:
    """Bytes one layer's LoRA dropout saves for ``tokens`` tokens: each targeted projection's dropped
    input (model dtype) and its mask (1 byte). 0 without LoRA or with ``dropout == 0``.

    Not small: with all seven projections it adds ~``7*T*h*(d+1)`` to a layer's ~``32*T*h*d``. The
    adapters' own ``r``-wide activations are ``r/h`` of that and ignored.
    """
    from atropos_megatron.weights.lora_layout import projection_features, sites_for

    lora = model.lora
    if not (lora.enabled and lora.dropout > 0):
        return 0
    tp = layout.tensor_parallel_size
    sp = tp if layout.sequence_parallel else 1
    elements = 0
    for site, keys in sites_for(lora.target_modules):
        for key in keys:
            in_features, _ = projection_features(key, model)
            # column-parallel input: the (sequence-gathered) hidden states; row-parallel: a TP slice
            elements += tokens * in_features // (sp if site.parallel == "column" else tp)
    return elements * (DTYPE_BYTES[model.dtype] + 1)


def lora_params_per_pipeline_rank(model: ModelConfig, layout: ParallelConfig) -> list[int]:
    """LoRA adapter parameters held by one GPU of each pipeline rank (0s without LoRA)."""
    layers = model.num_layers // layout.pipeline_parallel_size
    return [
        layers * lora_layer_parameters(model, layout.tensor_parallel_size)
    ] * layout.pipeline_parallel_size


def total_parameters(model: ModelConfig) -> int:
    """Parameters of the whole model as built (padded vocabulary; a tied embedding counted once)."""
    return sum(params_per_pipeline_rank(model, ParallelConfig()))


# ------------------------------------------------------------------------------------------------
# Memory (estimate)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageMemory:
    """Estimated peak bytes on one GPU of pipeline rank ``pp_rank`` (the same on every TP/DP rank)."""

    pp_rank: int
    params: int
    """Parameters on this GPU (all its chunks, one TP shard), LoRA adapters included."""
    trained_params: int
    """Those that train (all of them, or the LoRA adapters alone): gradients and optimizer state."""
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    reference_bytes: int
    """Frozen reference model (weights only); 0 when ``grpo.kl_coef == 0`` or with LoRA (the reference
    is the base with the adapters off)."""
    activations_bytes: int
    """Saved activations of every micro-batch in flight on this rank, plus attention workspace."""
    logits_bytes: int
    """Output logits and their in-place gradient (last stage only)."""
    overhead_bytes: int
    """CUDA context, workspaces, fragmentation (:data:`CUDA_OVERHEAD_BYTES`)."""

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.grads_bytes
            + self.optimizer_bytes
            + self.reference_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.overhead_bytes
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of a run, per pipeline rank, and the worst case over them."""

    stages: tuple[StageMemory, ...]
    data_parallel_size: int
    total_params: int
    """Whole-model parameters (see :func:`total_parameters`)."""
    lora_params: int
    """Whole-model LoRA adapter parameters (0 without LoRA), not in ``total_params``."""
    chunk_passes_in_flight: tuple[int, ...]
    """Chunk forward passes whose activations a GPU of each pipeline rank holds at its peak."""

    @property
    def peak(self) -> StageMemory:
        """The pipeline rank that needs the most memory."""
        return max(self.stages, key=lambda stage: stage.total_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    def fits(self, capacity_gib: float) -> bool:
        """Whether the worst pipeline rank fits a device of ``capacity_gib`` GiB."""
        return self.peak_bytes <= capacity_gib * GIB

    def format_table(self, capacities_gib: Sequence[float] = (80, 141)) -> str:
        """A per-stage table in GiB and one verdict line per device capacity."""
        columns = ("weights", "grads", "optim", "ref", "activ", "logits", "other", "total")
        header = f"{'stage':>5} {'params':>9} " + " ".join(f"{name:>8}" for name in columns)
        lora = ""
        if self.lora_params:
            lora = f" + {_count(self.lora_params)} LoRA ({self.lora_params / self.total_params:.2%}; only they train)"
        lines = [
            f"parameters: {_count(self.total_params)} total{lora}; data parallel size {self.data_parallel_size}",
            "estimated peak memory per GPU (GiB):",
            header,
        ]
        for stage in self.stages:
            values = (
                stage.weights_bytes,
                stage.grads_bytes,
                stage.optimizer_bytes,
                stage.reference_bytes,
                stage.activations_bytes,
                stage.logits_bytes,
                stage.overhead_bytes,
                stage.total_bytes,
            )
            lines.append(
                f"{stage.pp_rank:>5} {_count(stage.params):>9} "
                + " ".join(f"{value / GIB:>8.2f}" for value in values)
            )
        peak = self.peak
        for capacity in capacities_gib:
            spare = capacity - peak.total_bytes / GIB
            verdict = (
                f"fits in {capacity:g} GiB ({spare:.1f} GiB to spare)"
                if spare >= 0
                else f"does NOT fit in {capacity:g} GiB (short by {-spare:.1f} GiB)"
            )
            lines.append(f"peak {peak.total_bytes / GIB:.1f} GiB on pipeline rank {peak.pp_rank}: {verdict}")
        return "\n".join(lines)


def _count(n: int) -> str:
    """A parameter count for people: 7.62B, 53.5M, 90.7K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def optimizer_bytes_per_param(optimizer_name: str, dtype: str) -> int:
    """Optimizer state per parameter before distributed-optimizer sharding.

    Adam: fp32 ``exp_avg`` + ``exp_avg_sq`` (8 bytes) plus an fp32 main copy of bf16/fp16 weights
    (4 bytes; an fp32 model is its own main copy). SGD: the main copy only (`trainer/optimizer.py`
    sets ``sgd_momentum=0``, so there is no momentum buffer).
    """
    main_params = 0 if dtype == "fp32" else 4
    return main_params + (8 if optimizer_name == "adam" else 0)


def layer_activation_bytes(
    model: ModelConfig,
    layout: ParallelConfig,
    *,
    tokens: int,
    attention_length: int,
    fused_attention: bool = False,
) -> int:
    """Bytes one transformer layer saves for backward for ``tokens`` tokens (one TP rank).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4
    count ``s*b*h*(34 + 5*a*s/h)`` bytes for a GPT layer in 16-bit. We apply the same accounting to
    this model (element counts times the activation dtype size ``d``):

    - norm inputs and the inputs of ``linear_qkv`` / ``linear_fc1``: ``4*T*h`` (divided by TP under
      sequence parallelism, otherwise replicated on every TP rank);
    - Q, K, V and the ``linear_proj`` input: ``4*T*(a/tp)*head_dim`` (Megatron's local
      ``DotProductAttention`` repeats K and V to all query heads before saving them); with fused
      (flash) attention, Q, K, V unrepeated and the output: ``(2a + 2g)/tp*T*head_dim``;
    - qk_layernorm inputs: ``(a + g)/tp*T*head_dim``;
    - MLP: SwiGLU saves the fc1 output (``2f``), ``silu(gate)`` (``f``) and the fc2 input (``f``):
      ``4*T*f/tp``; GeLU ``2*T*f/tp`` (the paper's ``16*s*b*h`` for ``f = 4h``);
    - unfused attention scores: softmax's fp32 output and the ``d``-byte probabilities the value
      matmul saves, ``(4 + d)`` bytes (``4`` for fp32 models) per score, over ``T/s`` rows of
      ``s = attention_length`` tokens: ``(a/tp)*T*s`` scores. Fused attention saves none.

    With dropout 0 (the trainer's setting) the paper's two dropout masks (``2*s*b*h``) are absent,
    so for a GPT-3-shaped layer this gives ``32*s*b*h + 6*a*s^2*b`` (the paper: ``34`` and ``5``).
    Bias terms, RoPE tables and norm statistics are ``O(T)`` and ignored.
    """
    d = DTYPE_BYTES[model.dtype]
    tp = layout.tensor_parallel_size
    sp = tp if layout.sequence_parallel else 1
    h, f = model.hidden_size, model.ffn_hidden_size
    head_dim = model.head_dim or h // model.num_attention_heads
    heads, groups = model.num_attention_heads // tp, model.query_groups // tp
    elements = 4 * tokens * h // sp
    if fused_attention:
        elements += (2 * heads + 2 * groups) * tokens * head_dim
    else:
        elements += 4 * heads * tokens * head_dim
    if model.qk_layernorm:
        elements += (heads + groups) * tokens * head_dim
    elements += (4 if model.activation == "swiglu" else 2) * tokens * (f // tp)
    # Selective recomputation reruns core attention in backward: its scores are never kept.
    kept_scores = not (fused_attention or layout.recompute == "selective")
    score_bytes = heads * tokens * attention_length * (4 + d if d < 4 else 4) if kept_scores else 0
    return elements * d + score_bytes


def micro_batch_shape(data: DataConfig) -> tuple[int, int]:
    """``(rows, row_len)`` of the largest micro-batch `data/batching.py` can build.

    Packed or padded, a row holds at most ``max_token_len`` tokens (rounded up to
    ``pad_to_multiple_of``): packing fills rows of that length back to back (a block-diagonal mask
    still costs the unfused attention a full ``row_len x row_len`` score matrix per head), padding
    puts one sequence in each. A micro-batch has as many rows as fit in ``micro_batch_tokens`` (at
    least one).
    """
    row_len = _round_up(min(data.max_token_len, data.micro_batch_tokens), data.pad_to_multiple_of)
    return max(1, data.micro_batch_tokens // row_len), row_len


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def in_flight_chunk_passes(layout: ParallelConfig, pp_rank: int, num_micro_batches: int) -> int:
    """Chunk forward passes whose activations pipeline rank ``pp_rank`` holds at once, at most.

    1F1B: rank ``p`` runs ``pp - p - 1`` warm-up forwards, then one more before its first backward,
    so it holds ``pp - p`` micro-batches (Narayanan et al. 2021, §2.2). Interleaved: Megatron's
    ``get_pp_rank_microbatches`` warms up ``2*(pp - p - 1) + (vpp - 1)*pp`` chunk passes; plus one.
    For rank 0 that is ``pp * (1 + (pp - 1)/(pp*vpp))`` stages' worth, Megatron-LM's
    ``interleaved_schedule_memory_penalty``. Never more than the passes the step has.
    """
    pp = layout.pipeline_parallel_size
    vpp = layout.virtual_pipeline_parallel_size
    if vpp is None:
        return min(pp - pp_rank, num_micro_batches)
    return min(2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1, num_micro_batches * vpp)


def logits_tokens(cfg: TrainConfig, tokens: int, hidden: int, local_vocab: int) -> int:
    """Tokens whose logits exist at once on the last stage: the micro-batch's, or with
    ``grpo.fused_linear`` (as it decides for these tokens) one chunk's (the fused op's chunk size)."""
    from atropos_megatron.kernels.fused_linear_grpo import default_chunk_tokens, use_fused_linear

    if not use_fused_linear(cfg.grpo.fused_linear, tokens, local_vocab):
        return tokens
    return min(tokens, default_chunk_tokens(tokens, hidden, local_vocab))


def estimate_memory(cfg: TrainConfig, world_size: int, *, fused_attention: bool = False) -> MemoryEstimate:
    """Estimated peak memory per GPU, per pipeline rank, for training ``cfg`` on ``world_size`` GPUs.

    Exact: parameter counts (:func:`parameter_counts`) and hence weights (model dtype), gradients
    (fp32 buffer, :data:`GRAD_BYTES`), optimizer state (:func:`optimizer_bytes_per_param`, divided
    by the data-parallel size with ``optimizer.use_distributed_optimizer``, as Megatron-LM's
    ``theoretical_memory_usage`` does: ``6 + 12/DP`` bytes per bf16 parameter with Adam) and the
    frozen reference model (model dtype, weights only, when ``grpo.kl_coef > 0``). With LoRA
    (``model.lora.rank > 0``) the adapters add their weights, only they have gradients and optimizer
    state, and there is no reference copy (the base with adapters off is the reference).

    Approximate:

    - activations of the largest micro-batch (:func:`micro_batch_shape`; tokens divided by CP) for
      each layer (:func:`layer_activation_bytes`), times the passes
      in flight under the pipeline schedule (:func:`in_flight_chunk_passes`); the micro-batch count
      assumes every sequence is ``max_token_len`` long (the most micro-batches, the most in flight).
      ``parallel.recompute``: ``selective`` keeps no attention scores (core attention is rerun in
      backward); ``full`` keeps each group of ``recompute_num_layers`` layers' input per pass, plus one
      group's activations while backward recomputes it. Unfused attention also needs one layer's transient score buffers
      (Megatron's ``mpu`` matmul buffer in ``d`` bytes and the fp32 softmax input): ``(a/tp)*T*s*(d+4)``.
      The last stage adds the final-norm and output-layer inputs (``2*T*h*d``).
    - logits ``[T, V/tp]`` on the last stage: the model-dtype output plus one fp32 copy, into which
      the fused GRPO loss writes its gradient in place (one fp32 tensor for fp32 models). With
      ``grpo.fused_linear`` only one chunk of tokens' logits exists at a time
      (``kernels.fused_linear_grpo.default_chunk_tokens``), with the same two buffers per chunk.
    - :data:`CUDA_OVERHEAD_BYTES` per GPU.

    Forward-only passes (old and reference log-probs) keep no activations and need less than this. The
    packed micro-batch's bool mask (``T*s`` bytes) is ignored: it is ``1/(6*a/tp)`` of the scores.

    Args:
        cfg: the run; ``cfg.model``'s architecture is read from ``hf_path`` when that is set.
        world_size: GPUs in the job.
        fused_attention: attention runs in Transformer Engine's fused kernels (no ``s^2`` scores);
            False matches the local spec, the worst case.

    Raises:
        ValueError: ``world_size`` is not divisible by TP x PP x CP, or the model does not fit the
            layout.
    """
    layout, data = cfg.parallel, cfg.data
    model = resolve_architecture(cfg.model)
    if world_size < 1 or world_size % layout.model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size x pipeline_parallel_size x "
            f"context_parallel_size = {layout.tensor_parallel_size} x {layout.pipeline_parallel_size} x "
            f"{layout.context_parallel_size}"
        )
    dp = world_size // layout.model_parallel_size
    params = params_per_pipeline_rank(model, layout)
    adapters = lora_params_per_pipeline_rank(model, layout)
    lora = model.lora.enabled
    d, tp, pp = DTYPE_BYTES[model.dtype], layout.tensor_parallel_size, layout.pipeline_parallel_size
    optimizer_per_param = optimizer_bytes_per_param(cfg.optimizer.name, model.dtype)
    optimizer_shards = dp if cfg.optimizer.use_distributed_optimizer else 1

    rows, attention_length = micro_batch_shape(data)
    tokens = rows * attention_length // layout.context_parallel_size
    sequences_per_rank = math.ceil(math.ceil(data.batch_size / cfg.grpo.updates_per_batch) / dp)
    sequences_per_micro_batch = max(1, data.micro_batch_tokens // data.max_token_len)
    num_micro_batches = math.ceil(sequences_per_rank / sequences_per_micro_batch)
    layer_bytes = layer_activation_bytes(
        model, layout, tokens=tokens, attention_length=attention_length, fused_attention=fused_attention
    ) + lora_dropout_activation_bytes(model, layout, tokens=tokens)
    layers_per_chunk = model.num_layers // (pp * (layout.virtual_pipeline_parallel_size or 1))
    workspace = (
        0 if fused_attention else (model.num_attention_heads // tp) * tokens * attention_length * (d + 4)
    )
    vocab_shard = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp

    saved_per_chunk_pass, recomputed = layers_per_chunk * layer_bytes, 0
    if layout.recompute == "full":
        # Only each group's input is kept per pass; backward recomputes one group at a time.
        group = min(layout.recompute_num_layers, layers_per_chunk)
        sp = tp if layout.sequence_parallel else 1
        saved_per_chunk_pass = math.ceil(layers_per_chunk / group) * tokens * model.hidden_size // sp * d
        recomputed = group * layer_bytes
    stages, in_flight = [], []
    for pp_rank, (base_params, adapter_params) in enumerate(zip(params, adapters, strict=True)):
        rank_params = base_params + adapter_params
        trained = adapter_params if lora else rank_params
        passes = in_flight_chunk_passes(layout, pp_rank, num_micro_batches)
        activations = passes * saved_per_chunk_pass + recomputed + workspace
        logits = 0
        if pp_rank == pp - 1:
            sp = tp if layout.sequence_parallel else 1
            activations += 2 * tokens * model.hidden_size * d // sp
            logits = (
                logits_tokens(cfg, tokens, model.hidden_size, vocab_shard)
                * vocab_shard
                * (4 + (d if d < 4 else 0))
            )
        stages.append(
            StageMemory(
                pp_rank=pp_rank,
                params=rank_params,
                trained_params=trained,
                weights_bytes=rank_params * d,
                grads_bytes=trained * GRAD_BYTES,
                optimizer_bytes=math.ceil(trained * optimizer_per_param / optimizer_shards),
                reference_bytes=base_params * d if cfg.grpo.kl_coef > 0 and not lora else 0,
                activations_bytes=activations,
                logits_bytes=logits,
                overhead_bytes=CUDA_OVERHEAD_BYTES,
            )
        )
        in_flight.append(passes)
    return MemoryEstimate(
        stages=tuple(stages),
        data_parallel_size=dp,
        total_params=total_parameters(model),
        lora_params=lora_params_per_pipeline_rank(model, ParallelConfig())[0],
        chunk_passes_in_flight=tuple(in_flight),
    )
