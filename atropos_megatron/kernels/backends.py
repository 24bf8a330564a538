"""Which implementation of the token-statistics passes runs: Triton where it can, chunked torch elsewhere.

Both backends expose ``shard_stats`` and ``write_grad`` with the same contract (see ``torch_ops``); the
Triton one also has the one-kernel GRPO loss. ``grpo.kernel`` in the config chooses: ``triton``
(fail loudly if it cannot run), ``torch``, or ``auto`` (Triton on a CUDA device, torch otherwise).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels can launch on ``device``: CUDA, or any device under ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(requested: str, device: torch.device) -> str:
    """``triton`` or ``torch`` for ``requested`` (one of ``BACKENDS``) on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    usable = triton_usable(device) and (device.type == "cuda" or requested == "triton")
    if requested == "triton" and not usable:
        raise RuntimeError(
            f"grpo.kernel=triton cannot run on {device.type}: Triton needs a CUDA device "
            "(or TRITON_INTERPRET=1 for slow CPU tests); use grpo.kernel=auto or torch"
        )
    return "triton" if usable else "torch"


def backend_ops(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use: Triton is optional)."""
    if name == "triton":
        from atropos_megatron.kernels import triton_ops

        return triton_ops
    from atropos_megatron.kernels import torch_ops

    return torch_ops
