"""The weight-update routes' logic: validate SGLang's request bodies, run the update, answer like SGLang.

Every handler returns ``UpdateResult(success, message)`` (HTTP 200 / 400 in ``http_server``). Bodies
are checked field by field against SGLang 0.5.23's request structs (an unknown field is an error, so
a client typo cannot silently do nothing). Handlers block (rendezvous, broadcasts, copies): the HTTP
layer runs each in a thread inside ``Engine.ordered(ticket)``, so they run one at a time in arrival
order (distributed receives must match the trainer's broadcast order). Sessions
(``begin_weight_update``/``end_weight_update``) are enforced when emulating SGLang >= 0.5.21.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from atropos_megatron import sglang_wire
from atropos_megatron.inference.engine import Engine
from atropos_megatron.inference.weight_loader import (
    TensorSpec,
    WeightUpdateError,
    apply_named_tensors,
    load_from_disk,
    parse_dtype,
    receive_distributed,
    validate_specs,
)
from atropos_megatron.logs import FirstTimeInfo

logger = logging.getLogger(__name__)
REQUIRED = object()
_COMMON = {"rid": None, "http_worker_ipc": None}
TENSOR_FIELDS = {
    "serialized_named_tensors": REQUIRED,
    "load_format": None,
    "flush_cache": True,
    "abort_all_requests": False,
    "weight_version": None,
    "selector": "all",
    "disable_draft_model": None,  # 0.5.17's spelling of selector
    "torch_empty_cache": False,
}
DISK_FIELDS = {
    "model_path": REQUIRED,
    "load_format": None,
    "abort_all_requests": False,
    "weight_version": None,
    "is_async": False,
    "torch_empty_cache": False,
    "keep_pause": False,
    "recapture_cuda_graph": False,
    "token_step": 0,
    "flush_cache": True,
    "manifest": None,
}
INIT_FIELDS = {
    "master_address": REQUIRED,
    "master_port": REQUIRED,
    "rank_offset": REQUIRED,
    "world_size": REQUIRED,
    "group_name": "weight_update_group",
    "backend": "nccl",
}
DESTROY_FIELDS = {"group_name": "weight_update_group"}
DISTRIBUTED_FIELDS = {
    "names": REQUIRED,
    "dtypes": REQUIRED,
    "shapes": REQUIRED,
    "group_name": "weight_update_group",
    "flush_cache": True,
    "abort_all_requests": False,
    "weight_version": None,
    "load_format": None,
    "selector": "all",
    "torch_empty_cache": False,
}
NOT_FLUSHED = (
    "Weights were updated, but the cache was not flushed because requests are still running or queued. "
    "Pass flush_cache=false while generation is paused in place, then call /flush_cache."
)


@dataclass(frozen=True)
class UpdateResult:
    success: bool
    message: str


def read_body(body: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; raises WeightUpdateError on an unknown or missing field."""
    if not isinstance(body, dict):
        raise WeightUpdateError("the request body must be a JSON object")
    allowed = {**_COMMON, **fields}
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise WeightUpdateError(f"unknown field(s) {unknown}; expected {sorted(fields)}")
    values = {key: body.get(key, default) for key, default in allowed.items()}
    missing = [key for key, value in values.items() if value is REQUIRED]
    if missing:
        raise WeightUpdateError(f"missing field(s) {missing}")
    return values


@dataclass
class WeightUpdater:
    """Owns the weight-sync groups and the session flag; one per server."""

    engine: Engine
    sessions_required: bool
    group_timeout_s: float = 300.0
    groups: dict[str, Any] = field(default_factory=dict)
    session_open: bool = False
    _update_log: FirstTimeInfo = field(default_factory=FirstTimeInfo)  # one update a step: INFO once

    # ----- sessions (SGLang >= 0.5.21)
    def begin(self) -> UpdateResult:
        self.session_open = True
        return UpdateResult(True, "Weight update session started.")

    def end(self) -> UpdateResult:
        if not self.session_open:
            return UpdateResult(False, "No weight update session is open.")
        self.session_open = False
        return UpdateResult(True, "Weight update session ended.")

    def _session_error(self, route: str) -> UpdateResult | None:
        if self.sessions_required and not self.session_open:
            return UpdateResult(
                False, f"{route} must run between begin_weight_update() and end_weight_update()"
            )
        return None

    # ----- updates (each runs in a worker thread, in ticket order)
    def from_tensor(self, body: dict[str, Any]) -> UpdateResult:
        values = read_body(body, TENSOR_FIELDS)
        if error := self._session_error("update_weights_from_tensor"):
            return error
        entries = values["serialized_named_tensors"]
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], str | bytes):
            raise WeightUpdateError("serialized_named_tensors must be a non-empty list of base64 strings")
        named = sglang_wire.decode_tensor_update(entries[0], values["load_format"])  # TP rank 0's entry
        validate_specs(self.engine.model, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in named])
        return self._apply(
            values, "tensor", lambda: (len(named), apply_named_tensors(self.engine.model, named))
        )

    def from_disk(self, body: dict[str, Any]) -> UpdateResult:
        values = read_body(body, DISK_FIELDS)
        if values["load_format"] not in (None, "auto", "safetensors"):
            raise WeightUpdateError(
                f"load_format {values['load_format']!r} is not supported (safetensors only)"
            )
        return self._apply(values, "disk", lambda: load_from_disk(self.engine.model, values["model_path"]))

    def from_distributed(self, body: dict[str, Any]) -> UpdateResult:
        values = read_body(body, DISTRIBUTED_FIELDS)
        if error := self._session_error("update_weights_from_distributed"):
            return error
        names, dtypes, shapes = values["names"], values["dtypes"], values["shapes"]
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise WeightUpdateError("names, dtypes and shapes must be lists")
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightUpdateError("names, dtypes and shapes must have the same length")
        group = self.groups.get(values["group_name"])
        if group is None:
            raise WeightUpdateError(f"no weight update group named {values['group_name']!r}; call init first")
        specs = [
            TensorSpec(n, tuple(int(d) for d in s), parse_dtype(t))
            for n, t, s in zip(names, dtypes, shapes, strict=True)
        ]

        def receive_and_apply() -> tuple[int, int]:
            named = receive_distributed(
                group, specs, load_format=values["load_format"], device=self.engine.device
            )
            return len(named), apply_named_tensors(self.engine.model, named)  # validates before copying

        return self._apply(values, "distributed", receive_and_apply)

    def init_group(self, body: dict[str, Any]) -> UpdateResult:
        from atropos_megatron.weights.sync_group import init_custom_process_group

        values = read_body(body, INIT_FIELDS)
        name = values["group_name"]
        if name in self.groups:
            return UpdateResult(False, f"a weight update group named {name!r} already exists")
        rank = int(values["rank_offset"])  # + this server's TP rank, which is always 0
        init_method = f"tcp://{_bracket(values['master_address'])}:{int(values['master_port'])}"

        self.groups[name] = init_custom_process_group(
            backend=values["backend"],
            init_method=init_method,
            world_size=int(values["world_size"]),
            rank=rank,
            group_name=name,
            timeout_s=self.group_timeout_s,
        )
        logger.info("joined weight update group %r as rank %d via %s", name, rank, init_method)
        return UpdateResult(True, "Succeeded to initialize custom process group.")

    def destroy_group(self, body: dict[str, Any]) -> UpdateResult:
        from atropos_megatron.weights.sync_group import destroy_group

        values = read_body(body, DESTROY_FIELDS)
        group = self.groups.pop(values["group_name"], None)
        if group is None:
            return UpdateResult(False, f"no weight update group named {values['group_name']!r}")
        destroy_group(group)
        return UpdateResult(True, "Succeeded to destroy custom process group.")

    def close(self) -> None:
        from atropos_megatron.weights.sync_group import destroy_group

        for group in self.groups.values():
            destroy_group(group)
        self.groups.clear()

    # ----- shared
    def _apply(self, values: dict[str, Any], source: str, fn) -> UpdateResult:
        if values["abort_all_requests"]:
            self.engine.abort_all()
        start = time.monotonic()
        count, nbytes = self.engine.run_quiescent(fn)
        seconds = time.monotonic() - start
        if values["weight_version"] is not None:
            self.engine.set_weight_version(str(values["weight_version"]))
        logger.log(
            self._update_log.level(),
            "weights updated from %s: version=%s tensors=%d bytes=%d in %.3f s",
            source, self.engine.weight_version, count, nbytes, seconds,
        )  # fmt: skip
        if values["flush_cache"] and self.engine.has_running:
            return UpdateResult(False, NOT_FLUSHED)
        return UpdateResult(True, "Succeeded to update model weights.")


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
