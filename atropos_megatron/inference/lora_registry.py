"""Which adapters are loaded, under which name, and which requests hold them (SGLang's LoRARegistry).

A request takes its adapters when it is admitted (:meth:`LoraRegistry.acquire`) and gives them back
when its samples are finished, aborted included (:meth:`release`); an unload removes the name at once
(new requests no longer find it) and then waits until no admitted request holds the adapter, exactly
the two phases of SGLang's ``unregister`` + ``wait_for_unload``. Names ever loaded are remembered, as
SGLang's ``lora_ref_cache`` remembers them for its implicit reload. Thread-safe: the event loop and
the generation worker both call in. No loading, no HTTP here.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence

from atropos_megatron.inference.lora_adapters import AdapterError, LoraAdapter

UNUSED_POLL_S = 1.0  # how often a waiting unload re-checks that the server is not closing


class LoraRegistry:
    """Loaded adapters by name (least recently used first, as SGLang orders /v1/models) and their users."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._by_name: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._ever: dict[str, LoraAdapter] = {}  # name -> last adapter loaded under it, in load order
        self._cache_names: dict[str, None] = {}  # names in first-load order (SGLang's lora_ref_cache keys)
        self._users: Counter[str] = Counter()  # lora_id -> admitted requests holding it
        self._closed = False

    def loaded_adapters(self) -> dict[str, str]:
        """``{name: lora_path}`` in load order: the ``loaded_adapters`` field of SGLang's replies."""
        with self._cond:
            ordered = sorted(self._by_name.values(), key=lambda a: self._load_index(a))
            return {adapter.name: adapter.path for adapter in ordered}

    def adapters(self) -> list[LoraAdapter]:
        """Loaded adapters, least recently used first."""
        with self._cond:
            return list(self._by_name.values())

    def pinned_count(self) -> int:
        with self._cond:
            return sum(adapter.pinned for adapter in self._by_name.values())

    def is_loaded(self, name: str) -> bool:
        with self._cond:
            return name in self._by_name

    def ever_loaded(self, name: str) -> LoraAdapter | None:
        """The last adapter loaded under ``name``, even if unloaded since (SGLang's lora_ref_cache)."""
        with self._cond:
            return self._ever.get(name)

    def ever_loaded_names(self) -> list[str]:
        with self._cond:
            return list(self._cache_names)

    def add(self, adapter: LoraAdapter, *, replace: bool = False) -> None:
        """Register ``adapter`` under its name; ``replace``: a loaded adapter of that name gives way
        (vLLM's ``load_inplace``), and the requests holding it keep it until they finish."""
        with self._cond:
            if adapter.name in self._by_name and not replace:
                raise AdapterError(
                    f"LoRA with name {adapter.name} already exists. Loaded LoRAs: {_odict_keys(self._by_name)}"
                )
            self._ever.pop(adapter.name, None)  # re-inserted last: load order
            self._ever[adapter.name] = adapter
            self._cache_names.setdefault(adapter.name, None)
            self._by_name.pop(adapter.name, None)
            self._by_name[adapter.name] = adapter

    def remove(self, name: str) -> LoraAdapter:
        """Unregister ``name`` (new requests no longer get it); its holders keep it until they finish."""
        with self._cond:
            adapter = self._by_name.pop(name, None)
            if adapter is None:
                raise AdapterError(
                    f"LoRA with name {name} does not exist. Loaded LoRAs: {_odict_keys(self._by_name)}"
                )
            return adapter

    def acquire(self, names: Sequence[str | None]) -> list[LoraAdapter | None]:
        """One adapter per entry (None: the base model), each held until :meth:`release`."""
        with self._cond:
            adapters: list[LoraAdapter | None] = []
            for name in names:
                if name is None:
                    adapters.append(None)
                    continue
                adapter = self._by_name.get(name)
                if adapter is None:
                    raise AdapterError(
                        f"The following requested LoRA adapters are not loaded: {name}\n"
                        f"Loaded adapters: {_odict_keys(self._by_name)}."
                    )
                self._by_name.move_to_end(name)
                adapters.append(adapter)
            for adapter in adapters:
                if adapter is not None:
                    self._users[adapter.lora_id] += 1
            return adapters

    def release(self, adapter: LoraAdapter | None) -> None:
        if adapter is None:
            return
        with self._cond:
            self._users[adapter.lora_id] -= 1
            if self._users[adapter.lora_id] <= 0:
                del self._users[adapter.lora_id]
                self._cond.notify_all()

    def wait_unused(self, adapter: LoraAdapter) -> None:
        """Block until no admitted request holds ``adapter`` (or the server closes)."""
        with self._cond:
            while self._users[adapter.lora_id] > 0 and not self._closed:
                self._cond.wait(UNUSED_POLL_S)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _load_index(self, adapter: LoraAdapter) -> int:
        return list(self._ever).index(adapter.name)


def _odict_keys(mapping: OrderedDict) -> str:
    """How SGLang's messages print its registry's names (``odict_keys(['a', 'b'])``)."""
    return f"odict_keys({list(mapping)!r})"
