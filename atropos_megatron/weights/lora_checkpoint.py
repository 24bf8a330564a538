"""LoRA adapter-only checkpoints, read and written without the base model.

A LoRA run's checkpoint (``trainer/checkpoint.py``) is a torch_dist checkpoint whose model part holds
only the adapter factors: one ShardedTensor per factor and site, with Megatron's layer axis in front
(``decoder.layers.self_attention.linear_qkv.lora.q_proj.lora_A.weight``, global shape
``[num_layers, r, in]``), and a sidecar with the LoRA config and the base (path + fingerprint). This
module reads those factors as whole PEFT-named tensors and writes the same model keys from PEFT
tensors, without building a model or reading a base weight: moving a 70B base's adapters costs
their megabytes, not the base's 140 GB.

Deliberately not here: optimizer state and progress (a checkpoint written here has neither, so it
starts adapters rather than resuming a run), and merging adapters into a base (that needs the model:
``trainer/lora.LinearAdapters.merged_weight``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from atropos_megatron.config import LoraConfig, ModelConfig
from atropos_megatron.weights.dist_checkpoint import (
    HF_CONFIG_DIR,
    SIDECAR,
    NotADistCheckpointError,
    write_sidecar,
)
from atropos_megatron.weights.lora_layout import (
    FACTORS,
    factor_shape,
    is_adapter_name,
    megatron_adapter_name,
    megatron_to_peft_name,
    peft_to_megatron_name,
    sites_for,
)
from atropos_megatron.weights.peft_adapter import PeftAdapterError

_LAYER_PREFIX = "decoder.layers."
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class NotAnAdapterCheckpointError(ValueError):
    """The checkpoint holds a full model (or no LoRA record), not adapters."""


@dataclass(frozen=True)
class AdapterCheckpointInfo:
    """What an adapter-only checkpoint's sidecar says, read without loading any tensor."""

    path: Path
    lora: LoraConfig
    base: dict[str, str]
    """``{"path": ..., "fingerprint": ...}``: the base the adapters were trained on."""
    model: ModelConfig
    """The architecture the adapters fit (``model.lora`` is :attr:`lora`)."""
    padded_vocab: int
    hf_config_dir: Path | None
    """The base's HF config and tokenizer kept in the checkpoint, if any."""


@dataclass(frozen=True)
class AdapterCheckpoint:
    """An adapter-only checkpoint's record and its factors, whole, by PEFT name."""

    info: AdapterCheckpointInfo
    tensors: dict[str, torch.Tensor]
    """PEFT state-dict name -> tensor (``A`` ``[r, in]``, ``B`` ``[out, r]``), in the stored dtype."""


def read_adapter_info(path: str | Path) -> AdapterCheckpointInfo:
    """Describe an adapter-only checkpoint from its sidecar; needs no process group.

    Raises:
        NotADistCheckpointError: no complete torch_dist checkpoint at ``path``.
        NotAnAdapterCheckpointError: the checkpoint records no LoRA adapters (a full model).
    """
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise NotADistCheckpointError(
            f"{path} is not a Megatron distributed checkpoint (no metadata.json; a save that did not "
            "finish leaves none)"
        )
    sidecar = path / SIDECAR
    facts = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if "lora" not in facts or "base" not in facts:
        raise NotAnAdapterCheckpointError(
            f"{path} holds a full model, not LoRA adapters (its {SIDECAR} records no lora and base)"
        )
    lora = LoraConfig(**facts["lora"])
    hf_dir = path / HF_CONFIG_DIR
    return AdapterCheckpointInfo(
        path=path,
        lora=lora,
        base=dict(facts["base"]),
        model=replace(ModelConfig(**facts["model"]), lora=lora),
        padded_vocab=int(facts["padded_vocab_size"]),
        hf_config_dir=hf_dir if (hf_dir / "config.json").is_file() else None,
    )


def read_adapter_checkpoint(path: str | Path) -> AdapterCheckpoint:
    """Read an adapter-only checkpoint's factors as whole PEFT-named tensors (the base is not touched).

    Needs a ``torch.distributed`` process group (the torch_dist reader plans collectively): the
    converter runs it in its one-rank group (``convert.single_process_group``); in a job, every rank
    calls it and each reads the whole factors (megabytes). Optimizer state is not read.

    Raises:
        NotADistCheckpointError, NotAnAdapterCheckpointError: see :func:`read_adapter_info`.
        ValueError: the stored factors are not the adapters the sidecar's ``lora`` describes.
    """
    from megatron.core import dist_checkpointing

    info = read_adapter_info(path)
    metadata = dist_checkpointing.load_tensors_metadata(str(info.path))
    wanted = {key: meta for key, meta in metadata.items() if is_layer_adapter_key(key)}
    # Whole tensors on every rank: the shards of several ranks overlap by design.
    loaded = dist_checkpointing.load(wanted, str(info.path), validate_access_integrity=False)
    tensors = split_layers({key: loaded[key] for key in wanted})
    check_adapter_tensors(tensors, info.model, source=str(info.path))
    return AdapterCheckpoint(info, tensors)


def save_adapter_checkpoint(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    model: ModelConfig,
    padded_vocab: int,
    base: Mapping[str, str],
    hf_files: Sequence[Path] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """Write PEFT-named adapter ``tensors`` as an adapter-only checkpoint with a LoRA run's model keys.

    Needs a one-rank process group (``convert.single_process_group``): the whole factors are written
    by that rank as they are, and the format reshards them when a run of any layout loads them.
    ``model.lora`` describes the adapters; ``base`` is ``{"path", "fingerprint"}`` of the weights
    they adapt.

    Raises:
        PeftAdapterError: ``tensors`` are not exactly ``model.lora``'s adapters for ``model``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    check_adapter_tensors(tensors, model, source="the adapter")
    stacked = stack_layers(tensors)
    sharded = {
        key: ShardedTensor.from_rank_offsets(key, tensor, replica_id=0) for key, tensor in stacked.items()
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model0": sharded}, str(path))
    sidecar_extra = {**(extra or {}), "lora": asdict(model.lora), "base": dict(base)}
    write_sidecar(path, model=model, padded_vocab=padded_vocab, hf_files=hf_files, extra=sidecar_extra)


def is_layer_adapter_key(key: str) -> bool:
    """Whether a checkpoint's ShardedTensor key is a LoRA factor with the layer axis in front."""
    return key.startswith(_LAYER_PREFIX) and is_adapter_name(_LAYER_PREFIX + "0." + key[len(_LAYER_PREFIX) :])


def split_layers(stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``decoder.layers.<site>...`` ``[layers, ...]`` -> one PEFT-named tensor per layer (copies)."""
    tensors = {}
    for key, tensor in stacked.items():
        rest = key[len(_LAYER_PREFIX) :]
        for layer in range(tensor.shape[0]):
            # clone: safetensors refuses tensors that share storage
            tensors[megatron_to_peft_name(f"{_LAYER_PREFIX}{layer}.{rest}")] = tensor[layer].clone()
    return tensors


def stack_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT-named per-layer tensors -> ``decoder.layers.<site>...`` ``[layers, ...]`` (layers 0..L-1)."""
    by_key: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LAYER_NAME.match(peft_to_megatron_name(name))
        by_key.setdefault(_LAYER_PREFIX + match.group(2), {})[int(match.group(1))] = tensor
    return {key: torch.stack([layers[i] for i in sorted(layers)]) for key, layers in by_key.items()}


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], model: ModelConfig, *, source: str) -> None:
    """Refuse tensors that are not exactly ``model.lora``'s adapters on ``model``, naming the tensor.

    Raises:
        PeftAdapterError: a name that is no supported LoRA factor, a layer the model does not have,
            a projection outside ``lora.target_modules``, a shape that does not fit, or a missing factor.
    """
    lora = model.lora
    expected = {
        megatron_adapter_name(layer, site, key, factor): factor_shape(
            site, key, factor, rank=lora.rank, model=model, tp=1
        )
        for layer in range(model.num_layers)
        for site, keys in sites_for(lora.target_modules)
        for key in keys
        for factor in FACTORS
    }
    for name, tensor in tensors.items():
        try:
            megatron_name = peft_to_megatron_name(name)
        except ValueError as exc:
            raise PeftAdapterError(f"{source}: {exc}") from None
        if megatron_name not in expected:
            raise PeftAdapterError(
                f"{source}: {name} does not fit the base: {_why_unexpected(megatron_name, model)}"
            )
        shape = expected[megatron_name]
        if tuple(tensor.shape) != shape:
            raise PeftAdapterError(
                f"{source}: {name} has shape {list(tensor.shape)}; with r={lora.rank} the base "
                f"(hidden_size={model.hidden_size}, ffn_hidden_size={model.ffn_hidden_size}) "
                f"needs {list(shape)}"
            )
    present = {peft_to_megatron_name(name) for name in tensors}
    missing = [megatron_to_peft_name(name) for name in expected if name not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise PeftAdapterError(f"{source} lacks {', '.join(missing[:3])}{more}")


def _why_unexpected(megatron_name: str, model: ModelConfig) -> str:
    match = _LAYER_NAME.match(megatron_name)
    layer, key = int(match.group(1)), match.group(2).split(".")[-3]
    if layer >= model.num_layers:
        return f"layer {layer}, but the base has num_hidden_layers={model.num_layers}"
    return f"{key} is not in target_modules {list(model.lora.target_modules)}"
