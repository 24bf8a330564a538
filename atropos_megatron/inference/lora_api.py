"""SGLang 0.5.23's LoRA routes and adapter selection: request bodies, replies, error texts.

``/load_lora_adapter``, ``/load_lora_adapter_from_tensors`` and ``/unload_lora_adapter`` answer
SGLang's ``LoRAUpdateOutput`` (``rid``, ``http_worker_ipc``, ``success``, ``error_message``,
``loaded_adapters``; HTTP 200 / 400), one load or unload at a time (SGLang's ``lora_update_lock``).
A request names adapters by ``lora_path`` (``/generate``) or ``model="<served>:<name>"`` (``/v1``,
taking priority over ``lora_path``); :meth:`LoraService.resolve` turns names into held adapters the
way SGLang's tokenizer manager does, including its implicit reload of an unloaded name from its
stored path. Where SGLang answers 422 (a missing field) this answers 400 with the same reply shape,
and unknown fields are refused (as the weight routes do), so a typo cannot pass silently.

vLLM mode's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (``vllm_http``, vLLM's replies)
use the same service: :meth:`LoraService.add_from_path` (with vLLM's in-place replacement),
:meth:`LoraService.forget` (no wait for the requests holding it) and :meth:`LoraService.hold` (vLLM's
selection: ``model`` names a loaded adapter; no implicit reload).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch

from atropos_megatron import sglang_wire
from atropos_megatron.inference.engine import Engine
from atropos_megatron.inference.lora_adapters import (
    TENSOR_PATH,
    AdapterConfig,
    AdapterError,
    LoraAdapter,
    build_factors,
    check_config,
    parse_config,
    read_config,
    read_tensors,
)
from atropos_megatron.inference.lora_registry import LoraRegistry
from atropos_megatron.inference.native_api import RequestError
from atropos_megatron.logs import FirstTimeInfo

logger = logging.getLogger(__name__)


def _first_time(first: FirstTimeInfo) -> tuple[int, str]:
    """The level of a recurring line and, the first time, a note that later ones are at DEBUG."""
    level = first.level()
    return level, " (later ones at DEBUG)" if level == logging.INFO else ""


NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
_REQUIRED = object()
_COMMON = {"rid": None, "http_worker_ipc": None, "lora_id": None}  # lora_id: SGLang overwrites it
LOAD_FIELDS = {"lora_name": _REQUIRED, "lora_path": _REQUIRED, "pinned": False}
TENSOR_FIELDS = {
    "lora_name": _REQUIRED,
    "config_dict": _REQUIRED,
    "serialized_named_tensors": _REQUIRED,
    "pinned": False,
    "added_tokens_config": None,
    "load_format": None,
    "expected_checksums": None,
}
UNLOAD_FIELDS = {"lora_name": _REQUIRED}
_TYPES = {
    "lora_name": str,
    "lora_path": str,
    "pinned": bool,
    "config_dict": dict,
    "serialized_named_tensors": list,
}


def update_output(success: bool, error_message: str | None, loaded: dict[str, str] | None) -> dict[str, Any]:
    """SGLang's ``LoRAUpdateOutput`` as its HTTP server serialises it (field order included)."""
    return {
        "rid": None,
        "http_worker_ipc": None,
        "success": success,
        "error_message": error_message,
        "loaded_adapters": loaded,
    }


def read_lora_body(body: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in; RequestError naming a missing, unknown or mistyped field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(fields) - set(_COMMON))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; expected {sorted(fields)}")
    values = {key: body.get(key, default) for key, default in fields.items()}
    missing = [key for key, value in values.items() if value is _REQUIRED]
    if missing:
        raise RequestError(f"missing field(s) {missing}")
    for key, kind in _TYPES.items():
        if key in values and not isinstance(values[key], kind):
            raise RequestError(f"{key} must be a {kind.__name__}, got {type(values[key]).__name__}")
    return values


def names_per_prompt(lora_path: Any, prompts: int) -> list[str | None] | None:
    """``lora_path`` as one adapter name (or None) per prompt; None when it names nothing (SGLang's falsy)."""
    if not lora_path:
        return None
    if isinstance(lora_path, str):
        return [lora_path] * prompts
    if not isinstance(lora_path, list) or not all(n is None or isinstance(n, str) for n in lora_path):
        raise RequestError("lora_path should be a list or a string.")
    if len(lora_path) != prompts:
        raise RequestError(f"lora_path list length ({len(lora_path)}) must match batch size ({prompts})")
    return list(lora_path)


def parse_model_parameter(model: str, served_model_name: str) -> tuple[str, str | None]:
    """``"<base>:<adapter>"`` -> (base, adapter), as SGLang's ``_parse_model_parameter``."""
    if ":" not in model or model == served_model_name:
        return model, None
    if model.startswith(f"{served_model_name}:"):
        base, adapter = served_model_name, model[len(served_model_name) + 1 :]
    else:
        base, adapter = model.split(":", 1)
    return base.strip(), adapter.strip() or None


def openai_lora_path(body: Mapping[str, Any], served_model_name: str) -> Any:
    """The adapter a /v1 request names: ``model``'s adapter first, then the ``lora_path`` field."""
    model = body.get("model")
    if isinstance(model, str):
        _, adapter = parse_model_parameter(model, served_model_name)
        if adapter is not None:
            return adapter
    return body.get("lora_path")


class LoraService:
    """The LoRA routes and request-side resolution for one engine (answers "not enabled" without LoRA)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = LoraRegistry()
        self._update_lock = asyncio.Lock()  # SGLang's lora_update_lock: loads and unloads one at a time
        self._load_log, self._unload_log = FirstTimeInfo(), FirstTimeInfo()  # a trainer loads one per step

    @property
    def enabled(self) -> bool:
        return self.engine.lora is not None

    @property
    def update_lock(self) -> asyncio.Lock:
        """Held by every load and unload, so a check and the change it guards are one step."""
        return self._update_lock

    # ----- routes: each returns (reply, HTTP status)
    async def load_from_path(self, body: Any) -> tuple[dict[str, Any], int]:
        values, refused = self._admit(body, LOAD_FIELDS)
        if refused:
            return refused
        name, path, pinned = values["lora_name"], values["lora_path"], values["pinned"]
        async with self._update_lock:
            return await self._load(name, pinned, lambda: self._from_path(name, path, pinned))

    async def load_from_tensors(self, body: Any) -> tuple[dict[str, Any], int]:
        values, refused = self._admit(body, TENSOR_FIELDS)
        if refused:
            return refused
        async with self._update_lock:
            return await self._load(values["lora_name"], values["pinned"], lambda: self._from_tensors(values))

    async def unload(self, body: Any) -> tuple[dict[str, Any], int]:
        values, refused = self._admit(body, UNLOAD_FIELDS)
        if refused:
            return refused
        async with self._update_lock:
            try:
                adapter = self.registry.remove(values["lora_name"])
            except AdapterError as exc:
                return _reply(False, str(exc), None)
            # In-flight requests finish on the adapter; the reply waits for them, as in SGLang.
            await asyncio.to_thread(self.registry.wait_unused, adapter)
            level, note = _first_time(self._unload_log)
            logger.log(level, "LoRA adapter %s unloaded%s", adapter.name, note)
            return _reply(True, "", self.registry.loaded_adapters())

    # ----- vLLM mode (vllm_http): the caller holds update_lock and words the replies
    async def add_from_path(self, name: str, path: str, *, replace: bool = False) -> LoraAdapter:
        """Load the PEFT directory ``path`` as ``name``; ``replace``: a loaded adapter of that name gives
        way once the new one is built (vLLM's ``load_inplace``). Raises on failure, every adapter kept."""
        adapter = await asyncio.to_thread(self._from_path, name, path, False, replacing=replace)
        self.registry.add(adapter, replace=replace)
        level, note = _first_time(self._load_log)
        logger.log(level, "LoRA adapter %s loaded from %s%s", name, path, note)
        return adapter

    def forget(self, name: str) -> None:
        """Unload ``name`` at once (vLLM's unload: requests holding it finish on it, unwaited)."""
        adapter = self.registry.remove(name)
        level, note = _first_time(self._unload_log)
        logger.log(level, "LoRA adapter %s unloaded%s", adapter.name, note)

    def hold(self, name: Any, prompts: int) -> list[LoraAdapter | None] | None:
        """vLLM's selection: the loaded adapter called ``name`` once per prompt, held until
        :meth:`release`; None when ``name`` is no loaded adapter's (the base model's, unknown, unloaded)."""
        if not (self.enabled and isinstance(name, str) and self.registry.is_loaded(name)):
            return None
        try:
            return self.registry.acquire([name] * prompts)
        except AdapterError:  # unloaded since the check
            return None

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        """``/v1/models`` cards of the loaded adapters (SGLang: ``root`` is the path, no max length)."""
        served = self.engine.options.served_model_name
        return [
            {"id": a.name, "object": "model", "created": created, "owned_by": "sglang", "root": a.path,
             "parent": served, "max_model_len": None}
            for a in self.registry.adapters()
        ]  # fmt: skip

    # ----- requests
    async def resolve(self, lora_path: Any, prompts: int) -> list[LoraAdapter | None]:
        """One held adapter (or None) per prompt; RequestError with SGLang's text for a bad name.

        The caller must hand every returned adapter to :meth:`release` once its request finished.
        """
        names = names_per_prompt(lora_path, prompts)
        if names is None:
            return [None] * prompts
        if not self.enabled:
            first = lora_path if isinstance(lora_path, str) else next((n for n in lora_path if n), None)
            raise RequestError(
                f"LoRA adapter '{first}' was requested, but LoRA is not enabled. Please launch the server "
                "with --enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint."
            )
        for name in dict.fromkeys(n for n in names if n is not None):
            if not self.registry.is_loaded(name):
                await self._reload(name)
        try:
            return self.registry.acquire(names)
        except AdapterError as exc:
            raise RequestError(str(exc)) from exc

    def release(self, adapter: LoraAdapter | None) -> None:
        self.registry.release(adapter)

    def close(self) -> None:
        self.registry.close()

    def _admit(
        self, body: Any, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], tuple[dict[str, Any], int] | None]:
        """The body's values, or the reply that refuses it (a bad field; LoRA not enabled)."""
        try:
            values = read_lora_body(body, fields)
        except RequestError as exc:
            return {}, _reply(False, str(exc), None)
        return values, None if self.enabled else _reply(False, NOT_ENABLED, None)

    # ----- loading
    async def _load(self, name: str, pinned: bool, build) -> tuple[dict[str, Any], int]:
        """Build in a thread (disk reads, copies), then register; failures keep every adapter as it was."""
        try:
            adapter = await asyncio.to_thread(build)
            self.registry.add(adapter)
        except Exception as exc:  # SGLang reports any load failure as error_message=str(exc)
            logger.warning("LoRA adapter %s not loaded: %s: %s", name, type(exc).__name__, exc)
            return _reply(False, str(exc), self.registry.loaded_adapters())
        level, note = _first_time(self._load_log)
        logger.log(level, "LoRA adapter %s loaded from %s (pinned=%s)%s", name, adapter.path, pinned, note)
        return _reply(True, "", self.registry.loaded_adapters())

    async def _reload(self, name: str) -> None:
        """SGLang's implicit reload of a name unloaded since: from its path again (tensors cannot be)."""
        previous = self.registry.ever_loaded(name)
        if previous is None:
            raise RequestError(
                f"Got LoRA adapter that has never been loaded: {name}\n"
                f"All loaded adapters: dict_keys({self.registry.ever_loaded_names()!r})."
            )
        logger.info("Reloading evicted adapter: %s", name)
        async with self._update_lock:
            if self.registry.is_loaded(name):
                return
            reply, _status = await self._load(
                name, previous.pinned, lambda: self._from_path(name, previous.path, previous.pinned)
            )
        message = reply["error_message"] or ""
        if not reply["success"] and "already loaded" not in message:
            raise RequestError(f"Failed to implicitly load LoRA adapter {name}: {message}")

    def _from_path(self, name: str, path: str, pinned: bool, *, replacing: bool = False) -> LoraAdapter:
        raw, added = read_config(path)
        config = self._checked_config(name, raw, added, pinned, replacing=replacing)
        return self._adapter(name, path, pinned, config, read_tensors(path))

    def _from_tensors(self, values: dict[str, Any]) -> LoraAdapter:
        entries = values["serialized_named_tensors"]
        if not entries or not isinstance(entries[0], str | bytes):
            raise AdapterError("serialized_named_tensors must be a non-empty list of base64 strings")
        tensors = sglang_wire.decode_lora_tensors(entries[0], values["load_format"])  # TP rank 0's copy
        if values["expected_checksums"] is not None:
            _check_sums(tensors, values["expected_checksums"])
        name, pinned = values["lora_name"], values["pinned"]
        config = self._checked_config(name, values["config_dict"], values["added_tokens_config"], pinned)
        return self._adapter(name, TENSOR_PATH, pinned, config, tensors)

    def _checked_config(
        self, name: str, raw: Any, added: Any, pinned: bool, *, replacing: bool = False
    ) -> AdapterConfig:
        assert self.engine.lora is not None and self.engine.options.lora is not None
        config = parse_config(raw, added if isinstance(added, dict) else None, self.engine.vocab_size)
        loaded = set(self.registry.loaded_adapters()) - ({name} if replacing else set())
        check_config(
            config,
            name=name,
            options=self.engine.options.lora,
            targets=self.engine.lora.sites.targets,
            loaded_names=loaded,
            pinned=pinned,
            pinned_count=self.registry.pinned_count(),
        )
        return config

    def _adapter(
        self, name: str, path: str, pinned: bool, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
    ) -> LoraAdapter:
        assert self.engine.lora is not None
        dtype = next(self.engine.model.parameters()).dtype
        factors = build_factors(
            tensors, config, self.engine.lora.sites, dtype=dtype, device=self.engine.device
        )
        return LoraAdapter(name=name, path=path, pinned=pinned, scaling=config.scaling, factors=factors)


def _reply(success: bool, message: str | None, loaded: dict[str, str] | None) -> tuple[dict[str, Any], int]:
    return update_output(success, message, loaded), 200 if success else 400


def _check_sums(tensors: Mapping[str, torch.Tensor], expected: Any) -> None:
    """SGLang's ``expected_checksums``: sha256 of each tensor's raw bytes; any difference fails the load."""
    if not isinstance(expected, dict):
        raise AdapterError("expected_checksums must be an object {name: sha256 hex}")
    mismatch, missing = [], []
    for name, want in expected.items():
        if name not in tensors:
            missing.append(name)
            continue
        data = tensors[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != want:
            mismatch.append(name)
    extra = [name for name in tensors if name not in expected]
    if mismatch or missing or extra:
        raise AdapterError(
            f"[LORA-CHECK] rank0 adapter sync MISMATCH of {len(expected)} expected: {len(mismatch)} value-diff "
            f"{mismatch[:5]}, {len(missing)} missing {missing[:5]}, {len(extra)} extra {extra[:5]}"
        )
