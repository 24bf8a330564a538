"""Training checkpoints: model, optimizer, schedule, RNG and progress, written atomically, resharded on load.

Layout under ``checkpoint.dir``::

    step_00000040/        a Megatron torch_dist checkpoint + our sidecar (atropos_megatron.json)
    step_00000060/
    latest                the name of the newest complete checkpoint (replaced atomically)

A save writes into ``.tmp_step_N``, and only a complete directory is synced, renamed to ``step_N``
and then named in ``latest``: a job killed mid-save leaves the previous checkpoint in charge, and
once :func:`save` returns the checkpoint survives a crash of the machine too (the bridge deletes the
batches it holds on that promise). The model part
uses the keys of ``weights/dist_checkpoint.save_model``, so a training checkpoint is also a model
checkpoint (``convert mcore-to-hf`` and ``model.dist_checkpoint`` read it). Model and optimizer state
load at any TP/PP/DP (the optimizer's ``fully_reshardable`` format); the per-rank RNG streams only
when the layout is unchanged.

A LoRA run's checkpoint holds only the adapters, their optimizer state and the progress (megabytes
for a 70B model). Its sidecar names the base (``model.hf_path`` or ``model.dist_checkpoint``) and its
fingerprint (``weights/fingerprint.py``); resuming checks both, so adapters never continue on a base
they were not trained on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from atropos_megatron.config import ModelConfig
from atropos_megatron.durable import fsync_directory, fsync_tree, write_atomically
from atropos_megatron.trainer import parallel
from atropos_megatron.weights import dist_checkpoint
from atropos_megatron.weights.export import unwrap_chunk
from atropos_megatron.weights.lora_layout import is_adapter_name

logger = logging.getLogger(__name__)

LATEST = "latest"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""The distributed optimizer's reshardable format (the 0.16.1 default cannot be saved)."""


@dataclass(frozen=True)
class Progress:
    """Where the run stands; restored on resume."""

    step: int
    """Optimizer steps taken."""
    weight_version: str
    """The version last pushed to the inference servers."""
    consumed_sequences: int = 0
    layout: tuple[int, int, int] = (1, 1, 1)
    """(TP, PP, DP) of the run that wrote the checkpoint."""
    batch_history: tuple[str, ...] = ()
    """The bridge's ids of the batches whose updates these weights hold, in training order. A batch
    served again whose id is here (its acknowledgement was lost) is acknowledged, not trained twice;
    it is also the record that shows no batch was lost or trained twice."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def resolve(root: str | Path, load: str) -> Path | None:
    """The checkpoint directory that ``checkpoint.load`` names: ``latest`` (None if there is none yet)
    or an explicit directory."""
    if load != LATEST:
        return Path(load)
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()


@dataclass(frozen=True)
class LoraBase:
    """The frozen base a LoRA run trains on: what its checkpoints record and resuming checks."""

    path: str
    """``model.hf_path`` or ``model.dist_checkpoint``."""
    fingerprint: str

    @classmethod
    def of(cls, model: ModelConfig) -> LoraBase:
        from atropos_megatron.weights.fingerprint import fingerprint_directory

        path = lora_base_path(model)
        return cls(path=path, fingerprint=fingerprint_directory(path))


def lora_base_path(model: ModelConfig) -> str:
    """Where a LoRA run's frozen base comes from.

    Raises:
        ValueError: neither ``model.hf_path`` nor ``model.dist_checkpoint`` is set.
    """
    path = model.hf_path or model.dist_checkpoint
    if path is None:
        raise ValueError(
            "model.lora needs a base to adapt: set model.hf_path or model.dist_checkpoint (a randomly "
            "initialised base could not be rebuilt on resume, nor served)"
        )
    return str(path)


def save(
    root: str | Path,
    progress: Progress,
    *,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    model: ModelConfig,
    padded_vocab: int,
    keep_last: int,
    hf_files: Sequence[Path] = (),
    lora_base: LoraBase | None = None,
) -> Path:
    """Write a checkpoint of this step (collective). Returns its final directory.

    ``lora_base``: set for a LoRA run (``model.lora.enabled``): only the adapters are saved.
    """
    if model.lora.enabled != (lora_base is not None):
        raise ValueError("a LoRA run's checkpoint needs its lora_base, and only a LoRA run's has one")
    from megatron.core import dist_checkpointing

    from atropos_megatron.trainer.megatron_patches import shield_checkpoint_writer

    shield_checkpoint_writer()  # the save on SIGTERM must survive Slurm signalling every process

    root = Path(root)
    final, tmp = step_dir(root, progress.step), root / f".tmp_step_{progress.step:08d}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    adapters_only = lora_base is not None
    state = _sharded_state(chunks, optimizer, is_loading=False, with_rng=True, adapters_only=adapters_only)
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = asdict(progress)
    dist_checkpointing.save(state, str(tmp), content_metadata=OPTIMIZER_METADATA)
    if dist.get_rank() == 0:
        extra: dict[str, Any] = {
            "progress": asdict(progress),
            "expert_optimizer": _has_expert_optimizer(optimizer),
        }
        if lora_base is not None:
            extra.update(lora=asdict(model.lora), base=asdict(lora_base))
        dist_checkpoint.write_sidecar(
            tmp, model=model, padded_vocab=padded_vocab, hf_files=hf_files, extra=extra
        )
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a retried save of the same step
        os.replace(tmp, final)
        fsync_directory(root)
        write_atomically(root / LATEST, f"{final.name}\n".encode())
        _prune(root, keep_last)
    dist.barrier()
    return final


def load(
    path: str | Path,
    *,
    chunks: Sequence[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    model: ModelConfig,
    lora_base: LoraBase | None = None,
) -> Progress:
    """Restore a checkpoint written by :func:`save` into this run's (possibly different) layout.

    Raises:
        ValueError: LoRA on one side only, different adapters (rank, alpha, rsLoRA, target modules),
            or a base whose fingerprint is not the one the adapters were trained on.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    sidecar = json.loads((path / dist_checkpoint.SIDECAR).read_text())
    check_same_lora(path, sidecar, model, lora_base)
    _check_same_optimizer_split(path, sidecar, optimizer)
    saved = sidecar["progress"]
    layout = parallel.current_layout()
    same_layout = tuple(saved["layout"]) == (layout.tp, layout.pp, layout.dp)
    adapters_only = lora_base is not None
    state = _sharded_state(
        chunks, optimizer, is_loading=True, with_rng=same_layout, adapters_only=adapters_only
    )
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        # A LoRA checkpoint fills the adapters; the base weights stay as loaded from the base.
        missing, unexpected = unwrap_chunk(chunk).load_state_dict(
            loaded[f"model{i}"], strict=not adapters_only
        )
        if unexpected or any(is_adapter_name(name) for name in missing):
            raise ValueError(f"{path}: adapters do not match the model's ({missing=}, {unexpected=})")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif layout.rank == 0:
        logger.warning(
            "checkpoint %s was written at TP=%d PP=%d DP=%d; weights and optimizer state are resharded, "
            "the per-rank RNG streams start afresh",
            path,
            *saved["layout"],
        )
    return progress_from_dict(loaded["progress"])


def check_same_lora(
    path: Path, sidecar: dict[str, Any], model: ModelConfig, lora_base: LoraBase | None
) -> None:
    """Refuse to resume adapters on another base or with other adapter shapes, naming what differs."""
    saved = sidecar.get("lora")
    if saved is None and lora_base is None:
        return
    if saved is None:
        raise ValueError(
            f"{path} holds a full model, not LoRA adapters: to train adapters on it, start a new run with "
            f"model.dist_checkpoint={path} (and checkpoint.load unset)"
        )
    if lora_base is None:
        raise ValueError(
            f"{path} holds LoRA adapters (rank {saved['rank']}); resume with the same model.lora "
            f"(model.lora.rank={saved['rank']}) or merge them first (`convert mcore-to-hf --merge`)"
        )
    ours = asdict(model.lora)
    for name in ("rank", "alpha", "use_rslora", "target_modules"):
        same = set(ours[name]) == set(saved[name]) if name == "target_modules" else ours[name] == saved[name]
        if not same:
            raise ValueError(
                f"{path} was trained with model.lora.{name}={saved[name]!r}, this run has {ours[name]!r}"
            )
    base = sidecar["base"]
    if base["fingerprint"] != lora_base.fingerprint:
        raise ValueError(
            f"{path}'s adapters were trained on the base {base['path']} ({base['fingerprint'][:19]}...), but "
            f"{lora_base.path} has other weights ({lora_base.fingerprint[:19]}...): point model.hf_path or "
            "model.dist_checkpoint at the base they were trained on"
        )
    if base["path"] != lora_base.path and parallel.current_layout().rank == 0:
        logger.info("base moved from %s to %s (same fingerprint)", base["path"], lora_base.path)


def _has_expert_optimizer(optimizer: Any) -> bool:
    """Whether MoE experts have their own optimizer (Megatron chains one for expert-parallel
    parameters when expert_parallel_size > 1; at EP=1 they share the dense one)."""
    return len(getattr(optimizer, "chained_optimizers", ())) > 1


def _check_same_optimizer_split(path: Path, sidecar: dict[str, Any], optimizer: Any) -> None:
    """Refuse a resume whose optimizer state is laid out as one optimizer where ours is two (or the
    reverse): Megatron cannot map one onto the other. The weights alone load at any EP."""
    saved, ours = bool(sidecar.get("expert_optimizer", False)), _has_expert_optimizer(optimizer)
    if saved == ours:
        return
    written = "expert_parallel_size > 1" if saved else "expert_parallel_size=1"
    here = "> 1" if ours else "= 1"
    raise ValueError(
        f"{path} was written at {written}, where MoE experts {'have their own' if saved else 'share the'} "
        f"optimizer; this run has expert_parallel_size {here}. Resume at an expert_parallel_size "
        f"{'> 1' if saved else 'of 1'}, or start a new run from its weights (model.dist_checkpoint={path}, "
        "fresh optimizer state)"
    )


def progress_from_dict(saved: dict[str, Any]) -> Progress:
    """A checkpoint's progress record (also one written before ``batch_history`` existed)."""
    fields = dict(saved)
    last_batch_id = fields.pop("last_batch_id", "")
    history = fields.pop("batch_history", None) or ([last_batch_id] if last_batch_id else [])
    fields["layout"] = tuple(fields["layout"])
    return Progress(**fields, batch_history=tuple(history))


def _sharded_state(
    chunks, optimizer, *, is_loading: bool, with_rng: bool, adapters_only: bool
) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_state = dist_checkpoint.model_sharded_state_dict(
        [unwrap_chunk(chunk) for chunk in chunks], adapters_only=adapters_only
    )
    state: dict[str, Any] = dict(model_state)
    state["optimizer"] = optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
    )
    if with_rng:
        layout = parallel.current_layout()
        state["rng_state"] = ShardedObject(
            "rng_state",
            _rng_state(),
            (layout.pp, layout.tp, layout.dp),
            (layout.pp_rank, layout.tp_rank, layout.dp_rank),
            replica_id=0,
        )
    return state


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _prune(root: Path, keep_last: int) -> None:
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
