"""HuggingFace checkpoint directories <-> Megatron model chunks, one tensor at a time.

Loading streams the HF safetensors through the shared mapping straight into this rank's parameters
(any TP/PP/VPP): each rank reads only the tensors its pipeline stage holds, keeps one full tensor at a
time (the parts of one fused tensor at most), and copies its TP slice in place. Peak memory is the
rank's parameters plus the largest fused tensor.

Writing goes the other way from a TP=1, PP=1 model: each Megatron parameter is mapped to HF tensors
and streamed into safetensors shards, then ``config.json`` and the tokenizer files are copied in. A
model that carries LoRA adapters is written merged (``W + scale * B A``, one weight at a time), by the
same export that sends weights to inference servers, so the merge exists once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.hf_mapping import hf_to_megatron, megatron_targets
from atropos_megatron.weights.megatron_shards import copy_shard, iter_global_params, local_name
from atropos_megatron.weights.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
)

# Everything besides the weights that `from_pretrained` of a model and its tokenizer reads.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

Progress = Callable[[int], object]
"""Called with the number of bytes just processed (e.g. a tqdm bar's ``update``)."""


def side_files(directory: str | Path) -> list[Path]:
    """The non-weight files of an HF checkpoint directory that exist (``config.json`` first)."""
    directory = Path(directory)
    return [directory / name for name in HF_SIDE_FILES if (directory / name).is_file()]


def load_hf_weights(
    chunks: Sequence[torch.nn.Module],
    checkpoint: SafetensorsCheckpoint,
    model: ModelConfig,
    *,
    padded_vocab: int,
    tp_rank: int,
    tp_size: int,
    progress: Progress | None = None,
) -> None:
    """Fill this rank's ``chunks`` from an HF checkpoint (in place; any layout).

    Raises:
        ValueError: an HF tensor the architecture does not have, a shape that does not match the
            config, or parameters of this rank that the checkpoint lacks (all of them named).
    """
    params = {local_name(name): param for chunk in chunks for name, param in iter_global_params(chunk)}

    def held_here(hf_name: str) -> bool:
        targets = megatron_targets(hf_name, model)
        return targets is None or any(t in params for t in targets)  # unknown: let the mapping complain

    stream = _counting(checkpoint.iter_tensors(held_here), checkpoint, progress)
    filled: set[str] = set()
    for name, full in hf_to_megatron(stream, model, padded_vocab=padded_vocab):
        targets = [name]
        if name == "embedding.word_embeddings.weight" and model.tie_word_embeddings:
            targets.append("output_layer.weight")
        for target in (t for t in targets if t in params):
            copy_shard(params[target], full, name=target, tp_rank=tp_rank, tp_size=tp_size)
            filled.add(target)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"{checkpoint.directory} lacks weights for: {', '.join(missing)}")


def _counting(
    stream: Iterable[tuple[str, torch.Tensor]], checkpoint: SafetensorsCheckpoint, progress: Progress | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in stream:
        if progress is not None:
            progress(checkpoint.entries[name].nbytes)
        yield name, tensor


def save_hf_checkpoint(
    chunk: torch.nn.Module,
    model: ModelConfig,
    out_dir: str | Path,
    *,
    hf_config: dict[str, Any],
    copy_from: Sequence[Path] = (),
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
) -> list[Path]:
    """Write a TP=1, PP=1 Megatron model as an HF checkpoint that ``from_pretrained`` loads.

    LoRA adapters on ``chunk`` are merged into their layers' weights (``export.export_hf_tensors``);
    the adapter factors themselves are not written. Needs Megatron's process groups (the converter's
    one-rank group).

    Args:
        hf_config: the ``config.json`` content (its dtype fields are set to ``dtype``).
        copy_from: tokenizer and generation files to copy beside the weights (``config.json``
            among them is skipped: ``hf_config`` is written instead).
        dtype: the weights' dtype on disk; a tensor in another dtype is cast one at a time.

    Returns:
        The safetensors files written.
    """
    from atropos_megatron.weights.export import export_hf_tensors

    out_dir = Path(out_dir)
    with ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in export_hf_tensors([chunk], model, dtype=dtype):
            writer.add(name, tensor)
            if progress is not None:
                progress(tensor.numel() * dtype.itemsize)
    config = {**hf_config, "torch_dtype": HF_DTYPE_NAMES[dtype]}
    if "dtype" in hf_config:
        config["dtype"] = HF_DTYPE_NAMES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for file in copy_from:
        if file.name != "config.json":
            shutil.copy2(file, out_dir / file.name)
    return sorted(out_dir.glob("*.safetensors"))
