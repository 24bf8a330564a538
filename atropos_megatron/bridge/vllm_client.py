"""HTTP client for one vLLM server's RL routes (vLLM >= 0.33, or ``atropos-megatron serve --protocol vllm``).

Routes and bodies are vLLM 0.33.0's ``vllm/entrypoints/rl/online/api_router.py`` (mounted with
``VLLM_SERVER_DEV_MODE=1``; docs/vllm.md §3), driven in the order of vLLM's own trainer-side client
(``distributed/weight_transfer/clients.py: HTTPVLLMWeightSyncClient`` with
``nccl_engine.NCCLTrainerWeightTransferEngine``):

    POST /pause?mode=abort|keep          (WeightPush: pause)
    POST /shutdown_weight_transfer_engine + POST /init_weight_transfer_engine {"init_info": {...}}
                                         (a new group only; returns once the trainer joined)
    POST /start_weight_update            (begin_update)
    POST /update_weights {"update_info": {"names", "dtype_names", "shapes"}}   (one per bucket)
    POST /finish_weight_update {"weight_version": v}                           (tags the version)
    POST /resume

``init_info`` is what ``nccl_common.build_worker_init_payload`` sends: the workers sit at
``rank_offset`` (1 for the first server), ``packed: false`` (one broadcast per tensor, in ``names``
order; ``weights/sync_group.py`` is the trainer's end). vLLM picks the group's backend at start-up
(``--weight-transfer-config``), never per request, so the header's backend is not sent.

LoRA adapter pushes (``weights.lora_sync: adapter``) go by ``disk``: the trainer writes a PEFT directory
and ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` loads it as a new adapter
(``entrypoints/serve/lora/api_router.py``; the server needs ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); requests select it by ``model: "<lora_name>"``, which the
bridge's proxies set; retired ones leave by ``POST /v1/unload_lora_adapter {"lora_name"}``. Both reply
200 with a text body.

Not supported, refused by name before a push starts (:meth:`VLLMClient.refusal`): full weights by
``grpc`` (vLLM has no route that takes serialized tensors; its ``ipc`` backend takes CUDA IPC handles,
same GPU node only) or ``disk`` (0.33 registers no disk weight-transfer engine; a checkpoint is loaded
only at start-up), and adapters by anything but ``disk`` (vLLM loads adapters from a path only).

Errors: a validation error is HTTP 400 ``{"error": {"message", ...}}``; a worker-side one (an update
outside ``start``/``finish``, a bad ``init_info``, no ``--weight-transfer-config``) HTTP 500 in the same
shape; ``/pause`` answers 400 ``{"error": str}``. All raise :class:`VLLMError` with vLLM's message.
vLLM has no prefix-cache flush among these routes: its ``/pause`` clears the cache in ``abort`` mode,
and keeps it in ``keep`` mode (frozen requests go on with their cache).
"""

from __future__ import annotations

from typing import Any

import httpx

from atropos_megatron.bridge.inference_client import (
    EngineMismatch,
    GroupJoin,
    InferenceError,
    JsonHttp,
    ServerInfo,
    Step,
)

PAUSE_MODES = {"abort": "abort", "in_place": "keep"}
"""``weights.pause_mode`` -> vLLM's ``/pause?mode``. vLLM has no ``retract`` (its ``keep`` freezes
requests with their KV cache): ``config.WeightsConfig`` refuses it for vLLM."""
PACKED_BUFFER_SIZE_BYTES = 1024**3  # vLLM's DEFAULT_PACKED_BUFFER_SIZE_BYTES (unused with packed: false)
PACKED_NUM_BUFFERS = 2  # vLLM's DEFAULT_PACKED_NUM_BUFFERS
REFUSED = {
    "grpc": "vLLM has no route that loads serialized tensors (its ipc backend takes CUDA IPC handles)",
    "disk": "vLLM 0.33 has no disk weight-transfer engine (a checkpoint loads only at start-up)",
}
ADAPTERS_REFUSED = (
    "vLLM loads LoRA adapters from a path only (/v1/load_lora_adapter): push them with transport=disk"
)


class VLLMError(InferenceError):
    """A call to a vLLM server failed (unreachable, timed out, or refused)."""


class VLLMClient(JsonHttp):
    """Control and weight calls to one vLLM server at ``url`` (no retries here: the caller decides)."""

    engine = "vllm"
    error_type = VLLMError
    group_before_update = True  # gpu_worker refuses shutdown_weight_transfer_engine during an update

    # -- discovery ------------------------------------------------------------------------------

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """``/get_world_size`` (ranks it adds to a group: TP * PP * DP), ``/weight_info`` and
        ``/version`` (optional: ``""`` where it is missing)."""
        try:
            size = self._request("GET", "/get_world_size", timeout_s=timeout_s)
        except VLLMError as exc:
            if exc.status_code == 404:
                self._raise_not_vllm(timeout_s)
            raise
        weights = self._request("GET", "/weight_info", timeout_s=timeout_s)
        try:
            release = self._request("GET", "/version", timeout_s=timeout_s)
        except VLLMError as exc:
            if exc.status_code != 404:
                raise
            release = {}
        weight_version = weights.get("weight_version") if isinstance(weights, dict) else None
        return ServerInfo(
            version=str(release.get("version", "")) if isinstance(release, dict) else "",
            tp_size=int(size.get("world_size", 1) or 1) if isinstance(size, dict) else 1,
            weight_version="" if weight_version is None else str(weight_version),
            engine=self.engine,
        )

    def _raise_not_vllm(self, timeout_s: float | None) -> None:
        """No ``/get_world_size``: SGLang (its ``/server_info`` says so) or vLLM without its RL routes."""
        try:
            info = self._request("GET", "/server_info", timeout_s=timeout_s)
        except VLLMError:
            info = None
        if isinstance(info, dict) and "version" in info and "vllm_config" not in info:
            raise EngineMismatch(
                self.url,
                "/get_world_size",
                f"the server answers as SGLang {info['version']}; set weights.inference_engine=sglang",
            )
        raise VLLMError(
            self.url,
            "/get_world_size",
            "HTTP 404: no RL routes; start vLLM with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config",
            status_code=404,
        )

    def refusal(self, transport: str, *, adapter: bool) -> str | None:
        if adapter:
            return None if transport == "disk" else f"LoRA adapters by {transport}: {ADAPTERS_REFUSED}"
        if transport in REFUSED:
            return f"the {transport} transport is not supported with vLLM: {REFUSED[transport]}"
        return None

    # -- generation control ---------------------------------------------------------------------

    def pause(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise VLLMError(self.url, "/pause", f"pause_mode {mode!r} has no vLLM equivalent: {PAUSE_MODES}")
        self._request("POST", "/pause", params={"mode": PAUSE_MODES[mode]})

    def resume(self) -> None:
        self._request("POST", "/resume")

    def is_paused(self) -> bool:
        body = self._request("GET", "/is_paused")
        return bool(body.get("is_paused")) if isinstance(body, dict) else False

    def set_weight_version(self, version: str) -> None:
        self._request("POST", "/update_weight_version", json={"new_version": version})

    # -- weight updates -------------------------------------------------------------------------

    def begin_update(self, info: ServerInfo) -> None:
        self._request("POST", "/start_weight_update")

    def finish_update_steps(self, info: ServerInfo, version: str, *, flush_attempts: int) -> list[Step]:
        """One call: vLLM finishes the update and sets ``version`` together (``AsyncLLM.finish_weight_update``)."""
        return [Step("finish_weight_update", lambda: self.finish_weight_update(version))]

    def finish_weight_update(self, version: str | None) -> None:
        body = {"weight_version": version} if version is not None else None
        self._request("POST", "/finish_weight_update", json=body)

    def abandon_update(self, info: ServerInfo) -> None:
        """Finish without a version: the weights may be a mix, so the server stays paused, but the next
        ``start_weight_update`` is accepted again."""
        self.finish_weight_update(None)

    def reset_weight_group(self, group_name: str) -> None:
        self._request("POST", "/shutdown_weight_transfer_engine")

    def init_weight_group(self, join: GroupJoin) -> None:
        """``group_name`` and ``backend`` are not vLLM's to take (see the module docstring)."""
        init_info = {
            "master_address": join.master_address,
            "master_port": join.master_port,
            "rank_offset": join.rank_offset,
            "world_size": join.world_size,
            "packed": False,
            "packed_buffer_size_bytes": PACKED_BUFFER_SIZE_BYTES,
            "packed_num_buffers": PACKED_NUM_BUFFERS,
        }
        self._request("POST", "/init_weight_transfer_engine", json={"init_info": init_info})

    def update_from_group(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], *, group_name: str
    ) -> None:
        update_info = {"names": names, "dtype_names": dtypes, "shapes": shapes}
        self._request("POST", "/update_weights", json={"update_info": update_info})

    # -- LoRA adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        """``/v1/load_lora_adapter``: ``path`` is a PEFT directory the server can read."""
        self._request("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> None:
        self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})

    # -- refused (``refusal`` stops such a push before it starts) -------------------------------

    def update_from_tensor(self, payloads: list[str]) -> None:
        raise VLLMError(self.url, "(grpc transport)", REFUSED["grpc"])

    def update_from_disk(self, path: str) -> None:
        raise VLLMError(self.url, "(disk transport)", REFUSED["disk"])

    def load_adapter_from_tensors(self, name: str, config: dict[str, Any], payloads: list[str]) -> None:
        raise VLLMError(self.url, "(LoRA adapter)", ADAPTERS_REFUSED)

    # -- plumbing -------------------------------------------------------------------------------

    def _error_text(self, response: httpx.Response) -> str:
        text = super()._error_text(response)
        if response.status_code == 404 and "lora_adapter" in str(response.request.url):
            return f"{text} (no such route: start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)"
        if response.status_code == 404:
            return f"{text} (no such route: VLLM_SERVER_DEV_MODE=1 unset, or not a vLLM server?)"
        return text
