"""Apply HF-named full tensors to the reference server's HF model: validate everything, then copy.

An update either applies completely or not at all: every name, shape and dtype is checked before the
first tensor is copied, so a bad request leaves the served weights untouched (SGLang reloads the old
weights after a failed disk load; validating first gives the same guarantee without a reload).
Three sources: tensors already in memory (``/update_weights_from_tensor``), a safetensors directory
(``/update_weights_from_disk``), and broadcasts from rank 0 of a weight-sync group
(``/update_weights_from_distributed``). Tensors are full (TP=1) HF tensors named as in a checkpoint; no
sharding. A per-expert tensor of an MoE model is copied into its slice of transformers' fused expert
parameter (``checkpoint_targets``), so any subset of experts may arrive in one request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from atropos_megatron.inference.checkpoint_targets import CheckpointTargets
from atropos_megatron.sglang_wire import FLATTENED_BUCKET


class WeightUpdateError(ValueError):
    """An update that was refused before any weight changed."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def validate_specs(model: torch.nn.Module, specs: Iterable[TensorSpec]) -> None:
    """Raise :class:`WeightUpdateError` listing every unknown name, wrong shape or non-castable dtype."""
    _validate(CheckpointTargets(model), specs)


def _validate(targets: CheckpointTargets, specs: Iterable[TensorSpec]) -> None:
    problems: list[str] = []
    for spec in specs:
        target = targets.get(spec.name)
        if target is None:
            reason = targets.why_unknown(spec.name)
            problems.append(f"unknown parameter {spec.name!r}" + (f" ({reason})" if reason else ""))
        elif tuple(spec.shape) != tuple(target.shape):
            problems.append(f"{spec.name}: shape {list(spec.shape)} != model's {list(target.shape)}")
        elif spec.dtype != target.dtype and not (
            spec.dtype.is_floating_point and target.dtype.is_floating_point
        ):
            problems.append(f"{spec.name}: dtype {spec.dtype} cannot be cast to the model's {target.dtype}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightUpdateError(f"update refused, no weight changed: {shown}")


def apply_named_tensors(model: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Validate all of ``named``, then copy each into the model (cast to its dtype). Returns bytes read."""
    targets = CheckpointTargets(model)
    _validate(targets, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in named])
    with torch.no_grad():
        for name, tensor in named:
            targets.get(name).copy_(tensor)
    return sum(t.numel() * t.element_size() for _, t in named)


def load_from_disk(model: torch.nn.Module, model_path: str) -> tuple[int, int]:
    """Copy every tensor of ``model_path/*.safetensors`` into the model; returns (tensors, bytes).

    The directory must cover every checkpoint tensor of the model (a tied ``lm_head`` may be absent).
    Shapes and dtypes are read from the headers and validated before any tensor is loaded.
    """
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not Path(model_path).is_dir() or not files:
        raise WeightUpdateError(f"no *.safetensors files in {model_path!r}")
    specs: list[TensorSpec] = []
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = handle.get_slice(name)
                dtype = _dtype_from_safetensors(piece.get_dtype())
                specs.append(TensorSpec(name, tuple(piece.get_shape()), dtype))
                where[name] = file
    targets = CheckpointTargets(model)
    _validate(targets, specs)
    tied = getattr(model.config, "tie_word_embeddings", False)
    required = {name for param, _ in model.named_parameters() for name in targets.checkpoint_names(param)}
    missing = required - set(where) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise WeightUpdateError(
            f"update refused, no weight changed: {model_path} lacks {sorted(missing)[:5]}"
        )
    total = 0
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118
                    tensor = handle.get_tensor(name)
                    targets.get(name).copy_(tensor)
                    total += tensor.numel() * tensor.element_size()
    return len(specs), total


def _dtype_from_safetensors(code: str) -> torch.dtype:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
    names |= {"I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    if code not in names:
        raise WeightUpdateError(f"unsupported safetensors dtype {code}")
    return getattr(torch, names[code])


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` (SGLang's ``getattr(torch, s)`` spelling; ``"torch.bfloat16"`` also accepted)."""
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return value


def receive_distributed(
    group: dist.ProcessGroup,
    specs: Sequence[TensorSpec],
    *,
    load_format: str | None,
    device: torch.device,
) -> list[tuple[str, torch.Tensor]]:
    """Receive ``specs`` broadcast from group rank 0: one tensor each, or one flat uint8 bucket.

    The bucket layout is SGLang's: tensors back to back in ``specs`` order, offsets the running sums of
    ``numel * itemsize``, no padding. Receives happen even when the specs will be refused afterwards,
    so the sender is never left hanging in its broadcast.
    """
    if load_format == FLATTENED_BUCKET:
        sizes = [_numel(s.shape) * torch.empty((), dtype=s.dtype).element_size() for s in specs]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        out, offset = [], 0
        for spec, size in zip(specs, sizes, strict=True):
            itemsize = torch.empty((), dtype=spec.dtype).element_size()
            if offset % itemsize:
                raise WeightUpdateError(f"{spec.name}: unaligned received tensor at byte {offset}")
            out.append((spec.name, flat[offset : offset + size].view(spec.dtype).view(spec.shape)))
            offset += size
        return out
    if load_format is not None:
        raise WeightUpdateError(f"load_format must be None or {FLATTENED_BUCKET!r}, got {load_format!r}")
    out = []
    for spec in specs:
        tensor = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        dist.broadcast(tensor, src=0, group=group)
        out.append((spec.name, tensor))
    return out


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
