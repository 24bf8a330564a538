"""Model weights as Megatron distributed checkpoints (``torch_dist``), loadable at any TP/PP.

Every rank saves its own shards; the format records each shard's place in the global tensor, so a
checkpoint written at one layout loads at another (resharding is the format's job). Two things the
format does not carry are added beside it:

- ``atropos_megatron.json``: our ``ModelConfig`` and the padded vocabulary, so a checkpoint says what
  model it holds (JSON, readable without unpickling anything).
- ``hf_config/``: the HF ``config.json`` and tokenizer files the weights came from, so that converting
  back to HF needs nothing but the checkpoint.

Checkpoints written by Megatron-LM (no sidecar) load too when given the model's config; Transformer
Engine's norm names are matched to the local spec's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.lora_layout import is_adapter_name
from atropos_megatron.weights.megatron_shards import TE_NORM_NAMES

SIDECAR = "atropos_megatron.json"
HF_CONFIG_DIR = "hf_config"
FORMAT_VERSION = 1
_EMBEDDING_KEY = "embedding.word_embeddings.weight"


class NotADistCheckpointError(FileNotFoundError):
    """The directory is not a complete Megatron ``torch_dist`` checkpoint."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory says about itself, read without loading any tensor."""

    path: Path
    model: ModelConfig | None
    """From our sidecar; None for checkpoints written by other tools."""
    padded_vocab: int
    """Rows of the stored embedding (the model must be built with exactly this many)."""
    dtype: torch.dtype
    """Data type of the stored embedding (the checkpoint's weight dtype)."""
    hf_config_dir: Path | None
    """The HF config and tokenizer saved with the checkpoint, if any."""
    keys: frozenset[str]


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Describe a checkpoint directory; needs no process group.

    Raises:
        NotADistCheckpointError: the directory is missing, incomplete (no ``metadata.json``: a save
            that did not finish) or in another format.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        raise NotADistCheckpointError(
            f"{path} is not a Megatron distributed checkpoint (no metadata.json; a save that did not "
            "finish leaves none)"
        )
    backend = json.loads(meta_file.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise NotADistCheckpointError(f"{path} uses sharded_backend={backend!r}; only torch_dist is read")
    tensors = dist_checkpointing.load_tensors_metadata(str(path))
    model = None
    sidecar = path / SIDECAR
    facts = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if _EMBEDDING_KEY not in tensors:
        if "lora" in facts:
            base = facts.get("base", {})
            raise NotADistCheckpointError(
                f"{path} holds LoRA adapters only (trained on the base {base.get('path')}): resume it with "
                "checkpoint.load, start new adapters from it with model.lora.adapter, or convert it "
                "(`convert mcore-to-hf --merge` for a full model, `--adapter-only` for a PEFT adapter)"
            )
        raise NotADistCheckpointError(f"{path} holds no {_EMBEDDING_KEY} (not a GPT model checkpoint?)")
    embedding = tensors[_EMBEDDING_KEY]
    if "model" in facts:
        model = ModelConfig(**facts["model"])
    hf_dir = path / HF_CONFIG_DIR
    return CheckpointInfo(
        path=path,
        model=model,
        padded_vocab=embedding.global_shape[0],
        dtype=embedding.dtype,
        hf_config_dir=hf_dir if (hf_dir / "config.json").is_file() else None,
        keys=frozenset(tensors),
    )


def save_model(
    chunks: Sequence[torch.nn.Module],
    path: str | Path,
    *,
    model: ModelConfig,
    padded_vocab: int,
    hf_files: Sequence[Path] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank of the job calls it with its own chunks.

    Args:
        path: a directory that does not exist yet or is empty.
        hf_files: HF ``config.json`` and tokenizer files to keep in ``hf_config/``.
        extra: more JSON-serialisable facts for the sidecar (e.g. where the weights came from).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = Path(path)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))
    if rank == 0:
        write_sidecar(path, model=model, padded_vocab=padded_vocab, hf_files=hf_files, extra=extra)
    dist.barrier()


def write_sidecar(
    path: Path,
    *,
    model: ModelConfig,
    padded_vocab: int,
    hf_files: Sequence[Path] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """What the torch_dist format does not carry: our model config (JSON) and the HF config/tokenizer."""
    if hf_files:
        (path / HF_CONFIG_DIR).mkdir(exist_ok=True)
        for file in hf_files:
            shutil.copy2(file, path / HF_CONFIG_DIR / Path(file).name)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "model": asdict(model),
        "padded_vocab_size": padded_vocab,
        **(extra or {}),
    }
    (path / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def load_model(
    chunks: Sequence[torch.nn.Module], path: str | Path, *, info: CheckpointInfo | None = None
) -> None:
    """Collective: fill ``chunks`` (any TP/PP/VPP layout) with the checkpoint's weights.

    ``info``: the checkpoint's :func:`read_checkpoint_info`, when the caller has read it already.

    Raises:
        NotADistCheckpointError: see :func:`read_checkpoint_info`.
        ValueError: the model's embedding does not have the checkpoint's padded vocabulary.
    """
    from megatron.core import dist_checkpointing

    info = info or read_checkpoint_info(path)
    sharded = model_sharded_state_dict(chunks)
    _match_keys(sharded, info.keys)
    for chunk_sd in sharded.values():
        embedding = chunk_sd.get(_EMBEDDING_KEY)
        if embedding is not None and embedding.global_shape[0] != info.padded_vocab:
            raise ValueError(
                f"the model's embedding has {embedding.global_shape[0]} rows, the checkpoint's "
                f"{info.padded_vocab}; build the model with padded_vocab={info.padded_vocab}"
            )
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])


def model_sharded_state_dict(
    chunks: Sequence[torch.nn.Module], *, adapters_only: bool = False
) -> dict[str, dict]:
    """The chunks' Megatron sharded state dicts under ``model0``, ``model1``, ... (the keys of every
    checkpoint we write, model-only or training).

    ``adapters_only``: just the LoRA factors (a LoRA run's checkpoint; the base is read elsewhere).
    """
    # One sub-dict per virtual stage, as Megatron-LM nests them; ShardedTensor keys are global
    # either way (layer offsets come from each chunk's own layer numbers).
    sharded = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    whole_fc1_where_unsplit(sharded)
    split_adapter_factors(sharded)
    if adapters_only:
        sharded = {key: {n: v for n, v in sd.items() if is_adapter_name(n)} for key, sd in sharded.items()}
    return sharded


def split_adapter_factors(sharded: dict[str, dict]) -> None:
    """Describe each TP-split LoRA factor as the slice of the whole factor that this rank holds.

    Megatron's linear layers describe every parameter below them (our ``lora`` children too) as
    their own weight would be if unsplit: replicated over TP. For a factor that TP splits
    (column-parallel ``B`` rows, row-parallel ``A`` columns; ``weights/lora_layout.py``) that would
    save one rank's slice as the whole tensor. Replicated factors keep Megatron's description.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.parallel_state import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    tp, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    for chunk_sd in sharded.values():
        for name, value in chunk_sd.items():
            param = getattr(value, "data", None)
            if not (isinstance(value, ShardedTensor) and is_adapter_name(name)):
                continue
            if tp == 1 or not getattr(param, "tensor_model_parallel", False):
                continue
            prepend = value.prepend_axis_num
            layer_axes = [(i, value.global_offset[i], value.axis_fragmentations[i]) for i in range(prepend)]
            replica_id = (*value.replica_id[:1], 0, *value.replica_id[2:])  # one copy per TP slice
            chunk_sd[name] = ShardedTensor.from_rank_offsets(
                value.key,
                param,
                *layer_axes,
                (prepend + param.partition_dim, tp_rank, tp),
                replica_id=replica_id,
                prepend_axis_num=prepend,
            )


def whole_fc1_where_unsplit(sharded: dict[str, dict]) -> None:
    """Hand Megatron each SwiGLU ``linear_fc1`` as one tensor where this rank holds all of it (TP=1).

    Megatron stores fc1 as two halves (gate rows, up rows) so that each can be resharded over TP, and
    on CPU that costs a second copy of every fc1 (about 40% of a Llama's weights), all at once: the
    writer clones each half-view before writing, and loading concatenates the halves into new
    tensors. At TP=1 the halves tile the whole parameter, so the same global tensor is read and
    written in place. Checkpoints are unchanged and still load at any TP.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for chunk_sd in sharded.values():
        for name, value in chunk_sd.items():
            if not isinstance(value, ShardedTensorFactory) or value.flattened_range is not None:
                continue
            parts = value.build()
            if not (isinstance(parts, list) and len(parts) == 2):
                continue
            gate, up = parts
            axis = gate.prepend_axis_num  # the split axis: the first axis of the local tensor
            whole = (
                all(isinstance(p, ShardedTensor) and p.key == value.key for p in parts)
                and gate.axis_fragmentations[axis] == 2
                and gate.global_offset[axis] == 0
                and up.global_offset[axis] == gate.local_shape[0]
                and gate.global_shape[axis] == value.data.shape[0]
            )
            if whole:
                layer_axes = [(i, gate.global_offset[i], gate.axis_fragmentations[i]) for i in range(axis)]
                chunk_sd[name] = ShardedTensor.from_rank_offsets(
                    value.key, value.data, *layer_axes, replica_id=value.replica_id, prepend_axis_num=axis
                )


def _match_keys(sharded: dict[str, dict], checkpoint_keys: frozenset[str]) -> None:
    """Rename our norm keys to the checkpoint's when one of us uses Transformer Engine's names
    (``...linear_qkv.layer_norm_weight``) and the other the local spec's (``...input_layernorm.weight``)."""
    aliases = {**TE_NORM_NAMES, **{local: te for te, local in TE_NORM_NAMES.items()}}
    for chunk_sd in sharded.values():
        for value in chunk_sd.values():
            key = getattr(value, "key", None)
            if key is None or key in checkpoint_keys:
                continue
            for ours, theirs in aliases.items():
                if key.endswith(ours) and key.removesuffix(ours) + theirs in checkpoint_keys:
                    value.key = key.removesuffix(ours) + theirs
                    break
