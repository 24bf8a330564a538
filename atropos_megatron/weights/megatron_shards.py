"""Cut a full (TP=1, PP=1) Megatron state dict into one rank's shards, and name shards globally.

Megatron marks every split parameter with how it is split (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``), so one rule covers column-parallel, row-parallel,
vocab-parallel and the strided SwiGLU ``linear_fc1`` (``[gate_r; up_r]`` on rank r): the full tensor
is cut into ``TP x stride`` equal blocks along ``partition_dim`` and rank r takes blocks
``r, r + TP, ...`` — the same rule Megatron uses when it initialises weights on the CPU. Pipeline
stages are handled by naming: each layer knows its global ``layer_number``, and expert parallelism
the same way: each MoE layer knows the global indices of the experts it holds (``local_expert_indices``),
so an expert is named as it would be at EP=1 (``...mlp.experts.local_experts.<global index>...``).

Gathering is the inverse (:func:`gather_shards`): given every TP rank's shard of a parameter, in rank
order, it rebuilds the full tensor by the same rule. It is pure; collecting the shards over the TP group
is the exporter's job (``weights/export.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import torch

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")
_ROUTER = ".mlp.router.weight"
_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"
# Transformer Engine's spec names the pre-attention / pre-MLP norms after the next (fused) linear layer.
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def local_name(name: str) -> str:
    """``name`` with Transformer Engine's norm names replaced by the local spec's (others unchanged)."""
    for te_suffix, local_suffix in TE_NORM_NAMES.items():
        if name.endswith(te_suffix):
            return name.removesuffix(te_suffix) + local_suffix
    return name


def iter_global_params(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global_name, param)`` for each parameter of a model chunk.

    Global names are what the parameter is called in a TP=1, PP=1, EP=1 model: decoder layer indices
    are global (``layer_number - 1``), whatever pipeline stage holds them, and so are expert indices,
    whatever expert-parallel rank holds them.
    """
    layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
    for name, param in chunk.named_parameters():
        match = _LAYER_PREFIX.match(name)
        if match:
            layer = layers[int(match.group(1))]
            rest = name[match.end() :]
            expert = _LOCAL_EXPERT.match(rest)
            if expert:
                global_expert = layer.mlp.local_expert_indices[int(expert.group(1))]
                rest = f"mlp.experts.local_experts.{global_expert}.{rest[expert.end() :]}"
            name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
        yield name, param


def iter_routers(chunk: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
    """``(global layer index, router module)`` of each MoE layer of a model chunk (unwrapped)."""
    layers = {id(param): name for name, param in iter_global_params(chunk) if name.endswith(_ROUTER)}
    for module in chunk.modules():
        name = layers.get(id(getattr(module, "weight", None)))
        if name is not None:
            yield int(name.split(".")[2]), module


def is_expert_name(name: str) -> bool:
    """Whether a global parameter name is a routed expert's (held by one expert-parallel rank)."""
    return ".mlp.experts.local_experts." in name


def shift_expert(name: str, offset: int) -> str:
    """An expert's global ``name`` with its expert index moved by ``offset`` (the same local expert
    on another expert-parallel rank: ``offset = ep_rank x experts per rank``)."""
    prefix, rest = name.split(".mlp.experts.local_experts.", 1)
    index, tail = rest.split(".", 1)
    return f"{prefix}.mlp.experts.local_experts.{int(index) + offset}.{tail}"


def shard_tensor(full: torch.Tensor, param: torch.Tensor, *, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of ``full`` that ``param`` holds on tensor-parallel rank ``tp_rank``."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    if full.shape[dim] % (tp_size * stride):
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} does not split into {tp_size} ranks x stride {stride}"
        )
    blocks = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(blocks[tp_rank::tp_size], dim=dim)


def gather_shards(shards: Sequence[torch.Tensor], param: torch.Tensor, *, tp_size: int) -> torch.Tensor:
    """The full tensor whose TP slices are ``shards`` (rank order): the inverse of :func:`shard_tensor`.

    ``param`` is any rank's copy of the parameter; only its partition attributes are read. A parameter
    that is not split (or ``tp_size == 1``) is whole on every rank: the first shard is returned as is.

    Raises:
        ValueError: not ``tp_size`` shards, or shards that differ in shape or do not split into
            ``partition_stride`` blocks.
    """
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return shards[0]
    if len(shards) != tp_size:
        raise ValueError(f"expected {tp_size} shards (one per TP rank), got {len(shards)}")
    if len({tuple(shard.shape) for shard in shards}) != 1:
        raise ValueError(f"shards differ in shape: {[tuple(shard.shape) for shard in shards]}")
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    if stride == 1:
        return torch.cat(list(shards), dim=dim)
    if shards[0].shape[dim] % stride:
        raise ValueError(
            f"dimension {dim} of size {shards[0].shape[dim]} does not split into stride {stride}"
        )
    # Rank r holds full blocks r, r + TP, ...: block s * TP + r is the s-th block of shard r.
    blocks = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat([blocks[rank][s] for s in range(stride) for rank in range(tp_size)], dim=dim)


def load_full_state_dict(
    chunks: Sequence[torch.nn.Module],
    full: Mapping[str, torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
) -> None:
    """Copy this rank's shards of ``full`` into ``chunks`` (in place).

    Raises:
        KeyError: a parameter of the chunk has no entry in ``full``.
        ValueError: a shard's shape differs from the parameter's.
    """
    for chunk in chunks:
        for name, param in iter_global_params(chunk):
            copy_shard(param, _lookup(full, name), name=name, tp_rank=tp_rank, tp_size=tp_size)


def copy_shard(param: torch.Tensor, full: torch.Tensor, *, name: str, tp_rank: int, tp_size: int) -> None:
    """Copy this TP rank's slice of the full tensor ``full`` into ``param`` (in place).

    Raises:
        ValueError: the slice's shape differs from the parameter's.
    """
    shard = shard_tensor(full, param, tp_rank=tp_rank, tp_size=tp_size)
    if shard.shape != param.shape:
        raise ValueError(f"{name}: shard {tuple(shard.shape)} != parameter {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(shard)


def _lookup(full: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name in full:
        return full[name]
    if local_name(name) in full:
        return full[local_name(name)]
    # With tied embeddings the last pipeline stage keeps its own copy of the embedding as the
    # output layer; a TP=1, PP=1 state dict has only the embedding.
    if name == _OUTPUT and _EMBEDDING in full:
        return full[_EMBEDDING]
    raise KeyError(f"{name} is missing from the full state dict")
