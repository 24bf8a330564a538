"""LoRA in ``atropos-megatron convert``: PEFT adapters in and out, and merging adapters into their base.

- ``hf-to-mcore --adapter PEFT_DIR``: :func:`peft_to_mcore`, a PEFT adapter as an adapter-only
  checkpoint (a LoRA run's model keys and base record), checked against the base's config.json;
- ``mcore-to-hf --adapter-only``: :func:`mcore_to_peft`, a LoRA checkpoint's adapters as a PEFT
  directory, reading nothing but the adapters;
- ``mcore-to-hf --merge``: :func:`merged_source`, the recorded base (fingerprint-checked) with the
  adapters installed, which ``convert.mcore_to_hf`` writes merged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.convert import (
    TORCH_DTYPES,
    ConversionError,
    ConversionReport,
    ModelSource,
    bytes_bar,
    cleanup_on_failure,
    config_dtype,
    described_model,
    model_for_layout,
    prepare_output,
    single_process_group,
    stage,
)
from atropos_megatron.weights.hf_architectures import read_hf_config


def peft_to_mcore(
    hf_dir: Path,
    adapter_dir: Path,
    out: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> ConversionReport:
    """Convert a PEFT LoRA adapter for the base ``hf_dir`` into an adapter-only checkpoint at ``out``.

    The checkpoint has a LoRA run's model keys and sidecar (``lora``, ``base`` = ``hf_dir`` and its
    fingerprint, the base's HF config), without optimizer state. The base's config.json gives the
    shapes every adapter tensor must have; its weights are fingerprinted (sampled blocks), never
    loaded, and no model is built. Adapters keep their dtype unless ``dtype`` is given.

    Runs in a one-rank process group (:func:`single_process_group`; reuses the caller's if any).
    """
    from atropos_megatron.trainer.model import padded_vocab_size
    from atropos_megatron.weights.fingerprint import fingerprint_directory
    from atropos_megatron.weights.hf_checkpoint import side_files
    from atropos_megatron.weights.lora_checkpoint import check_adapter_tensors, save_adapter_checkpoint
    from atropos_megatron.weights.peft_adapter import read_peft_adapter

    started = time.perf_counter()
    hf_config = read_hf_config(hf_dir)
    adapter = read_peft_adapter(adapter_dir)
    model = model_for_layout(
        hf_config, tp=tp, pp=pp, vpp=vpp, dtype=dtype or config_dtype(hf_config),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, hf_path=str(hf_dir.absolute()),
        lora=adapter.lora,
    )  # fmt: skip
    tensors = _cast(adapter.tensors, dtype)
    check_adapter_tensors(tensors, model, source=str(adapter_dir))
    base = {"path": str(hf_dir.absolute()), "fingerprint": fingerprint_directory(hf_dir)}
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    partial = prepare_output(out)
    with single_process_group(), cleanup_on_failure(partial), stage("write torch_dist adapter checkpoint"):
        save_adapter_checkpoint(
            partial, tensors, model=model, padded_vocab=padded, base=base, hf_files=side_files(hf_dir),
            extra={"converted_from": str(adapter_dir), "checked_layout": {"tp": tp, "pp": pp, "vpp": vpp}},
        )  # fmt: skip
        os.replace(partial, out)
    return _adapter_report(out, tensors, started)


def _cast(tensors: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {name: t.to(TORCH_DTYPES[dtype]) for name, t in tensors.items()}


def _adapter_report(out: Path, tensors: dict[str, torch.Tensor], started: float) -> ConversionReport:
    parameters = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return ConversionReport(out, parameters, nbytes, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# Megatron -> HF
# ------------------------------------------------------------------------------------------------


def mcore_to_peft(mcore_dir: Path, out: Path, *, dtype: str | None = None) -> ConversionReport:
    """Write an adapter-only LoRA checkpoint's adapters as an HF PEFT adapter directory at ``out``.

    Only the adapter tensors are read (no base, no model), so time and memory grow with the
    adapters, not with the base. ``base_model_name_or_path`` is the recorded base. Adapters keep their
    stored dtype unless ``dtype`` is given.

    Runs in a one-rank process group (:func:`single_process_group`; reuses the caller's if any).
    """
    from atropos_megatron.weights.lora_checkpoint import read_adapter_checkpoint
    from atropos_megatron.weights.peft_adapter import write_peft_adapter

    started = time.perf_counter()
    info = _adapter_info(mcore_dir, flag="--adapter-only")
    partial = prepare_output(out)
    with single_process_group(), cleanup_on_failure(partial):
        with stage(f"read adapters {mcore_dir}"):
            tensors = _cast(read_adapter_checkpoint(mcore_dir).tensors, dtype)
        write_peft_adapter(partial, info.lora, tensors, base_model=info.base["path"])
        os.replace(partial, out)
    return _adapter_report(out, tensors, started)


def merged_source(mcore_dir: Path, *, base_dir: Path | None, hf_config_dir: Path | None) -> ModelSource:
    """An adapter-only checkpoint's base (checked by fingerprint) with its adapters installed."""
    info = _adapter_info(mcore_dir, flag="--merge")
    base = _checked_base(info, base_dir)
    hf_config_dir = hf_config_dir or info.hf_config_dir or _hf_config_of(base)
    if hf_config_dir is None:
        raise ConversionError(
            f"neither {mcore_dir} nor its base {base} carries an HF config; pass --hf-config DIR"
        )
    hf_config = read_hf_config(hf_config_dir)
    stored = info.model.dtype
    model = described_model(hf_config, hf_config_dir, mcore_dir, stored=stored, recorded=info.model)

    def fill(chunk: torch.nn.Module) -> None:
        from atropos_megatron.trainer.lora import apply_lora
        from atropos_megatron.weights.lora_checkpoint import read_adapter_checkpoint
        from atropos_megatron.weights.lora_state import load_adapter_state

        _load_base(chunk, base, model, info.padded_vocab)
        apply_lora([chunk], info.lora, model)
        with stage(f"read adapters {mcore_dir}"):
            load_adapter_state([chunk], read_adapter_checkpoint(mcore_dir).tensors)

    return ModelSource(model, info.padded_vocab, stored, hf_config_dir, hf_config, fill)


def _adapter_info(mcore_dir: Path, *, flag: str):
    """The adapter-only checkpoint's record; a full model is refused, naming ``flag``."""
    from atropos_megatron.weights.lora_checkpoint import NotAnAdapterCheckpointError, read_adapter_info

    try:
        return read_adapter_info(mcore_dir)
    except NotAnAdapterCheckpointError as exc:
        raise ConversionError(
            f"{exc}; {flag} needs a LoRA run's checkpoint (drop {flag} to convert it)"
        ) from None


def adapter_info_or_none(mcore_dir: Path):
    from atropos_megatron.weights.dist_checkpoint import NotADistCheckpointError
    from atropos_megatron.weights.lora_checkpoint import NotAnAdapterCheckpointError, read_adapter_info

    try:
        return read_adapter_info(mcore_dir)
    except (NotAnAdapterCheckpointError, NotADistCheckpointError):
        return None


def _checked_base(info, base_dir: Path | None) -> Path:
    """The base to merge into: ``base_dir`` or the recorded path, with the recorded fingerprint."""
    from atropos_megatron.weights.fingerprint import fingerprint_directory

    recorded = info.base
    base = Path(base_dir or recorded["path"])
    if not base.is_dir():
        hint = "" if base_dir else "; pass --base DIR where the same weights are now"
        raise ConversionError(f"the base {base} of the adapters in {info.path} does not exist{hint}")
    found = fingerprint_directory(base)
    if found != recorded["fingerprint"]:
        raise ConversionError(
            f"{base} has other weights than the base the adapters in {info.path} were trained on: its "
            f"fingerprint is {found}, the recorded base {recorded['path']} had {recorded['fingerprint']}; "
            "pass --base DIR with the original weights"
        )
    return base


def _hf_config_of(base: Path) -> Path | None:
    """Where a base directory keeps its HF config: itself (HF) or ``hf_config/`` (torch_dist)."""
    from atropos_megatron.weights.dist_checkpoint import HF_CONFIG_DIR

    for directory in (base, base / HF_CONFIG_DIR):
        if (directory / "config.json").is_file():
            return directory
    return None


def _load_base(chunk: torch.nn.Module, base: Path, model: ModelConfig, padded_vocab: int) -> None:
    """Fill a TP=1 chunk from a base directory: a torch_dist checkpoint or HF safetensors."""
    from atropos_megatron.weights.dist_checkpoint import load_model
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint

    if (base / "metadata.json").is_file():
        with stage(f"read torch_dist base {base}"):
            load_model([chunk], base)
        return
    source = SafetensorsCheckpoint(base)
    with bytes_bar(source.total_bytes, f"read HF base {base}") as advance:
        load_hf_weights(
            [chunk], source, model, padded_vocab=padded_vocab, tp_rank=0, tp_size=1, progress=advance
        )


# ------------------------------------------------------------------------------------------------
# Process group, output directories, progress
# ------------------------------------------------------------------------------------------------
