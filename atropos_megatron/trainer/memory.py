"""Parameter counts and per-GPU memory estimates for a layout, before anything is allocated.

The core of ``atropos-megatron train --dry-run``: pure arithmetic on the config sections (no torch
distributed, no Megatron import, no tensors). Parameter counts are exact for the GPT model that
`trainer/model.py` builds, dense or mixture-of-experts (the tests compare them with real Megatron
models, per pipeline rank and expert-parallel rank); the memory figures are an estimate whose
approximations are spelled out in :func:`estimate_memory`. It replaces guessing TP/PP/EP from
experience and discovering an OOM twenty minutes into a job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from atropos_megatron.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from atropos_megatron.trainer.model import check_model_layout, padded_vocab_size
from atropos_megatron.trainer.parallel import check_layout
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
    """Parameters of one model chunk (pipeline rank x virtual stage) held by ONE tensor-parallel rank
    (and, for MoE layers, one expert-parallel rank)."""

    pp_rank: int
    chunk: int
    """Virtual pipeline stage on this rank (always 0 without interleaving)."""
    num_layers: int
    """Transformer layers in this chunk."""
    layer_params: int
    """All transformer layers of this chunk together (their experts included)."""
    embedding_params: int
    """Word embeddings: on the first stage, and the tied copy Megatron keeps on the last stage."""
    output_params: int
    """Final norm and (untied) output layer: on the last stage only."""
    moe_layers: int = 0
    """Of ``num_layers``, those whose MLP is a mixture of experts."""
    expert_params: int = 0
    """Of ``layer_params``, this rank's experts (``num_experts / EP`` per MoE layer, split by TP). Their
    gradients reduce, and their optimizer state shards, over the expert-data-parallel group."""

    @property
    def total(self) -> int:
        return self.layer_params + self.embedding_params + self.output_params


def _norm_params(model: ModelConfig, width: int) -> int:
    """Megatron norms hold a weight, and a bias when they are LayerNorm (replicated across TP)."""
    return width * (2 if model.normalization == "LayerNorm" else 1)


def _mlp_matrices(model: ModelConfig, width: int, tensor_parallel_size: int) -> int:
    """``linear_fc1`` (gate and up fused for SwiGLU, column-parallel) and ``linear_fc2`` (row-parallel)
    of an MLP ``width`` wide, on one TP rank: a dense MLP or one expert."""
    fc1_rows = 2 * width if model.activation == "swiglu" else width
    return fc1_rows // tensor_parallel_size * model.hidden_size + model.hidden_size * (
        width // tensor_parallel_size
    )


def expert_parameters(model: ModelConfig, tensor_parallel_size: int) -> int:
    """One expert's parameters on one TP rank (Megatron's expert TP equals TP here)."""
    return _mlp_matrices(model, model.expert_ffn_hidden_size, tensor_parallel_size)


def layer_parameters(
    model: ModelConfig, tensor_parallel_size: int, *, moe: bool = False, expert_parallel_size: int = 1
) -> int:
    """Parameters of one transformer layer on one TP rank (Megatron's GPT layer spec).

    Column-parallel (``linear_qkv``, ``linear_fc1``) and row-parallel (``linear_proj``,
    ``linear_fc2``) matrices are split over TP; norms are replicated. No linear layer has a bias
    except the optional QKV bias (the model is built with ``add_bias_linear=False``).

    ``moe=True``: the MLP is a mixture of experts instead: the router (``mlp.router.weight``
    ``[E, h]``, replicated on every TP and EP rank) and ``E / expert_parallel_size`` local experts,
    each an MLP ``model.expert_ffn_hidden_size`` wide split by TP (Megatron's ``SequentialMLP``).
    """
    tp = tensor_parallel_size
    h = model.hidden_size
    head_dim = model.head_dim or h // model.num_attention_heads
    q_width = model.num_attention_heads * head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.query_groups) * head_dim
    params = _norm_params(model, h)  # input_layernorm (TE fuses it into linear_qkv: same count)
    params += qkv_rows // tp * h + (qkv_rows // tp if model.add_qkv_bias else 0)
    if model.qk_layernorm:
        params += 2 * _norm_params(model, head_dim)  # q_layernorm, k_layernorm: one head wide
    params += h * (q_width // tp)  # linear_proj
    params += _norm_params(model, h)  # pre_mlp_layernorm (TE fuses it into a dense linear_fc1)
    if not moe:
        return params + _mlp_matrices(model, model.ffn_hidden_size, tp)
    local_experts = model.moe.num_experts // expert_parallel_size
    return params + model.moe.num_experts * h + local_experts * expert_parameters(model, tp)


def parameter_counts(model: ModelConfig, layout: ParallelConfig) -> list[StageParams]:
    """Exact parameters per model chunk for one TP (and EP) rank, ordered by (pp_rank, chunk).

    Layers are split evenly: chunk ``c`` of pipeline rank ``p`` holds layers
    ``[(c * pp + p) * n, (c * pp + p + 1) * n)`` with ``n = num_layers / (pp * vpp)``. The first chunk of
    pipeline rank 0 holds the word embeddings; the last chunk of the last rank holds the final norm
    and the output layer. With tied embeddings the output layer has no weight of its own when PP=1;
    with PP>1 Megatron keeps a copy of the embedding on the last stage (``LanguageModule.
    setup_embeddings_and_output_weights``), and that copy is counted there. RoPE has no parameters.
    A layer in ``model.moe_layers`` holds the router and this EP rank's experts instead of a dense MLP
    (:func:`layer_parameters`): every rank of an EP group holds the same count.

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
    dense_layer = layer_parameters(model, tp)
    moe_layer = layer_parameters(model, tp, moe=True, expert_parallel_size=layout.expert_parallel_size)
    experts_per_layer = model.moe.num_experts // layout.expert_parallel_size * expert_parameters(model, tp)
    moe_layers = set(model.moe_layers)
    stages = []
    for pp_rank in range(pp):
        for chunk in range(vpp):
            first = pp_rank == 0 and chunk == 0
            last = pp_rank == pp - 1 and chunk == vpp - 1
            start = (chunk * pp + pp_rank) * layers_per_chunk
            moe = len(moe_layers.intersection(range(start, start + layers_per_chunk)))
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
                    layer_params=(layers_per_chunk - moe) * dense_layer + moe * moe_layer,
                    embedding_params=embedding if first else 0,
                    output_params=output,
                    moe_layers=moe,
                    expert_params=moe * experts_per_layer,
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
    """Parameters of the whole model as built (padded vocabulary; a tied embedding counted once;
    every expert of an MoE model)."""
    return sum(params_per_pipeline_rank(model, ParallelConfig()))


def active_parameters(model: ModelConfig) -> int:
    """Parameters one token passes through: :func:`total_parameters` less, in every MoE layer, the
    ``num_experts - router_topk`` experts it is not routed to (the "A3B" of Qwen3-30B-A3B, which also
    counts the embedding and the output layer). Equals the total for a dense model."""
    unused = model.moe.num_experts - model.moe.router_topk
    return total_parameters(model) - len(model.moe_layers) * unused * expert_parameters(model, 1)


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
    expert_params: int = 0
    """Of ``params``, this GPU's MoE experts (optimizer state sharded over expert data parallel)."""

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
    active_params: int = 0
    """Parameters one token uses (:func:`active_parameters`; ``total_params`` for a dense model)."""
    expert_data_parallel_size: int = 1
    """Ranks holding the same experts: ``world / (TP x EP x PP)``. Expert gradients are reduced, and
    with the distributed optimizer their optimizer state sharded, over them."""

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
        active, expert_dp = "", ""
        if self.active_params != self.total_params:
            active = f", {_count(self.active_params)} active per token"
            expert_dp = f", expert data parallel size {self.expert_data_parallel_size}"
        lines = [
            f"parameters: {_count(self.total_params)} total{active}{lora}; data parallel size "
            f"{self.data_parallel_size}{expert_dp}",
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
    moe: bool = False,
    router_score_tensors: int = 1,
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

    ``moe=True``: the MLP term is :func:`moe_mlp_activation_bytes` instead (the router saves the
    pre-MLP norm's output where a dense ``linear_fc1`` would: the same ``4*T*h`` above).
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
    mlp_bytes = 0
    if moe:
        mlp_bytes = moe_mlp_activation_bytes(
            model, layout, tokens=tokens, router_score_tensors=router_score_tensors
        )
    else:
        elements += (4 if model.activation == "swiglu" else 2) * tokens * (f // tp)
    # Selective recomputation reruns core attention in backward: its scores are never kept.
    kept_scores = not (fused_attention or layout.recompute == "selective")
    score_bytes = heads * tokens * attention_length * (4 + d if d < 4 else 4) if kept_scores else 0
    return elements * d + score_bytes + mlp_bytes


ROUTING_BYTES_PER_COPY = 12
"""What the experts keep per routed token copy besides its activations: its fp32 routing weight (the
expert MLP multiplies its activation by it) and the int64 index that un-permutes it."""


def router_score_tensors(model: ModelConfig, aux_loss_coef: float, z_loss_coef: float) -> int:
    """fp32 ``[tokens, num_experts]`` tensors the router keeps per MoE layer and micro-batch.

    Always the scattered top-k routing weights (the dispatcher holds them until the layer's next
    forward); plus the softmax over all experts that the load-balancing loss differentiates (when
    its coefficient is > 0), the logits that the z-loss's logsumexp saves (z > 0), and the softmax
    over all experts taken before top-k when the weights are not renormalised (``normalize_topk``
    off: Megatron's ``moe_router_pre_softmax``). The top-k's own softmax is ``k/E`` of one and ignored.
    """
    return 1 + (aux_loss_coef > 0) + (z_loss_coef > 0) + (not model.moe.normalize_topk)


def moe_mlp_activation_bytes(
    model: ModelConfig, layout: ParallelConfig, *, tokens: int, router_score_tensors: int = 1
) -> int:
    """Bytes one MoE layer's router and experts save for backward for a ``tokens``-token micro-batch.

    Every token goes to ``k = router_topk`` experts, so ``N = k*T`` token copies reach the experts of
    each rank, assuming balanced routing: with sequence parallelism a TP rank routes its ``T/tp``
    tokens and then gathers its TP peers' copies (expert TP = TP), and the EP peers (other
    data-parallel replicas with their own micro-batches) send it as many copies as it sends them.
    The busiest rank of an unbalanced step holds more; nothing here bounds that.

    - router: :func:`router_score_tensors` fp32 ``[T/sp, E]`` tensors and the boolean routing map
      (and its transpose, ``2*T/sp*E`` bytes);
    - dispatched copies, the experts' ``linear_fc1`` input: ``N*h``;
    - experts (Megatron's unfused GLU, as the trainer builds it: ``bias_activation_fusion`` off): the
      fc1 output ``2*I/tp``, then ``I/tp`` each for ``silu(gate)``, ``up + glu_linear_offset`` (an
      out-of-place add, a copy even for offset 0), the GLU output that the routing-weight multiply
      saves and the fc2 input: ``6*N*I/tp`` (GeLU: fc1 output, activation and fc2 input,
      ``3*N*I/tp``), ``I`` = ``model.expert_ffn_hidden_size``;
    - :data:`ROUTING_BYTES_PER_COPY` per copy.

    Saved-tensor hooks on real Megatron MoE layers on CPU see these bytes to within the router's
    small ``[T, k]`` top-k tensors (``tests/unit/test_memory_estimate.py``). The same count shows that
    a dense SwiGLU MLP keeps ``5*T*f/tp`` (the offset copy too), one ``f`` more than
    :func:`layer_activation_bytes` charges it.
    """
    d = DTYPE_BYTES[model.dtype]
    tp = layout.tensor_parallel_size
    sp = tp if layout.sequence_parallel else 1
    moe = model.moe
    copies = tokens * moe.router_topk
    expert_width = model.expert_ffn_hidden_size // tp
    per_copy = model.hidden_size + (6 if model.activation == "swiglu" else 3) * expert_width
    router = tokens // sp * moe.num_experts * (4 * router_score_tensors + 2)
    return copies * (per_copy * d + ROUTING_BYTES_PER_COPY) + router


def moe_dispatch_bytes(model: ModelConfig, layout: ParallelConfig, *, tokens: int) -> int:
    """Transient bytes of one MoE layer's token dispatch and combine (one layer at a time, forward or
    backward), for ``parallel.moe_token_dispatcher``, ``N = k*T`` copies as in
    :func:`moe_mlp_activation_bytes` and ``T_l = T/sp`` local tokens:

    - both: the experts' output ``N*h*d``;
    - ``alltoall``: the local copies permuted for the all-to-all and its receive buffer,
      ``2*k*T_l*h*d``; with TP > 1 also the TP all-gather of the received copies (``N*h*d``) and the
      fp32 copy the combine reduce-scatters (``N*h*4``);
    - ``allgather``: every token of the TP x EP group, ``G = T_l*tp*ep`` rows: the gathered hidden
      states (Megatron's global buffer) and the un-permuted output before the reduce-scatter
      (``G*h*d`` each), that output in fp32 (``G*h*4``), and the gathered fp32 routing weights and
      boolean routing map (``G*E*5``). Nothing is gathered when TP x EP = 1.
    """
    d = DTYPE_BYTES[model.dtype]
    tp, ep = layout.tensor_parallel_size, layout.expert_parallel_size
    local = tokens // (tp if layout.sequence_parallel else 1)
    h, k = model.hidden_size, model.moe.router_topk
    copies = tokens * k
    nbytes = copies * h * d
    if layout.moe_token_dispatcher == "alltoall":
        nbytes += 2 * k * local * h * d
        if tp > 1:
            nbytes += copies * h * (d + 4)
    elif tp * ep > 1:
        gathered = local * tp * ep
        nbytes += gathered * (h * (2 * d + 4) + model.moe.num_experts * 5)
    return nbytes


def micro_batch_shape(data: DataConfig) -> tuple[int, int]:
    """``(rows, row_len)`` of the largest micro-batch `data/batching.py` can build.

    ``rows x row_len`` is the micro-batch's tokens and ``row_len`` the longest span attention covers
    (what unfused attention's scores would cost): a sequence holds at most ``max_token_len`` tokens
    (rounded up to ``pad_to_multiple_of``). Packed, the micro-batch is one THD row of up to
    ``micro_batch_tokens`` in which each sequence attends to itself only; padded, one sequence per row.
    Either way about ``micro_batch_tokens`` tokens (at least one row).
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
    state, and there is no reference copy (the base with adapters off is the reference). MoE: a GPU
    holds its EP rank's experts (split by TP) and the whole router of each MoE layer; the experts'
    optimizer state is sharded over the expert-data-parallel group, ``world / (TP x EP x PP)``
    ranks, instead of DP (``6 + 12/EDP`` bytes per bf16 expert parameter), as Megatron's distributed
    optimizer does.

    Approximate:

    - activations of the largest micro-batch (:func:`micro_batch_shape`; tokens divided by CP) for
      each layer (:func:`layer_activation_bytes`; MoE layers :func:`moe_mlp_activation_bytes` with
      balanced routing), times the passes
      in flight under the pipeline schedule (:func:`in_flight_chunk_passes`); the micro-batch count
      assumes every sequence is ``max_token_len`` long (the most micro-batches, the most in flight).
      ``parallel.recompute``: ``selective`` keeps no attention scores (core attention is rerun in
      backward); ``full`` keeps each group of ``recompute_num_layers`` layers' input per pass, plus one
      group's activations while backward recomputes it. Unfused attention also needs one layer's transient score buffers
      (Megatron's ``mpu`` matmul buffer in ``d`` bytes and the fp32 softmax input): ``(a/tp)*T*s*(d+4)``;
      a stage with MoE layers one layer's dispatch buffers (:func:`moe_dispatch_bytes`), whichever
      is larger (they are not alive at once).
      The last stage adds the final-norm and output-layer inputs (``2*T*h*d``).
    - logits ``[T, V/tp]`` on the last stage: the model-dtype output plus one fp32 copy, into which
      the fused GRPO loss writes its gradient in place (one fp32 tensor for fp32 models). With
      ``grpo.fused_linear`` only one chunk of tokens' logits exists at a time
      (``kernels.fused_linear_grpo.default_chunk_tokens``), with the same two buffers per chunk.
    - :data:`CUDA_OVERHEAD_BYTES` per GPU.

    Forward-only passes (old and reference log-probs) keep no activations and need less than this.

    Args:
        cfg: the run; ``cfg.model``'s architecture is read from ``hf_path`` when that is set.
        world_size: GPUs in the job.
        fused_attention: attention keeps no ``s^2`` scores, as the trainer's does (Transformer
            Engine's fused kernels, or SDPA on the local spec: ``trainer/attention.py``); False
            models Megatron's own unfused ``DotProductAttention``, which the trainer no longer builds.

    Raises:
        ValueError: ``world_size`` is not divisible by TP x PP x CP or by TP x EP x PP
            (``parallel.check_layout``), or the model does not fit the layout (``check_model_layout``).
    """
    layout, data = cfg.parallel, cfg.data
    model = resolve_architecture(cfg.model)
    dp, expert_dp = data_parallel_sizes(layout, world_size)
    chunks = parameter_counts(model, layout)
    adapters = lora_params_per_pipeline_rank(model, layout)
    lora = model.lora.enabled
    d, tp, pp = DTYPE_BYTES[model.dtype], layout.tensor_parallel_size, layout.pipeline_parallel_size
    optimizer_per_param = optimizer_bytes_per_param(cfg.optimizer.name, model.dtype)
    shards, expert_shards = (dp, expert_dp) if cfg.optimizer.use_distributed_optimizer else (1, 1)

    rows, attention_length = micro_batch_shape(data)
    tokens = rows * attention_length // layout.context_parallel_size
    sequences_per_rank = math.ceil(math.ceil(data.batch_size / cfg.grpo.updates_per_batch) / dp)
    sequences_per_micro_batch = max(1, data.micro_batch_tokens // data.max_token_len)
    num_micro_batches = math.ceil(sequences_per_rank / sequences_per_micro_batch)
    activations = _activations_per_pipeline_rank(
        cfg, model, chunks, tokens=tokens, attention_length=attention_length,
        fused_attention=fused_attention, num_micro_batches=num_micro_batches,
    )  # fmt: skip
    vocab_shard = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp
    stages = []
    for pp_rank, adapter_params in enumerate(adapters):
        base_params = sum(chunk.total for chunk in chunks if chunk.pp_rank == pp_rank)
        experts = 0 if lora else sum(chunk.expert_params for chunk in chunks if chunk.pp_rank == pp_rank)
        rank_params = base_params + adapter_params
        trained = adapter_params if lora else rank_params
        logits = 0
        if pp_rank == pp - 1:
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
                optimizer_bytes=math.ceil((trained - experts) * optimizer_per_param / shards)
                + math.ceil(experts * optimizer_per_param / expert_shards),
                reference_bytes=base_params * d if cfg.grpo.kl_coef > 0 and not lora else 0,
                activations_bytes=activations[pp_rank][0],
                logits_bytes=logits,
                overhead_bytes=CUDA_OVERHEAD_BYTES,
                expert_params=experts,
            )
        )
    return MemoryEstimate(
        stages=tuple(stages),
        data_parallel_size=dp,
        total_params=total_parameters(model),
        lora_params=lora_params_per_pipeline_rank(model, ParallelConfig())[0],
        chunk_passes_in_flight=tuple(passes for _, passes in activations),
        active_params=active_parameters(model),
        expert_data_parallel_size=expert_dp,
    )


def data_parallel_sizes(layout: ParallelConfig, world_size: int) -> tuple[int, int]:
    """``(DP, expert DP)`` of ``layout`` on ``world_size`` GPUs: ``world / (TP x PP x CP)`` (dense
    gradients and optimizer state) and ``world / (TP x EP x PP)`` (experts').

    Raises:
        ValueError: either product does not divide the world (``parallel.check_layout``'s message;
            Transformer Engine is assumed present, as on the machine that will train).
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    dp = check_layout(layout, world_size, te_available=True)
    tp, ep, pp = layout.tensor_parallel_size, layout.expert_parallel_size, layout.pipeline_parallel_size
    return dp, world_size // (tp * ep * pp)


def _activations_per_pipeline_rank(
    cfg: TrainConfig,
    model: ModelConfig,
    chunks: list[StageParams],
    *,
    tokens: int,
    attention_length: int,
    fused_attention: bool,
    num_micro_batches: int,
) -> list[tuple[int, int]]:
    """``(activation bytes, chunk passes in flight)`` of each pipeline rank (see :func:`estimate_memory`).

    A rank's chunks can differ (dense and MoE layers); each pass is counted at its largest chunk.
    """
    layout = cfg.parallel
    d, tp, pp = DTYPE_BYTES[model.dtype], layout.tensor_parallel_size, layout.pipeline_parallel_size
    sp = tp if layout.sequence_parallel else 1
    shape = dict(tokens=tokens, attention_length=attention_length, fused_attention=fused_attention)
    lora_dropout = lora_dropout_activation_bytes(model, layout, tokens=tokens)
    dense = layer_activation_bytes(model, layout, **shape) + lora_dropout
    aux = cfg.grpo.moe_aux_loss_coef
    scores = router_score_tensors(
        model, model.moe.router_aux_loss_coef if aux is None else aux, cfg.grpo.moe_z_loss_coef
    )
    moe = layer_activation_bytes(model, layout, **shape, moe=True, router_score_tensors=scores)
    attention_workspace = (
        0 if fused_attention else (model.num_attention_heads // tp) * tokens * attention_length * (d + 4)
    )
    group = min(layout.recompute_num_layers, model.num_layers // len(chunks))
    result = []
    for pp_rank in range(pp):
        mine = [chunk for chunk in chunks if chunk.pp_rank == pp_rank]
        has_moe = any(chunk.moe_layers for chunk in mine)
        if layout.recompute == "full":
            # Only each group's input is kept per pass; backward recomputes one group at a time.
            saved = max(math.ceil(chunk.num_layers / group) for chunk in mine) * tokens * model.hidden_size
            saved_per_pass, recomputed = saved // sp * d, group * (moe if has_moe else dense)
        else:
            saved_per_pass = max((c.num_layers - c.moe_layers) * dense + c.moe_layers * moe for c in mine)
            recomputed = 0
        workspace = attention_workspace
        if has_moe:
            workspace = max(workspace, moe_dispatch_bytes(model, layout, tokens=tokens))
        passes = in_flight_chunk_passes(layout, pp_rank, num_micro_batches)
        total = passes * saved_per_pass + recomputed + workspace
        if pp_rank == pp - 1:
            total += 2 * tokens * model.hidden_size * d // sp  # final norm and output layer inputs
        result.append((total, passes))
    return result
