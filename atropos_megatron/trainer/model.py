"""Build Megatron-Core GPT models (actor and frozen reference) from our ModelConfig.

The layer spec is Transformer Engine's when TE imports (GPU clusters) and Megatron's local spec
otherwise (CPU, and GPUs without TE). Both build the same parameters, so checkpoints move freely
between the two. Reading an architecture from a HuggingFace config.json is `weights/hf_architectures.py`'s job; this
module only turns an explicit architecture into model chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atropos_megatron.config import ModelConfig, ParallelConfig
from atropos_megatron.trainer import parallel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Embedding rows after padding: ``vocab_size`` rounded up to a multiple of ``divisible_by``.

    Unlike Megatron-LM (which pads to ``divisible_by x TP``), the padded size does not depend on the
    layout, so one distributed checkpoint loads at every TP that divides it (any power of two up to
    128 with the default). Rows past ``vocab_size`` are never real tokens; losses ignore their logits.

    Raises:
        ValueError: ``tensor_parallel_size`` does not divide the padded vocabulary.
    """
    padded = -(-vocab_size // divisible_by) * divisible_by
    if padded % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the padded vocabulary {padded} "
            f"(vocab_size={vocab_size} rounded up to model.make_vocab_size_divisible_by={divisible_by}); "
            "set make_vocab_size_divisible_by to a multiple of the TP size"
        )
    return padded


def check_model_layout(model: ModelConfig, layout: ParallelConfig) -> None:
    """Fail early, naming the field, when ``model`` cannot be split as ``layout`` says.

    Pure: safe to call before anything heavy is imported or allocated (the converter and
    ``--dry-run`` call it first).
    """
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    vpp = layout.virtual_pipeline_parallel_size or 1
    problems = []
    widths = [
        ("num_attention_heads", model.num_attention_heads),
        ("num_query_groups", model.query_groups),
        ("ffn_hidden_size", model.ffn_hidden_size),
    ]
    if model.moe.enabled:
        widths.append(("moe.ffn_hidden_size", model.expert_ffn_hidden_size))
    for name, value in widths:
        if value % tp:
            problems.append(f"tensor_parallel_size={tp} does not divide model.{name}={value}")
    ep = layout.expert_parallel_size
    if ep > 1 and not model.moe.enabled:
        problems.append(
            f"expert_parallel_size={ep} needs a mixture-of-experts model (model.moe.num_experts=0)"
        )
    elif model.moe.num_experts % ep:
        problems.append(
            f"expert_parallel_size={ep} does not divide model.moe.num_experts={model.moe.num_experts}"
        )
    if model.num_layers % (pp * vpp):
        problems.append(
            f"pipeline_parallel_size x virtual_pipeline_parallel_size = {pp} x {vpp} does not divide "
            f"model.num_layers={model.num_layers}"
        )
    try:
        padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    except ValueError as exc:
        problems.append(str(exc))
    if model.moe.enabled and tp > 1 and not layout.sequence_parallel:
        problems.append(
            f"tensor_parallel_size={tp} with MoE layers needs parallel.sequence_parallel=true (Megatron's MoE "
            "layers refuse to train at TP > 1 without it)"
        )
    if problems:
        raise ValueError("the model does not fit this parallel layout: " + "; ".join(problems))


def build_transformer_config(
    model: ModelConfig,
    layout: ParallelConfig,
    *,
    initialize: bool = True,
    moe_aux_loss_coef: float = 0.0,
    moe_z_loss_coef: float = 0.0,
):
    """Megatron ``TransformerConfig`` for ``model`` laid out as ``layout``.

    ``initialize=False`` leaves weights uninitialised (their values come from a checkpoint next):
    drawing 70B random numbers on a CPU takes longer than reading them from disk. The MoE loss
    coefficients only matter to training (``grpo.moe_aux_loss_coef`` / ``moe_z_loss_coef``).

    Fusions stay off: each needs Apex/TE/CUDA kernels, and Megatron's defaults already say so; we
    set them explicitly so a Megatron default change cannot silently turn one on.
    """
    from megatron.core.transformer import TransformerConfig

    check_model_layout(model, layout)
    dtype = TORCH_DTYPES[model.dtype]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.activation == "swiglu",
        activation_func=F.silu if model.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Parallel layout (must match what parallel.setup_model_parallel built).
        tensor_model_parallel_size=layout.tensor_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        **recompute_fields(layout),
        # On gloo, batched p2p matches messages by posting order and silently swaps activations and
        # gradients under the interleaved schedule; the unbatched path is correct everywhere.
        batch_p2p_comm=on_gpu,
        pipeline_dtype=dtype,
        # Precision.
        params_dtype=dtype,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        # Without CUDA, weights are drawn full-size on CPU and split: every layout gets the same
        # initial weights for the same seed. On GPUs each rank initialises its own shard.
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **moe_fields(model, layout, aux_loss_coef=moe_aux_loss_coef, z_loss_coef=moe_z_loss_coef),
    )


def moe_fields(
    model: ModelConfig, layout: ParallelConfig, *, aux_loss_coef: float, z_loss_coef: float
) -> dict:
    """``TransformerConfig`` fields for ``model.moe`` (none for a dense model).

    Routing is HF's: Megatron's top-k over the fp32 router logits followed by a softmax over those k
    equals HF's softmax over all experts, top-k and renormalisation (``normalize_topk``); without
    renormalisation HF's order is Megatron's ``pre_softmax``. Experts are sequential (one GEMM per
    expert): grouped GEMM needs Transformer Engine and changes the parameter layout.
    """
    moe = model.moe
    if not moe.enabled:
        return {}
    pattern = [0 if layer in moe.dense_layers else 1 for layer in range(model.num_layers)]
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_layer_freq=pattern if 0 in pattern else 1,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not moe.normalize_topk,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=layout.moe_token_dispatcher,
        moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coef,
        moe_z_loss_coeff=z_loss_coef or None,
    )


def uses_te_spec(model: ModelConfig) -> bool:
    """Whether ``model`` is built on Transformer Engine's layer spec: TE imports and LoRA is off.

    LoRA needs the local spec: TE fuses the pre-attention and pre-MLP norms into ``linear_qkv`` and
    ``linear_fc1``, so the adapters' hooks would see the input before the norm.
    """
    from atropos_megatron.trainer.megatron_patches import te_available

    return te_available() and not model.lora.enabled


def recompute_fields(layout: ParallelConfig) -> dict:
    """``TransformerConfig`` fields for ``parallel.recompute``."""
    if layout.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if layout.recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": layout.recompute_num_layers,
        }
    return {}


def build_layer_spec(model: ModelConfig, config=None, *, vp_stage: int | None = None):
    """TE layer spec when Transformer Engine imports (and LoRA is off), else Megatron's local spec with
    SDPA as core attention (``trainer.attention``).

    MoE models get a block spec (one layer spec per layer of this stage, dense or MoE as
    ``model.moe.dense_layers`` says), which needs the ``TransformerConfig`` and the chunk's ``vp_stage``.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    from atropos_megatron.trainer.attention import use_sdpa_core_attention

    te = uses_te_spec(model)
    if model.moe.enabled:
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization=model.normalization, vp_stage=vp_stage
        )
    elif te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=model.qk_layernorm, normalization=model.normalization
        )
    # TE's attention takes packed (THD) micro-batches itself; the local spec's would need a mask.
    return spec if te else use_sdpa_core_attention(spec)


def build_model(
    model: ModelConfig,
    layout: ParallelConfig,
    *,
    initialize: bool = True,
    padded_vocab: int | None = None,
    moe_aux_loss_coef: float = 0.0,
    moe_z_loss_coef: float = 0.0,
) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage (a single chunk without VPP).

    Requires :func:`parallel.setup_model_parallel` for the same ``layout`` first.

    Args:
        initialize: draw random initial weights (False: leave them uninitialised for a checkpoint).
        padded_vocab: embedding rows, when a checkpoint fixes them (e.g. one written by Megatron-LM,
            which pads to a multiple of ``divisible_by x TP``); default :func:`padded_vocab_size`.
        moe_aux_loss_coef, moe_z_loss_coef: MoE router losses (training only).
    """
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(
        model,
        layout,
        initialize=initialize,
        moe_aux_loss_coef=moe_aux_loss_coef,
        moe_z_loss_coef=moe_z_loss_coef,
    )
    vocab = padded_vocab or padded_vocab_size(
        model.vocab_size, model.make_vocab_size_divisible_by, layout.tensor_parallel_size
    )
    if vocab < model.vocab_size or vocab % layout.tensor_parallel_size:
        raise ValueError(
            f"padded vocabulary {vocab} must be >= vocab_size={model.vocab_size} and divisible by "
            f"tensor_parallel_size={layout.tensor_parallel_size}"
        )
    num_chunks = layout.virtual_pipeline_parallel_size or 1
    chunks = []
    for chunk in range(num_chunks):
        vp_stage = chunk if layout.virtual_pipeline_parallel_size else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=build_layer_spec(model, config, vp_stage=vp_stage),
                vocab_size=vocab,
                max_sequence_length=model.max_position_embeddings,
                pre_process=parallel.stage_has(first=True, vp_stage=vp_stage),
                post_process=parallel.stage_has(first=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=model.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=int(model.rotary_base),
                rope_scaling=model.rope_scaling_factor is not None,
                rope_scaling_factor=model.rope_scaling_factor or 8.0,
                vp_stage=vp_stage,
            )
        )
    if model.dtype != "fp32":
        # Megatron creates linear weights in params_dtype, but the torch-norm fallback (no TE/Apex)
        # creates fp32 norm weights; cast the rest as Megatron's Float16Module would.
        for chunk in chunks:
            chunk.to(TORCH_DTYPES[model.dtype])
    return chunks
