"""HuggingFace <-> Megatron-Core tensors for the Llama family: names, fused layouts, vocabulary padding.

The one place that knows HF parameter names. It works on *full* (TP=1, PP=1) tensors, one at a time
where it can: the TP split is ``megatron_shards.shard_tensor``'s job (one rule from each parameter's
own partition attributes) and pipeline stages are just layer numbers, so the converter, the
trainer's initial load and the weight export all share this mapping.

Megatron fuses two groups of HF tensors (layouts in ``notes/rl-anchors.md`` §7):

- ``linear_qkv``: per query group g, ``[q heads of g; k_g; v_g]`` (heads of ``head_dim`` rows), so a
  TP rank's contiguous row slice holds whole groups. Bias the same way (Qwen2).
- ``linear_fc1``: ``[gate; up]`` (the strided TP split then gives each rank its own gate and up rows).

Embedding and output rows are padded with zeros to the padded vocabulary (Megatron's TP-divisible
size) and the padding is cut on the way back. With tied embeddings HF checkpoints have no
``lm_head.weight`` and Megatron no ``output_layer.weight``.

MoE layers (``model.moe``) use the hub's per-expert names, which checkpoints on disk, SGLang and vLLM
use (transformers 5 fuses experts into 3-D tensors in memory only): the router
(``mlp.gate`` / Mixtral's ``block_sparse_moe.gate``) is Megatron's ``mlp.router``, and expert E's
gate/up/down projections (``mlp.experts.E.{gate,up,down}_proj`` / ``block_sparse_moe.experts.E.w{1,3,2}``)
are ``mlp.experts.local_experts.E.linear_fc1`` (``[gate; up]``) and ``linear_fc2``, E global.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.megatron_shards import local_name

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer tensors that map one to one (HF suffix -> Megatron suffix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_GLOBAL_RENAMES = {"model.norm.weight": "decoder.final_layernorm.weight"}
_VOCAB_TENSORS = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "lm_head.weight": "output_layer.weight",
}
# HF tensors that Megatron builds into its fused ones: (fused suffix, parts in fused order).
_FUSED = {
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_qkv.bias": (
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_PART_OF = {part: fused for fused, parts in _FUSED.items() for part in parts}
_QK_NORMS = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
_DENSE_MLP = {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}

# MoE layers, per ``MoEConfig.hf_layout``: (router, expert prefix, (gate, up, down) projection names).
_MOE_HF_NAMES = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1", "w3", "w2")),
}
_MCORE_ROUTER = "mlp.router.weight"
_MCORE_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_HF_EXPERT = re.compile(r"^(.+)\.(\d+)\.(\w+)\.weight$")


def _layer_target(suffix: str, layer: int, model: ModelConfig) -> tuple[str, tuple[str, ...] | None] | None:
    """``(Megatron suffix, HF parts in fused order or None)`` for an HF per-layer suffix; None: not
    a tensor of this layer (a Qwen3 q_norm in a Llama, an expert in a dense layer, ...)."""
    moe_layer = layer in model.moe_layers
    if moe_layer:
        router, prefix, (gate, up, down) = _MOE_HF_NAMES[model.moe.hf_layout]
        if suffix == router:
            return _MCORE_ROUTER, None
        expert = _HF_EXPERT.match(suffix)
        if expert and expert.group(1) == prefix and int(expert.group(2)) < model.moe.num_experts:
            index, projection = expert.group(2), expert.group(3)
            fc1 = f"mlp.experts.local_experts.{index}.linear_fc1.weight"
            if projection in (gate, up):
                return fc1, (f"{prefix}.{index}.{gate}.weight", f"{prefix}.{index}.{up}.weight")
            if projection == down:
                return f"mlp.experts.local_experts.{index}.linear_fc2.weight", None
        if suffix in _DENSE_MLP:
            return None
    if suffix in _LAYER_RENAMES and _expected(suffix, model):
        return _LAYER_RENAMES[suffix], None
    if suffix in _PART_OF and _expected(suffix, model):
        fused = _PART_OF[suffix]
        return fused, _FUSED[fused]
    return None


def _hf_layer_names(suffix: str, model: ModelConfig) -> tuple[str, ...] | None:
    """HF suffixes (in fused order) of a Megatron MoE per-layer suffix; None: not a MoE tensor."""
    if not model.moe.enabled:
        return None
    router, prefix, (gate, up, down) = _MOE_HF_NAMES[model.moe.hf_layout]
    if suffix == _MCORE_ROUTER:
        return (router,)
    expert = _MCORE_EXPERT.match(suffix)
    if not expert:
        return None
    index = expert.group(1)
    projections = (gate, up) if expert.group(2) == "linear_fc1" else (down,)
    return tuple(f"{prefix}.{index}.{projection}.weight" for projection in projections)


def hf_to_megatron(
    hf_tensors: Iterable[tuple[str, torch.Tensor]], model: ModelConfig, *, padded_vocab: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron ``(global name, full tensor)`` pairs from HF ones, streaming.

    Only the parts of one fused tensor wait for each other (q/k/v, gate/up of a layer); everything else
    is yielded as soon as it is read.

    Raises:
        ValueError: an HF tensor this architecture does not have, a missing part of a fused tensor, or a
            shape that does not match ``model``.
    """
    pending: dict[tuple[int, str], tuple[tuple[str, ...], dict[str, torch.Tensor]]] = {}
    for name, tensor in hf_tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older checkpoints saved; Megatron recomputes it
        if name in _VOCAB_TENSORS:
            if name == "lm_head.weight" and model.tie_word_embeddings:
                continue  # tied: the embedding is the output layer
            yield _VOCAB_TENSORS[name], _pad_rows(tensor, model.vocab_size, padded_vocab, name)
            continue
        if name in _GLOBAL_RENAMES:
            yield _GLOBAL_RENAMES[name], tensor
            continue
        match = _HF_LAYER.match(name)
        if not match or int(match.group(1)) >= model.num_layers:
            raise ValueError(f"unexpected tensor {name!r} for a {model.num_layers}-layer model")
        layer, suffix = int(match.group(1)), match.group(2)
        prefix = f"decoder.layers.{layer}."
        target = _layer_target(suffix, layer, model)
        if target is None:
            raise ValueError(f"unexpected tensor {name!r} for this architecture")
        fused, part_names = target
        if part_names is None:
            yield prefix + fused, tensor
            continue
        _, parts = pending.setdefault((layer, fused), (part_names, {}))
        parts[suffix] = tensor
        if len(parts) == len(part_names):
            del pending[(layer, fused)]
            yield prefix + fused, _fuse(fused, [parts[p] for p in part_names], model)
    if pending:
        (layer, fused), (part_names, parts) = next(iter(pending.items()))
        missing = sorted(set(part_names) - set(parts))
        raise ValueError(f"layer {layer}: missing {', '.join(f'model.layers.{layer}.{m}' for m in missing)}")


def megatron_targets(hf_name: str, model: ModelConfig) -> tuple[str, ...] | None:
    """Global Megatron names that the HF tensor ``hf_name`` feeds (None: not a tensor we know).

    Lets a pipeline stage skip reading tensors it does not hold. With tied embeddings the HF
    embedding also feeds ``output_layer.weight``, the last stage's copy of it when PP > 1.
    """
    if hf_name == "model.embed_tokens.weight":
        tied = ("output_layer.weight",) if model.tie_word_embeddings else ()
        return (_VOCAB_TENSORS[hf_name], *tied)
    if hf_name == "lm_head.weight":
        return () if model.tie_word_embeddings else (_VOCAB_TENSORS[hf_name],)
    if hf_name in _GLOBAL_RENAMES:
        return (_GLOBAL_RENAMES[hf_name],)
    match = _HF_LAYER.match(hf_name)
    if not match or int(match.group(1)) >= model.num_layers:
        return None
    target = _layer_target(match.group(2), int(match.group(1)), model)
    return (f"decoder.layers.{match.group(1)}.{target[0]}",) if target else None


def linear_projections(linear: str) -> tuple[str, ...]:
    """HF projection modules that the Megatron linear ``linear`` computes, in its output-row order.

    ``linear`` is relative to a decoder layer (``self_attention.linear_qkv`` -> ``self_attn.q_proj``,
    ``self_attn.k_proj``, ``self_attn.v_proj``). LoRA's canonical adapters hang off these HF names.

    Raises:
        ValueError: ``linear`` is not one of the layer's four linear layers.
    """
    weight = f"{linear}.weight"
    if weight in _FUSED:
        return tuple(part.removesuffix(".weight") for part in _FUSED[weight])
    for hf_suffix, mcore_suffix in _LAYER_RENAMES.items():
        if mcore_suffix == weight and hf_suffix.endswith("_proj.weight"):
            return (hf_suffix.removesuffix(".weight"),)
    raise ValueError(f"{linear!r} is not a linear layer of a decoder layer")


def fuse_rows(linear: str, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """``linear``'s output rows built from its HF projections' rows (per-group q/k/v, ``[gate; up]``).

    The layout :func:`hf_to_megatron` gives the fused weights, for any tensor whose first dimension
    is output channels (weights, biases, LoRA ``B`` factors). With ``model``'s heads and groups
    divided by the TP size it gives one TP rank's rows from that rank's rows of each part.
    """
    weight = f"{linear}.weight"
    if weight not in _FUSED:
        (only,) = parts
        return only
    return _fuse(weight, parts, model)


def megatron_to_hf(
    mcore_tensors: Iterable[tuple[str, torch.Tensor]], model: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs from Megatron full tensors (the inverse of :func:`hf_to_megatron`).

    Raises:
        ValueError: a Megatron tensor this mapping does not know.
    """
    vocab_names = {mcore: hf for hf, mcore in _VOCAB_TENSORS.items()}
    global_names = {mcore: hf for hf, mcore in _GLOBAL_RENAMES.items()}
    layer_names = {mcore: hf for hf, mcore in _LAYER_RENAMES.items()}
    for name, tensor in mcore_tensors:
        if name.endswith("._extra_state"):
            continue  # Transformer Engine's FP8 metadata, not a weight
        if name in vocab_names:
            if name == "output_layer.weight" and model.tie_word_embeddings:
                continue
            yield vocab_names[name], tensor[: model.vocab_size]
            continue
        if name in global_names:
            yield global_names[name], tensor
            continue
        match = _MCORE_LAYER.match(local_name(name))
        suffix = match.group(2) if match else None
        moe_names = _hf_layer_names(suffix, model) if suffix else None
        if moe_names is not None:
            parts = torch.chunk(tensor, 2, dim=0) if len(moe_names) == 2 else (tensor,)
            for part_name, part in zip(moe_names, parts, strict=True):
                yield f"model.layers.{match.group(1)}.{part_name}", part
        elif suffix in layer_names:
            yield f"model.layers.{match.group(1)}.{layer_names[suffix]}", tensor
        elif suffix in _FUSED:
            parts = _split(suffix, tensor, model)
            for part_name, part in zip(_FUSED[suffix], parts, strict=True):
                yield f"model.layers.{match.group(1)}.{part_name}", part
        else:
            raise ValueError(f"unexpected Megatron tensor {name!r}")


def _expected(hf_suffix: str, model: ModelConfig) -> bool:
    """Whether this architecture has the tensor at all (a Qwen3 q_norm in a Llama is an error)."""
    if hf_suffix in _QK_NORMS:
        return model.qk_layernorm
    if hf_suffix in _FUSED["self_attention.linear_qkv.bias"]:
        return model.add_qkv_bias
    return True


def _head_dim(model: ModelConfig) -> int:
    return model.head_dim or model.hidden_size // model.num_attention_heads


def _fuse(fused: str, parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    if fused.endswith("linear_fc1.weight"):
        return torch.cat(parts, dim=0)
    groups, dim = model.query_groups, _head_dim(model)
    q, k, v = parts
    expected_rows = (model.num_attention_heads * dim, groups * dim, groups * dim)
    if tuple(p.shape[0] for p in parts) != expected_rows:
        raise ValueError(
            f"q/k/v have {[p.shape[0] for p in parts]} rows; the config implies {list(expected_rows)} "
            f"({model.num_attention_heads} heads, {groups} groups, head_dim {dim})"
        )
    tail = q.shape[1:]
    per_group = [q.reshape(groups, -1, *tail), k.reshape(groups, dim, *tail), v.reshape(groups, dim, *tail)]
    return torch.cat(per_group, dim=1).reshape(-1, *tail)


def _split(fused: str, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    if fused == "mlp.linear_fc1.weight":
        return list(torch.chunk(tensor, 2, dim=0))
    groups, dim = model.query_groups, _head_dim(model)
    tail = tensor.shape[1:]
    per_group = tensor.reshape(groups, -1, *tail)
    q, k, v = torch.split(per_group, [per_group.shape[1] - 2 * dim, dim, dim], dim=1)
    return [t.reshape(-1, *tail) for t in (q, k, v)]


def _pad_rows(tensor: torch.Tensor, vocab_size: int, padded_vocab: int, name: str) -> torch.Tensor:
    if tensor.shape[0] != vocab_size:
        raise ValueError(f"{name} has {tensor.shape[0]} rows but config.json says vocab_size={vocab_size}")
    if padded_vocab == vocab_size:
        return tensor
    padding = tensor.new_zeros(padded_vocab - vocab_size, *tensor.shape[1:])
    return torch.cat([tensor, padding], dim=0)
