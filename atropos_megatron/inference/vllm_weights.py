"""vLLM 0.33's RL weight-transfer routes (``VLLM_SERVER_DEV_MODE=1`` + ``--weight-transfer-config``).

Mirrors ``vllm/entrypoints/rl/online/api_router.py`` and the worker side
(``vllm/v1/worker/gpu_worker.py``, ``distributed/weight_transfer/nccl_engine.py``), see docs/vllm.md:

- ``POST /init_weight_transfer_engine {"init_info": {...}}``: NCCL init info (``master_address``,
  ``master_port``, ``rank_offset``, ``world_size``, ``packed``, ``packed_buffer_size_bytes``,
  ``packed_num_buffers``, ``nccl_unique_id_b64``); an unknown key is an error. The backend is the
  server's (``--weight-transfer-config '{"backend": ...}'``), never the request's: vLLM's ``nccl``
  (CUDA) or this server's ``gloo`` (CPU tensors over the same TCP rendezvous, for tests);
- ``/start_weight_update`` -> ``/update_weights {"update_info": {names, dtype_names, shapes}}``
  (empty lists: the previous call's metadata) -> ``/finish_weight_update {"weight_version"}``.

Engine-side failures answer as vLLM's do (the worker's exception reaches the API process as a plain
``Exception``): HTTP 500 ``{"error": {"message", "type": "InternalServerError", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from atropos_megatron.inference.engine import Engine
from atropos_megatron.inference.weight_loader import (
    TensorSpec,
    apply_named_tensors,
    parse_dtype,
    receive_distributed,
)
from atropos_megatron.logs import FirstTimeInfo
from atropos_megatron.weights.sync_group import VLLM_GROUP_NAME

logger = logging.getLogger(__name__)
BACKENDS = ("nccl", "gloo")
GROUP_NAME = VLLM_GROUP_NAME  # store prefix of our gloo group (vLLM's StatelessProcessGroup has none)
NOT_CONFIGURED = (
    "Weight transfer not configured. Please set weight_transfer_config to enable weight transfer."
)


class TransferError(Exception):
    """What vLLM's worker raises; the route answers HTTP 500 with this message."""


@dataclass(kw_only=True)
class NcclInitInfo:
    """vLLM's ``NCCLWeightTransferInitInfo`` (``nccl_common.py``), keyword-only."""

    master_address: str | None = None
    master_port: int | None = None
    rank_offset: int
    world_size: int
    nccl_unique_id_b64: str | None = None
    packed: bool = False
    packed_buffer_size_bytes: int = 1 << 30
    packed_num_buffers: int = 2


def parse_weight_transfer_config(text: str | None) -> str | None:
    """``--weight-transfer-config '{"backend": "nccl"}'`` -> the backend (None: not configured)."""
    import json

    if text is None:
        return None
    config = json.loads(text)
    if not isinstance(config, dict) or set(config) - {"backend"}:
        raise ValueError(f"--weight-transfer-config takes {{'backend': one of {BACKENDS}}}, got {text!r}")
    backend = config.get("backend", "nccl")
    if backend not in BACKENDS:
        raise ValueError(f"weight transfer backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@dataclass
class VllmWeightTransfer:
    """The worker's weight-transfer engine and session flag; one per server."""

    engine: Engine
    backend: str | None  # None: --weight-transfer-config not given
    group_timeout_s: float = 300.0
    group: Any = None
    update_active: bool = False
    last_specs: list[TensorSpec] = field(default_factory=list)
    _names: int = 0
    _received: list[int] = field(default_factory=lambda: [0, 0])  # tensors, bytes of this update
    _started: float = 0.0
    _update_log: FirstTimeInfo = field(default_factory=FirstTimeInfo)

    def _check(self) -> None:
        if self.backend is None:
            raise TransferError(NOT_CONFIGURED)

    def init(self, init_info: dict[str, Any]) -> None:
        from atropos_megatron.weights.sync_group import destroy_group, init_custom_process_group

        self._check()
        try:
            info = NcclInitInfo(**init_info)
        except TypeError as exc:
            raise TransferError(f"Invalid init_info for NCCLWeightTransferEngine: {exc}") from exc
        if info.nccl_unique_id_b64 is not None or info.master_address is None or info.master_port is None:
            raise TransferError(
                "this server joins by master_address + master_port only (no nccl_unique_id_b64)"
            )
        if info.packed:
            raise TransferError("packed=true is not implemented by the reference server; send packed=false")
        if self.group is not None:  # vLLM builds a new communicator; the old one is released here
            destroy_group(self.group)
            self.group = None
        self._names += 1
        address = f"[{info.master_address}]" if ":" in info.master_address else info.master_address
        self.group = init_custom_process_group(
            backend=self.backend,
            init_method=f"tcp://{address}:{int(info.master_port)}",
            world_size=int(info.world_size),
            rank=int(info.rank_offset),  # + dp_rank * TP * PP + rank: always 0 here
            group_name=GROUP_NAME,  # the trainer builds its side with the same name
            timeout_s=self.group_timeout_s,
        )
        self.last_specs = []
        logger.info("joined the weight transfer group as rank %d (%s)", info.rank_offset, self.backend)

    def start(self) -> None:
        self._check()
        if self.update_active:
            raise TransferError(
                "start_weight_update called while a weight update is already active. "
                "Call finish_weight_update first."
            )
        self.update_active = True
        self._received = [0, 0]
        self._started = time.monotonic()

    def update(self, update_info: dict[str, Any]) -> tuple[int, int]:
        self._check()
        if not self.update_active:
            raise TransferError("start_weight_update must be called before update_weights.")
        try:
            specs = self._specs(update_info)
            if self.group is None:
                raise TransferError(
                    "NCCL weight transfer not initialized. Call init_transfer_engine() first."
                )

            def receive_and_apply() -> tuple[int, int]:
                named = receive_distributed(self.group, specs, load_format=None, device=self.engine.device)
                return len(named), apply_named_tensors(self.engine.model, named)

            count, nbytes = self.engine.run_quiescent(receive_and_apply)
            self._received = [self._received[0] + count, self._received[1] + nbytes]
            return count, nbytes
        except BaseException:
            self.update_active = False  # as vLLM's worker: a failed chunk ends the session
            raise

    def finish(self) -> None:
        self._check()
        if not self.update_active:
            raise TransferError("finish_weight_update called without a matching start_weight_update.")
        self.update_active = False

    def log_finished(self) -> None:
        """One line for the update just finished (INFO the first time, then DEBUG)."""
        logger.log(
            self._update_log.level(),
            "weights updated through vLLM's weight transfer (%s): version=%s tensors=%d bytes=%d in %.3f s",
            self.backend, self.engine.weight_version, *self._received, time.monotonic() - self._started,
        )  # fmt: skip

    def shutdown(self) -> None:
        from atropos_megatron.weights.sync_group import destroy_group

        if self.update_active:
            raise TransferError("Cannot release a trainer connection during a weight update")
        destroy_group(self.group)
        self.group = None

    def close(self) -> None:
        from atropos_megatron.weights.sync_group import destroy_group

        destroy_group(self.group)
        self.group = None

    def _specs(self, update_info: dict[str, Any]) -> list[TensorSpec]:
        fields = {f.name for f in dataclasses.fields(_UpdateInfo)}
        if set(update_info) - fields:
            raise TransferError(
                f"Invalid update_info for NCCLWeightTransferEngine: unexpected keyword argument(s) "
                f"{sorted(set(update_info) - fields)}"
            )
        info = _UpdateInfo(**update_info)
        n = len(info.names)
        if len(info.dtype_names) != n:
            raise TransferError(
                f"`dtype_names` should be of the same size as `names`: got {len(info.dtype_names)} and {n}"
            )
        if len(info.shapes) != n:
            raise TransferError(
                f"`shapes` should be of the same size as `names`: got {len(info.shapes)} and {n}"
            )
        if not n:
            return self.last_specs  # vLLM: empty lists reuse the previous call's metadata
        specs = [
            TensorSpec(name, tuple(int(d) for d in shape), parse_dtype(dtype))
            for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes, strict=True)
        ]
        self.last_specs = specs
        return specs


@dataclass
class _UpdateInfo:
    names: list[str] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
