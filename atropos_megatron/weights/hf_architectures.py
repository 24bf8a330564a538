"""HuggingFace ``config.json`` -> our ``ModelConfig``, for the architectures people train with GRPO.

A registry keyed by the exact ``model_type``. Each entry says what the architecture adds to the
common Llama block (Qwen2: bias on q/k/v; Qwen3: RMSNorm on per-head queries and keys; Qwen3-MoE and
Mixtral: mixture-of-experts MLPs with a softmax top-k router). A feature Megatron would silently
compute differently (sliding-window attention, a RoPE scaling other than Llama 3.1's, biases on the
output or MLP projections, shared experts, router jitter) is an error that says what is supported:
converting such a model "successfully" would train a different network.

Both config styles are read: transformers 5's ``rope_parameters`` and the older top-level
``rope_theta`` / ``rope_scaling``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atropos_megatron.config import ModelConfig, MoEConfig

# ModelConfig fields that are choices of the run, not of the network's function.
# LoRA adapters are trained on top of a base network, so a checkpoint's base architecture matches with any.
NON_ARCHITECTURE_FIELDS = frozenset(
    {"hf_path", "dtype", "make_vocab_size_divisible_by", "init_method_std", "lora"}
)

# Megatron-Core 0.16's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling).
_LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class Architecture:
    """What one HF ``model_type`` adds to the Llama block."""

    qkv_bias: bool = False
    """q/k/v projections always carry a bias (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys (Qwen3)."""
    moe: str | None = None
    """MoE MLPs with this family's HF tensor names (``MoEConfig.hf_layout``); None: dense."""


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(qkv_bias=True),
    "qwen3": Architecture(qk_norm=True),
    "qwen3_moe": Architecture(qk_norm=True, moe="qwen3_moe"),
    "mixtral": Architecture(moe="mixtral"),
}
# MoE families we know and why they are not supported yet (a clearer error than "unknown model_type").
_UNSUPPORTED_MOE = {
    "qwen2_moe": "shared experts (shared_expert_intermediate_size) are not supported yet",
    "deepseek_v3": "multi-head latent attention and shared experts are not supported yet",
    "glm4_moe": "shared experts and a sigmoid router with expert bias are not supported yet",
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a HuggingFace checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file} (expected a HuggingFace checkpoint directory)")
    return json.loads(file.read_text())


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """``ModelConfig`` for an HF config dict; ``overrides`` set non-architecture fields (``dtype``,
    ``make_vocab_size_divisible_by``, ...).

    Raises:
        ValueError: unknown ``model_type`` or a feature we cannot reproduce exactly.
    """
    model_type = hf.get("model_type")
    if model_type in _UNSUPPORTED_MOE:
        raise ValueError(f"model_type {model_type!r}: {_UNSUPPORTED_MOE[model_type]}")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ARCHITECTURES[model_type]
    _reject_unsupported(hf, model_type)
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_base=theta,
        rope_scaling_factor=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if arch.moe is not None:
        fields["moe"] = _moe(hf, arch.moe)
    return ModelConfig(**{**fields, **overrides})


def _moe(hf: Mapping[str, Any], layout: str) -> MoEConfig:
    """Qwen3-MoE's and Mixtral's expert fields, in their own config.json spellings."""
    num_experts = hf.get("num_experts") or hf.get("num_local_experts")
    layers = hf["num_hidden_layers"]
    if layout == "qwen3_moe":
        # HF: layer i is sparse iff i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
        step = hf.get("decoder_sparse_step") or 1
        dense_only = set(hf.get("mlp_only_layers") or [])
        dense = [i for i in range(layers) if i in dense_only or (i + 1) % step]
        return MoEConfig(
            num_experts=num_experts,
            router_topk=hf["num_experts_per_tok"],
            ffn_hidden_size=hf["moe_intermediate_size"],
            normalize_topk=bool(hf.get("norm_topk_prob", False)),
            dense_layers=dense,
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
            hf_layout=layout,
        )
    return MoEConfig(  # Mixtral: every layer is MoE, experts are intermediate_size wide, always renormalised
        num_experts=num_experts,
        router_topk=hf["num_experts_per_tok"],
        ffn_hidden_size=hf["intermediate_size"],
        normalize_topk=True,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
        hf_layout=layout,
    )


def _reject_unsupported(hf: Mapping[str, Any], model_type: str) -> None:
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu', i.e. SwiGLU)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (bias on the output projection)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if ARCHITECTURES[model_type].moe is None:
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if hf.get(key):
                problems.append(f"{key}={hf[key]} (mixture of experts in a dense architecture)")
    else:
        if hf.get("router_jitter_noise"):
            problems.append(f"router_jitter_noise={hf['router_jitter_noise']} (multiplicative router noise)")
        if hf.get("shared_expert_intermediate_size"):
            problems.append("shared_expert_intermediate_size (shared experts)")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < hf.get("max_position_embeddings", 0):
        problems.append(
            f"sliding_window={window} (sliding-window attention; set it to null in config.json "
            "if you only train on sequences shorter than the window)"
        )
    if problems:
        raise ValueError(f"{model_type} checkpoint uses unsupported features: {'; '.join(problems)}")


def _rope(hf: Mapping[str, Any]) -> tuple[float, float | None]:
    """``(theta, llama3 scaling factor or None)`` from either config style."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported; supported: default, llama3")
    for key, value in _LLAMA3_ROPE_FIXED.items():
        if float(params.get(key, value)) != value:
            raise ValueError(
                f"llama3 RoPE scaling with {key}={params[key]} is not supported "
                f"(Megatron-Core fixes {key}={value})"
            )
    return theta, float(params["factor"])


def resolve_architecture(model: ModelConfig) -> ModelConfig:
    """``model`` with its architecture read from ``model.hf_path``'s config.json when that is set.

    Fields that are not architecture (``dtype``, ``make_vocab_size_divisible_by``,
    ``init_method_std``, ``lora``) keep the configured values.
    """
    if model.hf_path is None:
        return model
    kept = {name: getattr(model, name) for name in NON_ARCHITECTURE_FIELDS}
    return model_config_from_hf(read_hf_config(model.hf_path), **kept)


def architecture_mismatches(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``field: a != b`` for every architecture field on which two configs disagree."""
    return [
        f"{field.name}: {getattr(a, field.name)!r} != {getattr(b, field.name)!r}"
        for field in dataclasses.fields(ModelConfig)
        if field.name not in NON_ARCHITECTURE_FIELDS and getattr(a, field.name) != getattr(b, field.name)
    ]
