"""HTTP client for one SGLang server's control and weight-update API (or our reference server).

Routes and bodies follow SGLang's ``http_server.py`` (notes/sglang-protocol.md §1). Two protocol
generations exist: from 0.5.21 on, ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``
fail unless a session is open (``/begin_weight_update`` ... ``/end_weight_update``); before that the
session routes do not exist (404). :meth:`SGLangClient.server_info` reads the version from
``GET /server_info`` and :func:`needs_session` decides from it, so the caller never guesses. A
``/server_info`` in vLLM's shape fails with ``EngineMismatch`` (``weights.inference_engine`` is wrong).

Every call has a deadline; failures raise :class:`SGLangError` with the route, HTTP status and
SGLang's message (weight routes answer HTTP 200 with ``success: false`` or HTTP 400 when they refuse).
The admin API key, when configured, goes on every call as a bearer token: SGLang accepts only the
admin key on its admin routes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from atropos_megatron.bridge.inference_client import (
    EngineMismatch,
    GroupJoin,
    InferenceError,
    JsonHttp,
    ServerInfo,
    Step,
)

SESSION_VERSION = (0, 5, 21)  # first SGLang release that needs begin/end_weight_update around updates
FLATTENED_BUCKET = "flattened_bucket"  # = sglang_wire.FLATTENED_BUCKET (not imported: it loads torch)

__all__ = ["SESSION_VERSION", "SGLangClient", "SGLangError", "ServerInfo", "needs_session", "parse_version"]


class SGLangError(InferenceError):
    """A call to an SGLang server failed (unreachable, timed out, or refused)."""


def needs_session(info: ServerInfo) -> bool:
    """Whether updates must sit inside ``/begin_weight_update`` ... ``/end_weight_update``."""
    return parse_version(info.version) >= SESSION_VERSION


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.21.post1"`` -> ``(0, 5, 21)``; unparseable or empty text is treated as the newest protocol."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if len(parts) == 3 else (999,)


class SGLangClient(JsonHttp):
    """Control and weight calls to one server at ``url`` (no retries here: the caller decides).

    Implements ``inference_client.InferenceClient`` (the engine-neutral names, each one or two of
    SGLang's calls below) and keeps SGLang's own calls under SGLang's names."""

    engine = "sglang"
    error_type = SGLangError
    group_before_update = False

    # -- discovery ------------------------------------------------------------------------------

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        body = self._request("GET", "/server_info", timeout_s=timeout_s)
        info = body if isinstance(body, dict) else {}
        if "vllm_config" in info:  # vLLM's dev-mode /server_info
            raise EngineMismatch(
                self.url, "/server_info", "the server answers as vLLM; set weights.inference_engine=vllm"
            )
        version = info.get("weight_version")
        if version is None:  # SGLang keeps it in /model_info only
            version = self.weight_version(timeout_s=timeout_s)
        return ServerInfo(
            version=str(info.get("version", "")),
            tp_size=int(info.get("tp_size", 1) or 1),
            weight_version=str(version),
        )

    def weight_version(self, *, timeout_s: float | None = None) -> str:
        body = self._request("GET", "/model_info", timeout_s=timeout_s)
        return str(body.get("weight_version", "")) if isinstance(body, dict) else ""

    # -- generation control ---------------------------------------------------------------------

    def pause_generation(self, mode: str) -> None:
        self._request("POST", "/pause_generation", json={"mode": mode})

    def continue_generation(self) -> None:
        self._request("POST", "/continue_generation", json={})

    def flush_cache(self, *, attempts: int = 60, interval_s: float = 1.0) -> None:
        """Flush the prefix cache, retrying while requests drain (SGLang answers 400 until they have)."""
        for attempt in range(attempts):
            try:
                self._request("POST", "/flush_cache", expect_json=False)
                return
            except SGLangError as exc:
                if exc.status_code != 400 or attempt == attempts - 1:
                    raise
                time.sleep(interval_s)

    def update_weight_version(self, version: str) -> None:
        self._request(
            "POST", "/update_weight_version", json={"new_version": version, "abort_all_requests": False}
        )

    # -- weight sessions and updates ------------------------------------------------------------

    def begin_weight_update(self) -> None:
        self._weight_call("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._weight_call("/end_weight_update", {})

    def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        *,
        load_format: str | None,
        weight_version: str | None = None,
    ) -> None:
        body = {
            "serialized_named_tensors": serialized_named_tensors,
            "load_format": load_format,
            "flush_cache": False,
        }
        self._weight_call("/update_weights_from_tensor", _with_version(body, weight_version))

    def init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        self._weight_call("/init_weights_update_group", body)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._weight_call("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        load_format: str | None,
        weight_version: str | None = None,
    ) -> None:
        body = {
            "names": names,
            "dtypes": dtypes,
            "shapes": shapes,
            "group_name": group_name,
            "load_format": load_format,
            "flush_cache": False,
        }
        self._weight_call("/update_weights_from_distributed", _with_version(body, weight_version))

    def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None) -> None:
        body = {"model_path": model_path, "flush_cache": False}
        self._weight_call("/update_weights_from_disk", _with_version(body, weight_version))

    # -- LoRA adapters (SGLang >= 0.5.8 for tensors; docs/sglang-lora.md) -------------------------

    def load_lora_adapter(self, name: str, path: str, *, pinned: bool = False) -> None:
        """Load the PEFT directory ``path`` (on the server's filesystem) as adapter ``name``."""
        self._weight_call("/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": pinned})

    def load_lora_adapter_from_tensors(
        self,
        name: str,
        config: dict[str, Any],
        serialized_named_tensors: list[str],
        *,
        load_format: str | None,
        pinned: bool = False,
    ) -> None:
        """Load adapter ``name`` from tensors (one ``serialized_named_tensors`` entry per TP rank)."""
        body = {
            "lora_name": name,
            "config_dict": config,
            "serialized_named_tensors": serialized_named_tensors,
            "load_format": load_format,
            "pinned": pinned,
        }
        self._weight_call("/load_lora_adapter_from_tensors", body)

    def unload_lora_adapter(self, name: str) -> None:
        """Unload adapter ``name``; SGLang answers once the requests running on it have finished."""
        self._weight_call("/unload_lora_adapter", {"lora_name": name})

    # -- inference_client.InferenceClient ------------------------------------------------------

    def refusal(self, transport: str, *, adapter: bool) -> str | None:
        return None  # every transport, and adapters by grpc and disk (the header check refuses the rest)

    def pause(self, mode: str) -> None:
        self.pause_generation(mode)

    def resume(self) -> None:
        self.continue_generation()

    def begin_update(self, info: ServerInfo) -> None:
        if needs_session(info):
            self.begin_weight_update()

    def finish_update_steps(self, info: ServerInfo, version: str, *, flush_attempts: int) -> list[Step]:
        """End the session (0.5.21+), flush the prefix cache (best effort: SGLang refuses while paused
        requests are in flight), tag the version."""
        steps = [Step("end_weight_update", self.end_weight_update)] if needs_session(info) else []
        return steps + [
            Step("flush_cache", lambda: self.flush_cache(attempts=flush_attempts), best_effort=True),
            Step("update_weight_version", lambda: self.update_weight_version(version)),
        ]

    def abandon_update(self, info: ServerInfo) -> None:
        if needs_session(info):
            self.end_weight_update()

    def set_weight_version(self, version: str) -> None:
        self.update_weight_version(version)

    def reset_weight_group(self, group_name: str) -> None:
        self.destroy_weights_update_group(group_name)

    def init_weight_group(self, join: GroupJoin) -> None:
        self.init_weights_update_group(**dataclasses.asdict(join))

    def update_from_group(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], *, group_name: str
    ) -> None:
        self.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, load_format=FLATTENED_BUCKET
        )

    def update_from_tensor(self, payloads: list[str]) -> None:
        self.update_weights_from_tensor(payloads, load_format=FLATTENED_BUCKET)

    def update_from_disk(self, path: str) -> None:
        self.update_weights_from_disk(path)

    def load_adapter(self, name: str, path: str) -> None:
        self.load_lora_adapter(name, path)

    def load_adapter_from_tensors(self, name: str, config: dict[str, Any], payloads: list[str]) -> None:
        self.load_lora_adapter_from_tensors(name, config, payloads, load_format=FLATTENED_BUCKET)

    def unload_adapter(self, name: str) -> None:
        self.unload_lora_adapter(name)

    # -- plumbing -------------------------------------------------------------------------------

    def _weight_call(self, route: str, body: dict[str, Any]) -> None:
        answer = self._request("POST", route, json=body)
        if isinstance(answer, dict) and answer.get("success") is False:
            message = answer.get("message") or answer.get("error_message") or "refused without a message"
            raise SGLangError(self.url, route, str(message))


def _with_version(body: dict[str, Any], weight_version: str | None) -> dict[str, Any]:
    return {**body, "weight_version": weight_version} if weight_version is not None else body
