"""Typed configuration: dataclass schemas merged with OmegaConf.

A run is configured by one YAML file plus ``key=value`` overrides (``optimizer.lr=1e-6``). The schema
below is the single source of truth: an unknown key, a value of the wrong type or an out-of-range
value fails in :func:`load_config` with a :class:`ConfigError` that names the field, before anything
heavy starts. No ``DictConfig`` leaves this module; components receive their own section (a frozen
view is not needed: sections are plain dataclasses and nobody mutates them after loading).

Units live in the field names (``_s``, ``_bytes``, ``_steps``, ``_tokens``) and in each field's
docstring. YAML may use OmegaConf interpolation, e.g. ``auth_token: ${oc.env:BRIDGE_TOKEN,null}``
to read a secret from the environment instead of writing it into a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, with the dotted name of the offending field in the message."""


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


def _require_choice(value: str, name: str, choices: Sequence[str]) -> None:
    _require(value in choices, name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------

DTYPES = ("fp32", "bf16", "fp16")


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters on the decoder's linear layers, one per HuggingFace projection (PEFT's layout).

    The adapters are named and shaped like HF PEFT's (``...q_proj.lora_A.weight`` ``[rank, in]``,
    ``lora_B.weight`` ``[out, rank]``) even where Megatron fuses q/k/v or gate/up, so PEFT is the
    exchange format. With ``rank > 0`` every base weight is frozen and the reference model is the
    base with the adapters switched off.
    """

    rank: int = 0
    """Rank r of each adapter (columns of B, rows of A); 0 turns LoRA off and trains every weight."""
    alpha: float = 16.0
    """Scaling numerator: each adapter adds ``alpha / r * B A x`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability on an adapter's input (PEFT's ``lora_dropout``); the base path has none."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (PEFT's ``use_rslora``)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    """HF projections that get an adapter, from q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""
    adapter: str | None = None
    """Adapters to start from instead of ``B = 0`` (continue training one): an HF PEFT adapter
    directory (``adapter_config.json`` + ``adapter_model.safetensors``) or an adapter-only checkpoint
    (``convert hf-to-mcore --adapter``, or a LoRA run's ``step_*`` directory). Its rank, alpha,
    rsLoRA flag and target modules must equal the fields above."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "model.lora.rank", f"must be >= 0 (0 = off), got {self.rank}")
        _require(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.target_modules if name not in LORA_TARGET_MODULES]
        _require(
            not unknown,
            "model.lora.target_modules",
            f"unknown module(s) {', '.join(map(repr, unknown))}; choose from {', '.join(LORA_TARGET_MODULES)}",
        )
        _require(
            len(set(self.target_modules)) == len(self.target_modules) and bool(self.target_modules),
            "model.lora.target_modules",
            f"must name each module at most once and at least one, got {list(self.target_modules)}",
        )

    @property
    def enabled(self) -> bool:
        """Whether the model carries adapters at all."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """The factor on ``B A x``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``scaling``)."""
        _require(self.enabled, "model.lora.rank", "the scale of disabled LoRA (rank 0) is undefined")
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


MOE_HF_LAYOUTS = ("qwen3_moe", "mixtral")


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts MLPs (Qwen3-MoE, Mixtral): each token goes to its top-k experts.

    Routing follows HF: softmax over all experts in fp32, the top k, renormalised to sum 1 when
    ``normalize_topk`` (Megatron computes the same weights as a softmax over the top-k logits).
    """

    num_experts: int = 0
    """Routed experts per MoE layer; 0 means a dense model (every MLP is one SwiGLU)."""
    router_topk: int = 2
    """Experts each token is sent to (HF ``num_experts_per_tok``)."""
    ffn_hidden_size: int | None = None
    """Each expert's inner width (HF ``moe_intermediate_size``; Mixtral's ``intermediate_size``);
    null means `model.ffn_hidden_size`."""
    normalize_topk: bool = True
    """Renormalise the top-k routing weights to sum 1 (HF ``norm_topk_prob``; always on in Mixtral)."""
    dense_layers: list[int] = field(default_factory=list)
    """Layers (0-based) whose MLP is dense, `model.ffn_hidden_size` wide (HF ``mlp_only_layers`` and
    the layers ``decoder_sparse_step`` skips); every other layer is MoE."""
    router_aux_loss_coef: float = 0.0
    """The load-balancing loss coefficient the model was trained with (HF ``router_aux_loss_coef``);
    `grpo.moe_aux_loss_coef` uses it unless set."""
    hf_layout: str = "qwen3_moe"
    """HF tensor names of the experts and router: `qwen3_moe` (``mlp.experts.E.gate_proj``, ``mlp.gate``)
    or `mixtral` (``block_sparse_moe.experts.E.w1``, ``block_sparse_moe.gate``)."""

    def __post_init__(self) -> None:
        _require(
            self.num_experts >= 0,
            "model.moe.num_experts",
            f"must be >= 0 (0 = dense), got {self.num_experts}",
        )
        _require_choice(self.hf_layout, "model.moe.hf_layout", MOE_HF_LAYOUTS)
        if not self.enabled:
            return
        _require(
            0 < self.router_topk <= self.num_experts,
            "model.moe.router_topk",
            f"must be in [1, num_experts={self.num_experts}], got {self.router_topk}",
        )
        if self.ffn_hidden_size is not None:
            _require(self.ffn_hidden_size > 0, "model.moe.ffn_hidden_size", "must be > 0 (or null)")
        _require(self.router_aux_loss_coef >= 0, "model.moe.router_aux_loss_coef", "must be >= 0")
        _require(
            all(layer >= 0 for layer in self.dense_layers)
            and len(set(self.dense_layers)) == len(self.dense_layers),
            "model.moe.dense_layers",
            f"must be distinct layer indices >= 0, got {list(self.dense_layers)}",
        )

    @property
    def enabled(self) -> bool:
        """Whether the model has MoE layers at all."""
        return self.num_experts > 0


@dataclass(kw_only=True)
class ModelConfig:
    """The actor's architecture. The frozen reference model always uses the same one."""

    hf_path: str | None = None
    """HuggingFace checkpoint directory; when set, the architecture comes from its config.json and the
    architecture fields below are ignored (`weights/hf_architectures.resolve_architecture`). The trainer
    also takes its initial weights from here (unless `dist_checkpoint` is set)."""
    dist_checkpoint: str | None = None
    """Megatron distributed checkpoint to start from (e.g. written by `atropos-megatron convert
    hf-to-mcore`, or a training checkpoint); its sidecar supplies the architecture when `hf_path` is
    null. Loads at any TP/PP. Resuming a run is `checkpoint.load`, not this."""
    num_layers: int = 2
    """Transformer blocks."""
    hidden_size: int = 64
    """Model width (d_model)."""
    ffn_hidden_size: int = 128
    """MLP inner width (per gate/up projection for SwiGLU)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; null means multi-head (= num_attention_heads)."""
    vocab_size: int = 128
    """Tokenizer vocabulary; padded up to a multiple of `make_vocab_size_divisible_by` inside Megatron."""
    make_vocab_size_divisible_by: int = 128
    """Padding multiple for the embedding rows; the TP size must divide it (padded rows are never
    sampled: logits are cut). Layout-independent, so checkpoints load at any such TP."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for (tokens)."""
    normalization: str = "RMSNorm"
    """`RMSNorm` or `LayerNorm`."""
    norm_epsilon: float = 1e-6
    """Epsilon inside the norm layers."""
    activation: str = "swiglu"
    """MLP activation: `swiglu` (gated, Llama/Qwen) or `gelu`."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm on per-head queries and keys (Qwen3)."""
    head_dim: int | None = None
    """Channels per attention head; null means hidden_size / num_attention_heads (Qwen3 differs)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling_factor: float | None = None
    """Llama 3.1-style RoPE frequency scaling factor (low 1, high 4, original context 8192); null = off."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal init for freshly built models (ignored when weights are loaded)."""
    dtype: str = "fp32"
    """Parameter and compute dtype: `fp32`, `bf16` or `fp16`."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts MLPs (off by default: a dense model)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (off by default); a choice of the run, not of the architecture."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            # A ModelConfig rebuilt from ``dataclasses.asdict`` (checkpoint sidecars) has a plain dict here.
            self.lora = LoraConfig(**self.lora)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be > 0")
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "model.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "(set model.head_dim for models whose heads are not hidden_size / heads wide)",
            )
        else:
            _require(self.head_dim > 0, "model.head_dim", "must be > 0")
        if self.rope_scaling_factor is not None:
            _require(self.rope_scaling_factor >= 1, "model.rope_scaling_factor", "must be >= 1 (or null)")
        if self.num_query_groups is not None:
            _require(
                0 < self.num_query_groups <= self.num_attention_heads
                and self.num_attention_heads % self.num_query_groups == 0,
                "model.num_query_groups",
                f"must divide num_attention_heads={self.num_attention_heads}, got {self.num_query_groups}",
            )
        _require(self.make_vocab_size_divisible_by > 0, "model.make_vocab_size_divisible_by", "must be > 0")
        _require(self.max_position_embeddings > 0, "model.max_position_embeddings", "must be > 0")
        _require_choice(self.normalization, "model.normalization", ("RMSNorm", "LayerNorm"))
        _require_choice(self.activation, "model.activation", ("swiglu", "gelu"))
        _require(self.norm_epsilon > 0, "model.norm_epsilon", "must be > 0")
        _require(self.rotary_base > 0, "model.rotary_base", "must be > 0")
        _require(self.init_method_std > 0, "model.init_method_std", "must be > 0")
        _require_choice(self.dtype, "model.dtype", DTYPES)
        if self.moe.enabled:
            too_deep = [layer for layer in self.moe.dense_layers if layer >= self.num_layers]
            _require(
                not too_deep,
                "model.moe.dense_layers",
                f"{too_deep} past the last layer (num_layers={self.num_layers})",
            )
            _require(
                not self.lora.enabled,
                "model.lora.rank",
                "LoRA on mixture-of-experts models is not supported yet; set it to 0 (full fine-tuning)",
            )

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Each expert's inner width (`moe.ffn_hidden_size`, or `ffn_hidden_size` when null)."""
        return self.moe.ffn_hidden_size or self.ffn_hidden_size

    @property
    def moe_layers(self) -> list[int]:
        """Layer indices whose MLP is a mixture of experts (none for a dense model)."""
        if not self.moe.enabled:
            return []
        return [layer for layer in range(self.num_layers) if layer not in self.moe.dense_layers]

    @property
    def query_groups(self) -> int:
        """Key/value heads, resolving the MHA default."""
        return self.num_query_groups or self.num_attention_heads


RECOMPUTE_MODES = ("none", "selective", "full")
TOKEN_DISPATCHERS = ("alltoall", "allgather")


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks are laid out. Data parallel size is derived: world / (TP x PP x CP)."""

    tensor_parallel_size: int = 1
    """Ranks that split each layer's matrices (and the vocabulary)."""
    pipeline_parallel_size: int = 1
    """Ranks that split the layers into consecutive stages."""
    virtual_pipeline_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule; null disables interleaving."""
    context_parallel_size: int = 1
    """Ranks that split the sequence inside attention (needs Transformer Engine)."""
    expert_parallel_size: int = 1
    """Ranks that split each MoE layer's experts (each holds num_experts / EP of them). Taken from the
    data-parallel ranks of a stage: TP x EP x PP must divide the world, and EP the number of experts.
    Experts are split by TP too (Megatron's expert TP equals TP here)."""
    moe_token_dispatcher: str = "alltoall"
    """How tokens reach their experts' ranks under EP: `alltoall` (each rank sends each expert rank only
    its tokens; Megatron's choice for EP > 1) or `allgather` (every rank gathers every token of the EP x
    TP group; simpler, more traffic). Both run on gloo (uneven all-to-all included) and NCCL."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between TP regions (saves memory; needs TP > 1)."""
    backend: str = "auto"
    """Collective backend: `auto` (nccl with CUDA, gloo without), `nccl` or `gloo`."""
    timeout_s: float = 600.0
    """How long a collective may wait before the process group gives up (seconds)."""
    recompute: str = "none"
    """Activation recomputation (Megatron's): `none` saves every activation for backward; `selective`
    recomputes core attention (the s^2 scores and probabilities, the bulk at long context); `full`
    saves only the input of each group of `recompute_num_layers` layers and recomputes the rest."""
    recompute_num_layers: int = 1
    """With `full`: layers per recomputed group (Megatron's uniform method)."""

    def __post_init__(self) -> None:
        _require_choice(self.recompute, "parallel.recompute", RECOMPUTE_MODES)
        _require_choice(self.moe_token_dispatcher, "parallel.moe_token_dispatcher", TOKEN_DISPATCHERS)
        _require(self.recompute_num_layers >= 1, "parallel.recompute_num_layers", "must be >= 1")
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "context_parallel_size",
            "expert_parallel_size",
        ):
            _require(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        if self.virtual_pipeline_parallel_size is not None:
            _require(
                self.virtual_pipeline_parallel_size >= 2 and self.pipeline_parallel_size >= 2,
                "parallel.virtual_pipeline_parallel_size",
                "must be >= 2 and needs pipeline_parallel_size >= 2 (use null to disable)",
            )
        _require(
            not self.sequence_parallel or self.tensor_parallel_size > 1,
            "parallel.sequence_parallel",
            "needs tensor_parallel_size > 1",
        )
        _require_choice(self.backend, "parallel.backend", ("auto", "nccl", "gloo"))
        _require(self.timeout_s > 0, "parallel.timeout_s", "must be > 0")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: TP x PP x CP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size


ADVANTAGE_NORMALIZATIONS = ("group_std", "none")
POLICY_LOSSES = ("ppo_clip", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_CORRECTIONS = ("none", "token", "sequence")
DEFAULT_KL_CLAMP = 10.0
"""verl's bound on the per-token k3 value (``low_var_kl`` is clamped to [-10, 10])."""


@dataclass(kw_only=True)
class GRPOConfig:
    """The objective. Defaults are DeepSeekMath GRPO with token-mean aggregation and no KL."""

    advantage_normalization: str = "group_std"
    """`group_std`: (r - mean) / (std + eps) per group (GRPO); `none`: r - mean (Dr. GRPO)."""
    advantage_eps: float = 1e-6
    """Added to the group std; a group whose scores are all equal gets advantage exactly 0."""
    policy_loss: str = "ppo_clip"
    """`ppo_clip` (token-level ratio) or `gspo` (sequence-level, length-normalised ratio)."""
    clip_low: float = 0.2
    """Lower clip: the ratio is held above 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip: the ratio is held below 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages (null disables)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference model (0 skips the reference forward)."""
    kl_estimator: str = "k3"
    """KL estimator: `k1` (log-ratio), `k2` (squared log-ratio / 2) or `k3` (Schulman's unbiased)."""
    kl_clamp: float | None = DEFAULT_KL_CLAMP
    """Bound on each token's k3 KL *value* (nats): k3 is clamped to [-kl_clamp, kl_clamp] and its
    gradient is 0 beyond, as verl does (10). Without it one token far from the reference (k3 grows like
    exp(log-ratio): 396 at a log-ratio of 6) outweighs the whole batch's penalty. k1 and k2 are not
    clamped (verl does not either). null disables the clamp."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    loss_aggregation: str = "token-mean"
    """How token losses become one number; see `algo/reduce.py` for the four modes. Read once, when the
    batch is planned into micro-batches: their per-token weights carry it to the loss."""
    loss_norm_length: int | None = None
    """The constant L of `seq-mean-token-sum-norm` (tokens; unused by the other modes): each sequence's
    token sum is divided by L. null means `data.max_token_len` (prompt + completion), the value used
    before this option existed, because the trainer knows no completion budget of its own (each
    Atropos environment sets its own). TRL and Liger divide by `max_completion_length` and verl by the
    response length: set L to the environments' completion budget to match their loss scale. Any
    constant removes the length bias; L only scales the loss (hence the gradient norm that
    `optimizer.clip_grad` sees, and the step size with SGD)."""
    temperature: float = 1.0
    """Sampling temperature the logits are divided by before log-probs (match the inference side)."""
    old_logprobs: str = "auto"
    """Source of the PPO denominator pi_old. `auto`: the loss pass's own log-probs, detached, wherever
    that is exact: one update per batch (`updates_per_batch: 1`, so the policy has not moved since
    the batch was sampled), no LoRA dropout, and inference log-probs from every sequence or from none;
    the ratio is then exactly 1 and one forward pass per step is saved. Otherwise a recompute pass.
    `recompute`: a trainer forward before the update, always. `inference`: the engine's log-probs (no
    extra forward; `rollout/*` metrics then compare them with the loss pass's own, i.e. the current
    policy's, instead of with themselves)."""
    importance_correction: str = "none"
    """Truncated importance sampling against the inference log-probs: `none`, `token` or `sequence`."""
    importance_cap: float = 2.0
    """Upper truncation of the rollout/train importance weight."""
    updates_per_batch: int = 1
    """Optimizer updates per Atropos batch, each on a mini-batch of whole groups and all measured
    against the policy from before the first (PPO style); 1 is strictly on-policy."""
    kernel: str = "auto"
    """GRPO loss implementation: `triton` (fused), `torch` (chunked reference) or `auto`."""
    fused_linear: str = "auto"
    """Where log-probs and the loss come from (`kernels/fused_linear_grpo.py`). `auto`: the last hidden
    states and the output layer's weight, for the trained tokens only (prompts and padding never reach
    the output layer), in one piece while a micro-batch's fp32 logits fit in 256 MiB, else a chunk of
    tokens at a time (e.g. 16k tokens x 152k vocabulary / TP 4: 2.3 GiB), so the `[tokens, vocab/TP]`
    logits and their gradient never exist. `always`: always in chunks, which computes the loss pass's
    logits twice (time, where the output layer is a large share of the model). `never`: the model's
    whole logits over every token, as Megatron computes them. The trainer logs which."""
    env_ref_logprobs: bool = False
    """Use the `ref_logprobs` an environment sends instead of the reference model's, for the groups
    that carry them (the others are still computed). Only when the env's reference is the run's."""
    reference_offload: bool = False
    """Keep the frozen reference model in CPU memory between its forward passes (GPU runs: frees its
    weights' GPU memory for the actor at the cost of a host-to-device copy per step)."""
    moe_aux_loss_coef: float | None = None
    """MoE models: weight of the load-balancing loss (Switch Transformer's, per layer, on each
    micro-batch's tokens); null means the model's own `model.moe.router_aux_loss_coef` (config.json's
    `router_aux_loss_coef`: 0.001 for Qwen3-MoE and Mixtral), 0 turns it off. Added to the gradient,
    not to the reported GRPO loss; `moe/aux_loss` reports it."""
    routing_replay: bool = False
    """MoE models: send each token to the experts the inference engine chose for it (rollout routing
    replay), where the batch carries them (`weights.capture_routed_experts`); tokens without them keep
    the trainer's own routing. The routing weights stay the trainer's router's. `moe/replayed_token_share`
    and `moe/replay_same_experts` (how often the engine chose the trainer's own experts) say what it did."""
    moe_z_loss_coef: float = 0.0
    """MoE models: weight of the router z-loss (ST-MoE: mean squared log-sum-exp of the router logits),
    which keeps router logits small; 0 turns it off."""

    def __post_init__(self) -> None:
        _require_choice(
            self.advantage_normalization, "grpo.advantage_normalization", ADVANTAGE_NORMALIZATIONS
        )
        _require(self.advantage_eps > 0, "grpo.advantage_eps", "must be > 0")
        _require_choice(self.policy_loss, "grpo.policy_loss", POLICY_LOSSES)
        _require(0 <= self.clip_low < 1, "grpo.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _require(self.clip_high >= 0, "grpo.clip_high", f"must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None:
            _require(self.dual_clip > 1, "grpo.dual_clip", f"must be > 1 (or null), got {self.dual_clip}")
        _require(self.kl_coef >= 0, "grpo.kl_coef", "must be >= 0")
        _require_choice(self.kl_estimator, "grpo.kl_estimator", KL_ESTIMATORS)
        if self.kl_clamp is not None:
            _require(self.kl_clamp > 0, "grpo.kl_clamp", f"must be > 0 (or null), got {self.kl_clamp}")
        _require(self.entropy_coef >= 0, "grpo.entropy_coef", "must be >= 0")
        _require_choice(self.loss_aggregation, "grpo.loss_aggregation", LOSS_AGGREGATIONS)
        if self.loss_norm_length is not None:
            _require(
                self.loss_norm_length > 0,
                "grpo.loss_norm_length",
                f"must be > 0 (or null for data.max_token_len), got {self.loss_norm_length}",
            )
        _require(self.temperature > 0, "grpo.temperature", "must be > 0")
        _require_choice(self.old_logprobs, "grpo.old_logprobs", ("auto", "recompute", "inference"))
        _require_choice(self.importance_correction, "grpo.importance_correction", IMPORTANCE_CORRECTIONS)
        _require(self.importance_cap >= 1, "grpo.importance_cap", "must be >= 1")
        _require(self.updates_per_batch >= 1, "grpo.updates_per_batch", "must be >= 1")
        _require_choice(self.kernel, "grpo.kernel", ("auto", "triton", "torch"))
        _require_choice(self.fused_linear, "grpo.fused_linear", FUSED_LINEAR_MODES)
        if self.moe_aux_loss_coef is not None:
            _require(self.moe_aux_loss_coef >= 0, "grpo.moe_aux_loss_coef", "must be >= 0 (or null)")
        _require(self.moe_z_loss_coef >= 0, "grpo.moe_z_loss_coef", "must be >= 0")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Megatron optimizer and learning-rate schedule."""

    name: str = "adam"
    """`adam` (AdamW: decoupled weight decay) or `sgd`."""
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor the decay schedule ends at."""
    lr_warmup_steps: int = 0
    """Linear warm-up length (optimizer steps)."""
    lr_decay_style: str = "constant"
    """`constant`, `linear` or `cosine` decay after warm-up, over the run's `steps`."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""

    def __post_init__(self) -> None:
        _require_choice(self.name, "optimizer.name", ("adam", "sgd"))
        _require(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", f"must be in [0, lr={self.lr}]")
        _require(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", "must be >= 0")
        _require_choice(self.lr_decay_style, "optimizer.lr_decay_style", ("constant", "linear", "cosine"))
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1, f"optimizer.{name}", "must be in [0, 1)")
        _require(self.adam_eps > 0, "optimizer.adam_eps", "must be > 0")
        _require(self.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0")
        _require(
            self.name == "adam" or not self.use_distributed_optimizer,
            "optimizer.use_distributed_optimizer",
            "sgd needs use_distributed_optimizer: false (Megatron's distributed optimizer checkpoints "
            "Adam state only)",
        )


@dataclass(kw_only=True)
class DataConfig:
    """What a training batch is and how it is cut into micro-batches."""

    batch_size: int = 64
    """Sequences per Atropos batch (what the trainer registers as `batch_size`)."""
    max_token_len: int = 2048
    """Longest prompt + completion accepted (tokens); longer groups are rejected by the bridge."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch (padded tokens count)."""
    pad_to_multiple_of: int = 8
    """Sequence-length padding multiple (keeps shapes friendly to kernels and TP/SP splits)."""
    packing: bool = True
    """Pack sequences back to back into one row of up to `micro_batch_tokens` per micro-batch, in THD
    form (`cu_seqlens`: each sequence attends to itself only; no padding between them); false pads each
    sequence to the longest of its share instead."""
    batch_wait_s: float = 5.0
    """How long one request for a batch waits at the bridge (seconds); the trainer asks again until a
    batch comes, checking for SIGTERM in between."""
    wait_report_s: float = 30.0
    """While no batch comes, rank 0 logs one line this often (seconds) saying how long it has waited and
    why, in the bridge's named stalls; 0 turns the line off."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "data.batch_size", "must be > 0")
        _require(self.max_token_len > 0, "data.max_token_len", "must be > 0")
        _require(self.pad_to_multiple_of > 0, "data.pad_to_multiple_of", "must be > 0")
        _require(self.batch_wait_s > 0, "data.batch_wait_s", "must be > 0")
        _require(self.wait_report_s >= 0, "data.wait_report_s", "must be >= 0 (0: off)")
        _require(
            self.micro_batch_tokens >= self.max_token_len,
            "data.micro_batch_tokens",
            f"must hold at least one full sequence (max_token_len={self.max_token_len})",
        )


@dataclass(kw_only=True)
class BridgeConfig:
    """The gRPC bridge between the trainer, the Atropos API and the inference servers."""

    address: str = "127.0.0.1:50051"
    """host:port the bridge listens on and the trainer connects to (loopback unless changed)."""
    mode: str = "job"
    """`job`: the run's bridge (Atropos batches + weights). `agent`: a per-node bridge that only applies
    weight pushes to its node's `weights.inference_servers` (no Atropos; batch calls are refused)."""
    atropos_url: str = "http://127.0.0.1:8000"
    """Base URL of the Atropos API server (`run-api`)."""
    prefetch_batches: int = 2
    """Validated batches kept ready ahead of the trainer."""
    spool_dir: str = "runs/spool"
    """Directory where each handed-out batch is kept until the trainer acknowledges it."""
    poll_interval_s: float = 0.5
    """First wait between empty `/batch` polls (seconds); doubles up to `poll_max_interval_s`."""
    poll_max_interval_s: float = 5.0
    """Longest wait between empty `/batch` polls (seconds)."""
    request_timeout_s: float = 60.0
    """Deadline of one gRPC or HTTP call (seconds)."""
    reconnect_s: float = 300.0
    """How long the trainer keeps retrying while the bridge is unreachable (seconds): a restarted
    bridge is waited for, and the trainer registers again by itself; past this the trainer stops."""
    auth_token: str | None = None
    """Bearer token required from clients (null: no auth). Use `${oc.env:VAR}` to keep it out of files."""
    tls_cert: str | None = None
    """PEM certificate for TLS (with `tls_key`); null serves plaintext on loopback."""
    tls_key: str | None = None
    """PEM private key matching `tls_cert`."""
    tls_ca: str | None = None
    """PEM CA bundle the client verifies the bridge with."""
    max_message_bytes: int = 256 * 1024 * 1024
    """Largest gRPC message accepted either way (bytes)."""
    wandb_group: str = "atropos-megatron"
    """Sent to Atropos at registration (Atropos requires it; wandb itself is optional)."""
    wandb_project: str = "atropos-megatron"
    """Sent to Atropos at registration."""
    atropos_watch_s: float = 5.0
    """How often the bridge reads the Atropos API's state (seconds): `/status`, `/info` and `/status-env`
    per environment, beside the batch poll; `status` and the trainer's waiting line show what it saw."""
    stall_after_s: float = 30.0
    """How long the bridge must have had no batch ready before it names a stall (seconds)."""
    disconnect_quiet_envs_s: float | None = None
    """Disconnect (`POST /disconnect-env`) an environment that posted nothing for this long (seconds)
    while its `min_batch_allocation` keeps the API from forming any batch (a killed env stays registered
    and blocks every batch); logged in one line. null or 0: never (the stall is only named)."""

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        _require(
            bool(sep and host and port.isdigit()),
            "bridge.address",
            f"expected host:port, got {self.address!r}",
        )
        _require_choice(self.mode, "bridge.mode", ("job", "agent"))
        _require(
            self.atropos_url.startswith(("http://", "https://")),
            "bridge.atropos_url",
            "must start with http(s)://",
        )
        _require(self.prefetch_batches >= 1, "bridge.prefetch_batches", "must be >= 1")
        _require(self.poll_interval_s > 0, "bridge.poll_interval_s", "must be > 0")
        _require(
            self.poll_max_interval_s >= self.poll_interval_s,
            "bridge.poll_max_interval_s",
            "must be >= poll_interval_s",
        )
        _require(self.request_timeout_s > 0, "bridge.request_timeout_s", "must be > 0")
        _require(self.reconnect_s >= 0, "bridge.reconnect_s", "must be >= 0")
        _require(
            (self.tls_cert is None) == (self.tls_key is None),
            "bridge.tls_key",
            "set tls_cert and tls_key together",
        )
        _require(self.max_message_bytes > 0, "bridge.max_message_bytes", "must be > 0")
        _require(self.atropos_watch_s > 0, "bridge.atropos_watch_s", "must be > 0")
        _require(self.stall_after_s >= 0, "bridge.stall_after_s", "must be >= 0")
        _require(
            self.disconnect_quiet_envs_s is None or self.disconnect_quiet_envs_s >= 0,
            "bridge.disconnect_quiet_envs_s",
            "must be >= 0 or null (off)",
        )


WEIGHT_TRANSPORTS = ("grpc", "distributed", "disk")
PAUSE_MODES = ("abort", "retract", "in_place")
LORA_SYNCS = ("merged", "adapter")
KEPT_ADAPTERS = 2
"""With ``lora_sync: adapter``, LoRA adapters kept loaded per server: the newest and the one requests in
transit may still name (the bridge unloads the rest; the launcher sizes vLLM's ``--max-loras`` by it)."""
INFERENCE_ENGINES = ("sglang", "vllm")  # = bridge.inference_client.ENGINES
FUSED_LINEAR_MODES = ("auto", "always", "never")


@dataclass(kw_only=True)
class WeightsConfig:
    """How the trainer's weights reach the inference servers after each step (trainer and bridge read it)."""

    transport: str = "grpc"
    """`grpc` (buckets through the bridge, loaded with /update_weights_from_tensor on the bridge's
    host), `distributed` (trainer rank 0 broadcasts over NCCL/gloo to every server) or `disk`
    (safetensors in `disk_dir`, loaded with /update_weights_from_disk)."""
    inference_engine: str = "sglang"
    """What every server in `inference_servers` runs: `sglang` (SGLang, or `atropos-megatron serve`) or
    `vllm` (vLLM 0.33 with `VLLM_SERVER_DEV_MODE=1`, `--weight-transfer-config` and `--enable-scale-out`,
    or `serve --protocol vllm`; docs/vllm.md). Environments on `server_type: vllm` go through the
    bridge's proxies (`lora_proxy_ports`), which give them token ids and log-probs. It picks the routes
    the bridge calls and, for `distributed`, how the trainer joins the group and broadcasts (vLLM: one
    broadcast per tensor; its `nccl` backend needs the `vllm` package on the trainer's sending rank). A server that answers as the other engine is
    reported unhealthy with that reason. vLLM takes `transport: distributed` (or `disk` with `lora_sync:
    adapter`: adapters load through `/v1/load_lora_adapter`), `pause_mode` `abort` or `in_place` (vLLM's
    `keep`)."""
    inference_servers: list[str] = field(default_factory=list)
    """Base URLs of the SGLang (or reference) servers the bridge keeps in sync. With `grpc` they must
    share the bridge's host (tensors travel through shared memory): run one bridge per node
    (`bridge.mode=agent`) and list the agents in `bridge_agents` for more nodes."""
    bridge_agents: list[str] = field(default_factory=list)
    """host:port of per-node bridges (`bridge.mode=agent`) that the job's bridge forwards each push to."""
    bucket_bytes: int = 512 * 1024 * 1024
    """Upper bound of one weight bucket (bytes); at most one bucket is in flight beyond the model.
    A single tensor larger than this travels alone."""
    max_bucket_bytes: int = 16 * 1024**3
    """Largest bucket the bridge accepts (bytes): a guard against a malformed stream, not a tuning knob."""
    disk_dir: str | None = None
    """Shared directory for the `disk` transport; every server must be able to read it."""
    admin_api_key: str | None = None
    """SGLang admin API key (`--admin-api-key`), sent on every weight and pause call (null: none)."""
    pause_mode: str = "retract"
    """How servers pause around an update: `abort` ends in-flight requests (finish_reason abort),
    `retract` re-queues them, `in_place` freezes them (SGLang then refuses to flush its cache)."""
    update_retries: int = 2
    """Extra attempts of a failed call on one server before it is marked unhealthy and skipped."""
    retry_backoff_s: float = 1.0
    """Wait before the first retry (seconds); doubles on each further one."""
    request_timeout_s: float = 600.0
    """Deadline of one HTTP call to an inference server (seconds); weight loads of big buckets are slow."""
    flush_cache_attempts: int = 60
    """How often `/flush_cache` is tried, a second apart, while aborted requests drain (`pause_mode:
    abort`). With `retract`/`in_place` paused requests cannot drain, so it is tried once: a refused
    flush is logged and the update stands."""
    health_interval_s: float = 5.0
    """Seconds between the bridge's health checks of each server (an unreachable one is re-probed every
    0.25 s); a server that comes back behind the current weight_version is paused until the next push
    brings it up to date (0: no checks)."""
    group_name: str = "weight_update_group"
    """Process-group name of the `distributed` transport (SGLang's default)."""
    distributed_backend: str | None = None
    """Backend of the `distributed` transport: null picks `nccl` with CUDA, else `gloo`."""
    master_port: int = 0
    """TCP port trainer rank 0 listens on for the `distributed` group (0: any free port)."""
    lora_sync: str = "merged"
    """With LoRA (`model.lora.rank > 0`): `merged` sends `W + scale*B*A` as full weights (any transport;
    the servers run a plain model), `adapter` sends only the adapters, loaded as a new SGLang LoRA
    adapter per push (`/load_lora_adapter` for `disk`, `/load_lora_adapter_from_tensors` for `grpc`;
    servers need `--enable-lora`; vLLM: `disk` only, `/v1/load_lora_adapter`, servers need `--enable-lora`
    and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Environments must then reach the servers through the
    bridge's proxies (`lora_proxy_ports`), which name the newest adapter in every generation request
    (SGLang's `lora_path`, vLLM's `model`): servers apply an adapter only to requests that name it, and
    atroposlib names none."""
    lora_proxy_ports: list[int] = field(default_factory=list)
    """The bridge's inference proxies: one port per inference server (same order) on which the bridge
    forwards HTTP to that server. Point the environments' `base_url` at these. Needed by `lora_sync:
    adapter` (they add `lora_path` = the server's newest adapter to generation requests that name none),
    `capture_routed_experts`, and `inference_engine: vllm` for environments on `server_type: vllm` (they
    answer atroposlib's `/generate` through vLLM's `/inference/v1/generate`, docs/vllm.md §9)."""
    lora_proxy_host: str = "127.0.0.1"
    """Address the inference proxies listen on (0.0.0.0 to serve environments on other hosts)."""
    capture_routed_experts: bool = False
    """Rollout routing replay for MoE models: the bridge's proxies (`lora_proxy_ports`, required; they
    also name adapters with `lora_sync: adapter`) add `return_routed_experts: true` to every `/generate`
    request, keep each sample's expert ids by its token ids and take them out of the response, and the
    bridge attaches them to the batch sequences with the same tokens (`TrainingBatch.routed_experts`;
    -1 rows for the others). The servers need SGLang's `--enable-return-routed-experts`; the trainer
    registers its model's layers and top-k to receive them. Costs `2 * num_hidden_layers *
    num_experts_per_tok` bytes per token in batches (768 B for Qwen3-30B-A3B)."""
    routed_experts_store_bytes: int = 2 * 1024**3
    """Bytes of captured routings the bridge holds until a batch claims them (int16 ids + token keys);
    past it the oldest are dropped (their sequences get -1 rows). 2 GiB hold ~2.7M tokens of
    Qwen3-30B-A3B routings."""

    def __post_init__(self) -> None:
        _require_choice(self.transport, "weights.transport", WEIGHT_TRANSPORTS)
        _require_choice(self.lora_sync, "weights.lora_sync", LORA_SYNCS)
        _require_choice(self.pause_mode, "weights.pause_mode", PAUSE_MODES)
        _require_choice(self.inference_engine, "weights.inference_engine", INFERENCE_ENGINES)
        if self.inference_engine == "vllm":
            self._check_vllm()
        _require(
            self.lora_sync != "adapter" or self.transport in ("grpc", "disk"),
            "weights.lora_sync",
            "adapter needs transport grpc or disk: SGLang has no route that takes adapters from a "
            "process group (distributed)",
        )
        _require(
            not self.lora_proxy_ports or len(self.lora_proxy_ports) == len(self.inference_servers),
            "weights.lora_proxy_ports",
            f"needs one port per inference server ({len(self.inference_servers)}), got {self.lora_proxy_ports}",
        )
        for port in self.lora_proxy_ports:
            _require(0 < port < 65536, "weights.lora_proxy_ports", f"{port} is not a TCP port")
        _require(
            not self.capture_routed_experts or bool(self.lora_proxy_ports),
            "weights.capture_routed_experts",
            "needs weights.lora_proxy_ports (one per inference server): routings are captured by the "
            "bridge's proxies, so environments must generate through them",
        )
        _require(self.routed_experts_store_bytes > 0, "weights.routed_experts_store_bytes", "must be > 0")
        _require(self.bucket_bytes > 0, "weights.bucket_bytes", "must be > 0")
        _require(
            self.max_bucket_bytes >= self.bucket_bytes, "weights.max_bucket_bytes", "must be >= bucket_bytes"
        )
        _require(
            self.transport != "disk" or bool(self.disk_dir), "weights.disk_dir", "required by transport=disk"
        )
        for url in self.inference_servers:
            _require(url.startswith(("http://", "https://")), "weights.inference_servers", f"bad URL {url!r}")
        for address in self.bridge_agents:
            host, sep, port = address.rpartition(":")
            _require(
                bool(sep and host and port.isdigit()),
                "weights.bridge_agents",
                f"expected host:port, got {address!r}",
            )
        _require(self.update_retries >= 0, "weights.update_retries", "must be >= 0")
        _require(self.retry_backoff_s >= 0, "weights.retry_backoff_s", "must be >= 0")
        _require(self.request_timeout_s > 0, "weights.request_timeout_s", "must be > 0")
        _require(self.flush_cache_attempts >= 1, "weights.flush_cache_attempts", "must be >= 1")
        _require(self.health_interval_s >= 0, "weights.health_interval_s", "must be >= 0")
        _require(
            self.distributed_backend in (None, "nccl", "gloo"),
            "weights.distributed_backend",
            "must be null, 'nccl' or 'gloo'",
        )
        _require(0 <= self.master_port < 65536, "weights.master_port", "must be a TCP port or 0")

    def _check_vllm(self) -> None:
        """What vLLM 0.33's RL routes cannot do, refused by name (docs/vllm.md §4)."""
        if self.lora_sync == "adapter":
            _require(
                self.transport == "disk",
                "weights.transport",
                f"{self.transport} is not supported for LoRA adapters with inference_engine=vllm: vLLM loads "
                "adapters from a path only (/v1/load_lora_adapter); use disk",
            )
        else:
            _require(
                self.transport == "distributed",
                "weights.transport",
                f"{self.transport} is not supported with inference_engine=vllm: vLLM has no route that loads "
                "serialized tensors (grpc) and 0.33 has no disk weight-transfer engine (disk); use distributed "
                "(or lora_sync=adapter, whose adapters go by disk)",
            )
        _require(
            self.pause_mode != "retract",
            "weights.pause_mode",
            "vLLM has no retract: use in_place (vLLM's keep: paused requests continue after the update with "
            "their KV cache) or abort",
        )
        _require(
            not self.capture_routed_experts,
            "weights.capture_routed_experts",
            "needs SGLang's return_routed_experts; not supported with inference_engine=vllm",
        )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron distributed checkpoints (model, optimizer, scheduler, RNG, step)."""

    dir: str | None = None
    """Where checkpoints go; null means `<logging.run_dir>/checkpoints`."""
    save_interval_steps: int = 0
    """Save every N optimizer steps (0: only at the end and on SIGTERM)."""
    load: str | None = None
    """Resume from `latest` (in `dir`) or an explicit checkpoint directory; null starts fresh."""
    keep_last: int = 2
    """How many step checkpoints to keep (older ones are deleted after a successful save)."""

    def __post_init__(self) -> None:
        _require(self.save_interval_steps >= 0, "checkpoint.save_interval_steps", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where a run writes its logs and metrics."""

    run_dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints (unless set elsewhere)."""
    level: str = "INFO"
    """Python log level of rank 0 (other ranks log warnings and errors only)."""
    log_interval_steps: int = 1
    """Write metrics every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files under `<run_dir>/tb`."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (null: off)."""

    def __post_init__(self) -> None:
        _require_choice(self.level, "logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
        _require(self.log_interval_steps >= 1, "logging.log_interval_steps", "must be >= 1")


INFERENCE_BACKENDS = ("sglang", "vllm", "reference")
HEAD_PLACEMENTS = ("first", "dedicated")


@dataclass(kw_only=True)
class InferenceLaunchConfig:
    """The inference servers `atropos-megatron launch` starts (the trainer and bridge ignore it)."""

    backend: str = "sglang"
    """`sglang` (`python -m sglang.launch_server`), `vllm` (stock `vllm serve` with its RL routes; sets
    `weights.inference_engine=vllm`, environments use `server_type: openai`, docs/vllm.md §7) or
    `reference` (`atropos-megatron serve`: HF transformers, for CPU runs and tests; in vLLM mode with
    `weights.inference_engine=vllm`)."""
    gpus_per_server: int = 1
    """GPUs of one server (SGLang `--tp-size`, vLLM `--tensor-parallel-size`)."""
    servers_per_node: int | None = None
    """Servers on each inference node (null: as many as fit, `gpus_per_node // gpus_per_server`, or 1
    without GPUs)."""
    colocated_servers: int | None = None
    """Servers on the first training node, next to the trainer (single-node runs): they take that
    node's first `colocated_servers x gpus_per_server` GPUs and the trainer the rest (null: 1 when
    there are no inference nodes, else 0)."""
    port: int = 30000
    """Port of a node's first server; the next ones count up."""
    model_path: str | None = None
    """What the servers load (null: `model.hf_path`)."""
    python: str | None = None
    """Interpreter that runs SGLang or vLLM (null: this one); they often live in a virtualenv of their own."""
    extra_args: list[str] = field(default_factory=list)
    """Appended to each server's command, e.g. `["--mem-fraction-static", "0.85"]`."""

    def __post_init__(self) -> None:
        _require_choice(self.backend, "launch.inference.backend", INFERENCE_BACKENDS)
        _require(self.gpus_per_server >= 1, "launch.inference.gpus_per_server", "must be >= 1")
        _require(
            self.servers_per_node is None or self.servers_per_node >= 1,
            "launch.inference.servers_per_node",
            "must be >= 1 (or null)",
        )
        _require(
            self.colocated_servers is None or self.colocated_servers >= 0,
            "launch.inference.colocated_servers",
            "must be >= 0 (or null)",
        )
        _require(0 < self.port < 65536, "launch.inference.port", "must be a TCP port")


@dataclass(kw_only=True)
class EnvironmentLaunchConfig:
    """One Atropos environment process, started on the head node."""

    name: str
    """Role name: its log is `<name>.log`."""
    command: str
    """Command line (split like a shell would, never run by one). Placeholders: `{api_url}`,
    `{inference_url}` (the first server), `{inference_urls}` (comma-separated), `{model_path}`,
    `{run_dir}`, `{seed}`, `{python}` (the launcher's interpreter), `{env_launcher}` (`{python} -m
    atropos_megatron.demo.env_launcher`: runs `SCRIPT serve ...` with the fixes `atropos-megatron run`
    applies for atroposlib 0.4.0), `{server_type}` (the atroposlib `server_type` the started servers
    take: `sglang`, `openai` for stock vLLM, `vllm` for the reference server in vLLM mode). The same
    values are in the environment variables ATROPOS_API_URL,
    INFERENCE_URLS and MODEL_PATH."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for this process only (values take the same placeholders), e.g.
    `{HF_HOME: /shared/hf, MY_ENV_SEED: "{seed}"}`."""
    cwd: str | None = None
    """Working directory of the process (placeholders allowed; null: the launcher's)."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "launch.environments.name", "must not be empty")
        _require(bool(self.command.strip()), f"launch.environments[{self.name}].command", "must not be empty")


@dataclass(kw_only=True)
class LaunchConfig:
    """Which process runs on which node of a Slurm allocation (`atropos-megatron launch`).

    The allocation's nodes are used in order: the head services (Atropos API, bridge, environments)
    on the first node (or a node of their own), then `train_nodes` training nodes, then
    `inference_nodes` inference nodes."""

    train_nodes: int = 1
    """Nodes that run trainer ranks (torchrun, one per node, static rendezvous)."""
    inference_nodes: int = 0
    """Nodes that run only inference servers."""
    head: str = "first"
    """`first`: the head services share the first training node; `dedicated`: they get a node of
    their own (the allocation then needs one more node)."""
    gpus_per_node: int = 8
    """GPUs per node (0: a CPU run)."""
    trainer_procs_per_node: int | None = None
    """Trainer ranks per training node (null: the node's GPUs left to the trainer; 1 without GPUs)."""
    api_url: str | None = None
    """An Atropos API that already runs elsewhere (null: start atroposlib's API on the head node)."""
    api_port: int = 8000
    """Port of the Atropos API started on the head node."""
    bridge_port: int = 50051
    """Port of the bridge on the head node (and of the per-node bridge agents)."""
    proxy_port: int = 8100
    """First port of the bridge's inference proxies on the head node, one per server (`proxy_port + k`),
    started where environments need them: vLLM servers (`backend: vllm`, or `reference` in vLLM mode),
    whose `/generate` for atroposlib's `server_type: vllm` the proxies provide. Environments then get
    the proxies' URLs (`{inference_urls}`)."""
    master_port: int = 0
    """Rendezvous port of the trainer's first node (0: 20000 + Slurm job id % 10000)."""
    startup_timeout_s: float = 1800.0
    """How long a role waits for the services it needs (a 70B SGLang server loads for minutes)."""
    trainer_stop_grace_s: float = 600.0
    """After SIGTERM, how long the trainer may take to write its checkpoint before it is killed
    (Slurm's own KillWait must allow as much: `#SBATCH --signal` or a site's GraceTime)."""
    stop_grace_s: float = 30.0
    """How long the other roles get between SIGTERM and SIGKILL."""
    inference: InferenceLaunchConfig = field(default_factory=InferenceLaunchConfig)
    environments: list[EnvironmentLaunchConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.train_nodes >= 1, "launch.train_nodes", "must be >= 1")
        _require(self.inference_nodes >= 0, "launch.inference_nodes", "must be >= 0")
        _require_choice(self.head, "launch.head", HEAD_PLACEMENTS)
        _require(self.gpus_per_node >= 0, "launch.gpus_per_node", "must be >= 0")
        _require(
            self.trainer_procs_per_node is None or self.trainer_procs_per_node >= 1,
            "launch.trainer_procs_per_node",
            "must be >= 1 (or null)",
        )
        for name in ("api_port", "bridge_port", "proxy_port"):
            _require(0 < getattr(self, name) < 65536, f"launch.{name}", "must be a TCP port")
        _require(0 <= self.master_port < 65536, "launch.master_port", "must be a TCP port or 0")
        _require(self.startup_timeout_s > 0, "launch.startup_timeout_s", "must be > 0")
        _require(self.trainer_stop_grace_s > 0, "launch.trainer_stop_grace_s", "must be > 0")
        _require(self.stop_grace_s > 0, "launch.stop_grace_s", "must be > 0")
        names = [env.name for env in self.environments]
        _require(len(set(names)) == len(names), "launch.environments", f"duplicate names in {names}")
        _require(
            self.inference_nodes > 0 or self.colocated_servers > 0,
            "launch.inference.colocated_servers",
            "no inference server anywhere: set launch.inference_nodes >= 1 or colocated_servers >= 1",
        )

    @property
    def colocated_servers(self) -> int:
        """Inference servers on the first training node (`inference.colocated_servers` resolved)."""
        configured = self.inference.colocated_servers
        if configured is not None:
            return configured
        return 1 if self.inference_nodes == 0 else 0

    @property
    def num_nodes(self) -> int:
        """Nodes the allocation must have."""
        return self.train_nodes + self.inference_nodes + (1 if self.head == "dedicated" else 0)


@dataclass(kw_only=True)
class TrainConfig:
    """The whole run. Each component receives only its own section."""

    steps: int = 100
    """Training steps: one Atropos batch each (and `grpo.updates_per_batch` optimizer updates)."""
    seed: int = 1234
    """Seed for model init and every random stream (per-rank streams derive from it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Read only by `atropos-megatron launch`."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, "steps", "must be > 0")
        _require(
            self.weights.lora_sync == "merged" or self.model.lora.enabled,
            "weights.lora_sync",
            "adapter needs LoRA adapters to send (model.lora.rank > 0)",
        )
        # With an HF or Megatron checkpoint the architecture is read from it later (the fields here are
        # then placeholders), so these checks run again on the resolved architecture.
        explicit = self.model.hf_path is None and self.model.dist_checkpoint is None
        if explicit:
            _require(
                self.data.max_token_len <= self.model.max_position_embeddings,
                "data.max_token_len",
                f"{self.data.max_token_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}",
            )
        _require(
            self.model.query_groups % self.parallel.tensor_parallel_size == 0 or not explicit,
            "parallel.tensor_parallel_size",
            f"{self.parallel.tensor_parallel_size} does not divide the {self.model.query_groups} "
            "key/value heads",
        )


# ------------------------------------------------------------------------------------------------
# Loading and dumping
# ------------------------------------------------------------------------------------------------


def load_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from defaults, a YAML file and dotlist overrides.

    Args:
        yaml_path: a YAML file with any subset of the schema (None: defaults only).
        overrides: ``key=value`` strings applied last, e.g. ``["optimizer.lr=1e-6", "steps=10"]``.

    Raises:
        ConfigError: naming the field, for an unknown key, a wrong type or an invalid value.
        FileNotFoundError: if ``yaml_path`` does not exist.
    """
    layers = [OmegaConf.structured(TrainConfig)]
    try:
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, dict) and not OmegaConf.is_dict(loaded):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
            layers.append(loaded)
        for item in overrides:
            _require("=" in item, item, "an override must look like key=value (e.g. optimizer.lr=1e-6)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ConfigError(_describe_unknown_key(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe_omegaconf_error(exc)) from None
    assert isinstance(cfg, TrainConfig)
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (what a run writes next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved configuration to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path


def _describe_unknown_key(exc: ConfigKeyError) -> str:
    full_key = exc.full_key or str(exc.key)
    parent, _, leaf = full_key.rpartition(".")
    known = _known_keys(parent)
    hint = difflib.get_close_matches(leaf, known, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    listing = f"; known keys: {', '.join(known)}" if known and not hint else ""
    return f"{full_key}: unknown key{suggestion}{listing}"


def _describe_omegaconf_error(exc: OmegaConfBaseException) -> str:
    full_key = getattr(exc, "full_key", None) or "<config>"
    message = getattr(exc, "msg", None) or str(exc)
    return f"{full_key}: {message.splitlines()[0]}"


def _known_keys(section: str) -> list[str]:
    """Field names of the top-level config (``section == ""``) or of a (nested) section (``model.lora``)."""
    schema: object = TrainConfig
    for part in filter(None, section.split(".")):
        schema = typing.get_type_hints(schema).get(part)
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            return []
    return [f.name for f in dataclasses.fields(schema)]
