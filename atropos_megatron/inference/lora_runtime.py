"""LoRA on the served HF model: forward hooks that add each row's adapter, ``x A^T B^T * scaling``.

Hooks, not PEFT's module swapping: parameter names stay the HF names, so the weight-update routes keep
working, and an adapter is always applied on top of the *current* base weights (SGLang keeps base and
adapters apart the same way). Each hooked module (a linear projection, the input embedding or the LM
head) adds, for every adapter in the running batch, ``scaling * B(A(x))`` to the rows that use it, in
PEFT's order of operations, so a row equals ``peft.PeftModel`` with that adapter. Rows without an
adapter are the base model. The worker thread sets the rows' adapters for one batch with
:meth:`LoraRuntime.rows`; nothing here knows names, HTTP or loading.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from atropos_megatron.inference.lora_options import (
    ALL_MODULES,
    EMBEDDING_MODULES,
    LoraOptionsError,
    normalize_target_modules,
)

if TYPE_CHECKING:
    from atropos_megatron.inference.lora_adapters import LoraAdapter

LAYER_ID = re.compile(r"layers\.(\d+)\.")  # SGLang's get_layer_id


@dataclass(frozen=True)
class Site:
    """One module LoRA can wrap. For the embedding, ``in_features`` is the vocabulary size."""

    path: str  # module name in the HF model
    module: torch.nn.Module
    pool_name: (
        str  # SGLang's normalised name: qkv_proj, o_proj, gate_up_proj, down_proj, embed_tokens, lm_head
    )
    in_features: int
    out_features: int

    @property
    def is_embedding(self) -> bool:
        return self.pool_name == "embed_tokens"


@dataclass(frozen=True)
class ModelSites:
    """The hooked modules: per decoder layer by HF leaf name (``q_proj``...), plus embeddings."""

    targets: frozenset[str]  # the server's resolved target modules (pool names)
    layers: dict[int, dict[str, Site]]
    embeddings: dict[str, Site]  # "embed_tokens" / "lm_head", when targeted

    def all_sites(self) -> list[Site]:
        return [s for layer in self.layers.values() for s in layer.values()] + list(self.embeddings.values())


def find_sites(model: torch.nn.Module, target_modules: Sequence[str]) -> ModelSites:
    """Resolve ``--lora-target-modules`` against ``model`` (``all``: its linear modules + embeddings)."""
    linear: dict[int, dict[str, Site]] = {}
    for path, module in model.named_modules():
        match = LAYER_ID.search(path)
        if match is None or not isinstance(module, torch.nn.Linear):
            continue
        leaf = path.rsplit(".", 1)[-1]
        pool = next(iter(normalize_target_modules([leaf])))
        site = Site(path, module, pool, module.in_features, module.out_features)
        linear.setdefault(int(match.group(1)), {})[leaf] = site
    available = {site.pool_name for layer in linear.values() for site in layer.values()}
    requested = normalize_target_modules(list(target_modules))
    targets = available | set(EMBEDDING_MODULES) if ALL_MODULES in requested else set(requested)
    missing = sorted(targets - available - set(EMBEDDING_MODULES))
    if missing:
        raise LoraOptionsError(
            f"--lora-target-modules {missing}: this model has no such module (it has {sorted(available)} "
            f"and {list(EMBEDDING_MODULES)})"
        )
    embeddings: dict[str, Site] = {}
    for pool, module in (
        ("embed_tokens", model.get_input_embeddings()),
        ("lm_head", model.get_output_embeddings()),
    ):
        if pool in targets and module is not None:
            path = next(name for name, m in model.named_modules() if m is module)
            if pool == "embed_tokens":
                embeddings[pool] = Site(path, module, pool, module.num_embeddings, module.embedding_dim)
            else:
                embeddings[pool] = Site(path, module, pool, module.in_features, module.out_features)
    layers = {
        index: {leaf: site for leaf, site in sites.items() if site.pool_name in targets}
        for index, sites in linear.items()
    }
    return ModelSites(frozenset(targets), layers, embeddings)


class LoraRuntime:
    """Hooks on every targeted module; :meth:`rows` says which adapter each batch row uses."""

    def __init__(self, model: torch.nn.Module, target_modules: Sequence[str]) -> None:
        self.sites = find_sites(model, target_modules)
        self._device = next(model.parameters()).device
        self._groups: tuple[tuple[LoraAdapter, torch.Tensor | None], ...] = ()
        self._handles = [
            site.module.register_forward_hook(self._hook_for(site)) for site in self.sites.all_sites()
        ]

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[LoraAdapter | None]) -> Iterator[None]:
        """Within this block, batch row ``i`` runs ``adapters[i]`` (None: the base model)."""
        groups: dict[int, tuple[LoraAdapter, list[int]]] = {}
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(row)
        self._groups = tuple(
            (adapter, None if len(rows) == len(adapters) else torch.tensor(rows, device=self._device))
            for adapter, rows in groups.values()
        )
        try:
            yield
        finally:
            self._groups = ()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, site: Site):
        def hook(_module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            groups = self._groups
            if not groups:
                return None
            x = inputs[0]
            for adapter, rows in groups:
                factors = adapter.factors.get(site.path)
                if factors is None:
                    continue
                a, b = factors
                part = x if rows is None else x.index_select(0, rows)
                if site.is_embedding:  # PEFT's Embedding: embed(x, A^T) @ B^T
                    delta = (F.embedding(part, a.T) @ b.T) * adapter.scaling
                else:  # PEFT's Linear: lora_B(lora_A(x)) * scaling
                    delta = F.linear(F.linear(part.to(a.dtype), a), b) * adapter.scaling
                delta = delta.to(output.dtype)
                output = output + delta if rows is None else output.index_add(0, rows, delta)
            return output

        return hook
