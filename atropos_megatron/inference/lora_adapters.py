"""PEFT LoRA adapters as SGLang 0.5.23 reads them: the config checks, the key rules, the factors.

An adapter is a PEFT ``adapter_config.json`` (as a dict) plus tensors named like PEFT saves them
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). What is checked, and the error
texts, follow SGLang (``lora/lora_config.py``, ``lora/lora_manager.py::validate_new_adapter``,
``lora/mem_pool.py::can_support``, ``lora/lora.py``), in SGLang's order. Key rules are SGLang's too:
the layer is ``layers.<i>.``, the module is the longest known module name inside the key, ``lora_A``
/ ``lora_B`` say which factor; fused ``qkv_proj`` / ``gate_up_proj`` keys share one A across their
slices and stack B in ``[q; k; v]`` / ``[gate; up]`` rows. The scale is ``lora_alpha / r``:
SGLang reads neither ``use_rslora`` nor ``rank_pattern``/``alpha_pattern``, and neither does this.

Stricter than SGLang where SGLang would serve something else than PEFT without a word: shapes are
checked at load (SGLang fails at first use), and q/k/v or gate/up sets that SGLang mis-stacks
(q_proj without v_proj fails there; k_proj or v_proj without q_proj, or up_proj without gate_proj, is
dropped) are refused with a message saying so. Keys that match no targeted module are logged and
ignored, as SGLang does without ``--lora-strict-loading``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atropos_megatron.inference.lora_options import ALL_MODULES, LoraOptions, normalize_target_modules
from atropos_megatron.inference.lora_runtime import LAYER_ID, ModelSites

logger = logging.getLogger(__name__)
TENSOR_PATH = "__tensor__"  # SGLang's lora_path for adapters loaded from tensors
CONFIG_FILE, WEIGHTS_FILE, ADDED_TOKENS_FILE = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "added_tokens.json",
)
_LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                  "gate_up_proj")  # fmt: skip
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class AdapterError(ValueError):
    """An adapter SGLang would refuse; the message is SGLang's where SGLang has one."""


@dataclass(frozen=True, kw_only=True, eq=False)  # identity: two loads of one directory are two adapters
class LoraAdapter:
    """One loaded adapter: factors by hooked module path, ``(A [r, in], B [out, r])``."""

    name: str
    path: str  # the directory it came from, or "__tensor__"
    pinned: bool
    scaling: float
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    lora_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # a new one per load, as SGLang


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The fields SGLang reads from ``adapter_config.json``."""

    raw: Mapping[str, Any]
    r: int
    lora_alpha: float
    target_modules: Any  # a list, or "all"/"all-linear"
    use_dora: bool
    added_tokens: int  # added tokens whose ids lie beyond the base vocabulary

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def parse_config(raw: Any, added_tokens: Mapping[str, int] | None, vocab_size: int) -> AdapterConfig:
    """Read ``raw`` as SGLang's LoRAConfig does (a missing key fails naming it)."""
    if not isinstance(raw, dict):
        raise AdapterError(f"the adapter config must be a JSON object, got {type(raw).__name__}")
    for key in ("target_modules", "r", "lora_alpha"):
        if key not in raw:
            raise AdapterError(f"the adapter config has no {key!r}")
    r, alpha = raw["r"], raw["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"the adapter config's 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise AdapterError(f"the adapter config's 'lora_alpha' must be a number, got {alpha!r}")
    extra = [
        token
        for token, index in (added_tokens or {}).items()
        if isinstance(index, int) and index >= vocab_size
    ]
    return AdapterConfig(raw=raw, r=r, lora_alpha=float(alpha), target_modules=raw["target_modules"],
                         use_dora=bool(raw.get("use_dora", False)), added_tokens=len(extra))  # fmt: skip


def check_config(
    config: AdapterConfig, *, name: str, options: LoraOptions, targets: frozenset[str],
    loaded_names: set[str], pinned: bool, pinned_count: int,
) -> None:  # fmt: skip
    """SGLang's validate_new_adapter + can_support + the peft_type assert, in that order."""
    if config.added_tokens:
        raise AdapterError(
            f"Failed to load {name} because LoRA serving currently doesn't support adapters that add tokens "
            "to the vocabulary"
        )
    if config.use_dora:
        raise AdapterError(
            f"Failed to load {name} because LoRA serving currently doesn't support DoRA adapters"
        )
    if name in loaded_names:
        raise AdapterError(f"Failed to load LoRA adapter {name} because it is already loaded")
    try:
        wanted = normalize_target_modules(config.target_modules)
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
    if config.r > options.max_lora_rank or not (ALL_MODULES in wanted or wanted <= targets):
        raise AdapterError(
            f"LoRA adapter {name} with rank {config.r} is incompatible with the current LoRA memory pool "
            "configuration. Please ensure that the LoRA adapter's rank is within the configured "
            "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`."
        )
    if pinned and pinned_count >= options.max_loras_per_batch - 1:
        raise AdapterError(
            f"Failed to load LoRA adapter {name} as a pinned adapter. It is not allowed to pin all slots in the "
            "LoRA memory pool to avoid starvation for unpinned adapters and base models. Please increase your "
            "`--max-loras-per-batch` or load it as unpinned LoRA adapters."
        )
    peft_type = config.raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.lower() != "lora":
        # SGLang asserts this without a message: the client gets error_message "" (or "'peft_type'").
        logger.warning("adapter %s refused: peft_type is %r, not 'LORA'", name, peft_type)
        raise AdapterError("'peft_type'" if "peft_type" not in config.raw else "")


def read_config(directory: str) -> tuple[dict, dict | None]:
    """``adapter_config.json`` and the optional ``added_tokens.json`` of a PEFT directory on this machine."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(
            f"lora_path {directory!r} is not a directory on the server (the reference server does not "
            "download adapters from the Hugging Face hub)"
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(str(exc)) from exc
    added = None
    if (path / ADDED_TOKENS_FILE).exists():
        try:
            added = json.loads((path / ADDED_TOKENS_FILE).read_text())
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable %s in %s (as SGLang does)", ADDED_TOKENS_FILE, directory)
    return config, added


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors (safetensors only: SGLang's ``.bin`` fallback would mean unpickling)."""
    from safetensors.torch import load_file

    file = Path(directory) / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterError(
            f"no {WEIGHTS_FILE} in {directory!r} (the reference server reads safetensors only)"
        )
    return load_file(str(file))


def build_factors(
    tensors: Mapping[str, torch.Tensor], config: AdapterConfig, sites: ModelSites, *, dtype: torch.dtype,
    device: torch.device,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Match keys to hooked modules and check every factor's shape; copies, so the input may be freed."""
    wanted = normalize_target_modules(config.target_modules)
    per_layer: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    embedding_parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored: list[str] = []
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{key}: not a tensor")
        key = key.replace("unembed_tokens", "lm_head")
        match = LAYER_ID.search(key)
        if match is not None:
            module = max((m for m in _LAYER_MODULES if m in key), key=len, default=None)
            if module is None:
                ignored.append(key)
                continue
            part = _factor_of(key, embedding=False)
            if part is None:
                ignored.append(key)
                continue
            slot = per_layer.setdefault(int(match.group(1)), {}).setdefault(module, {})
            if part in slot:
                raise AdapterError(f"{key}: a second lora_{part} for layer {match.group(1)} {module}")
            slot[part] = tensor
        elif "embed_tokens" in key or "lm_head" in key:
            pool = "embed_tokens" if "embed_tokens" in key else "lm_head"
            part = _factor_of(key, embedding=pool == "embed_tokens")
            if part is None:  # e.g. the base_layer.weight PEFT saves beside tied embeddings
                ignored.append(key)
            elif ALL_MODULES in wanted or pool in wanted:
                embedding_parts.setdefault(pool, {})[part] = tensor
        elif "input_embeddings" in key or "output_embeddings" in key:
            raise AdapterError(f"{key}: adapters that add tokens to the vocabulary are not supported")
        else:
            ignored.append(key)
    for layer, modules in sorted(per_layer.items()):
        _check_stacking(layer, modules)
        for module, parts in modules.items():
            ignored += _layer_factors(layer, module, parts, config.r, sites, factors)
    for pool, parts in embedding_parts.items():
        site = sites.embeddings.get(pool)
        if site is None:
            ignored += [f"{pool}.lora_{p}" for p in parts]
            continue
        factors[site.path] = _checked(pool, parts, config.r, site.in_features, site.out_features)
    if ignored:
        logger.warning(
            "%d adapter tensor(s) match no module in --lora-target-modules %s and are ignored, as SGLang "
            "does: %s", len(ignored), sorted(sites.targets), sorted(ignored)[:8],
        )  # fmt: skip
    return {
        path: (a.to(device, dtype, copy=True), b.to(device, dtype, copy=True))
        for path, (a, b) in factors.items()
    }


def _factor_of(key: str, *, embedding: bool) -> str | None:
    """Which factor ``key`` holds, "A" or "B"; None for no LoRA factor (ignored like unmatched keys)."""
    if "lora_A" in key or (embedding and "lora_embedding_A" in key):
        return "A"
    if "lora_B" in key or (embedding and "lora_embedding_B" in key):
        return "B"
    return None


def _check_stacking(layer: int, modules: Mapping[str, Any]) -> None:
    """Refuse the q/k/v and gate/up sets SGLang would mis-stack (it needs q_proj and v_proj, gate_proj)."""
    qkv = {"q_proj", "k_proj", "v_proj"} & set(modules)
    if qkv and not {"q_proj", "v_proj"} <= qkv:
        raise AdapterError(
            f"layer {layer}: LoRA on {sorted(qkv)} only; SGLang 0.5.23 stacks q/k/v into one qkv_proj "
            "adapter and needs q_proj and v_proj (it fails without v_proj and drops k/v without q_proj)"
        )
    split_gate_up = {"gate_proj", "up_proj"} & set(modules)
    if (qkv and "qkv_proj" in modules) or (split_gate_up and "gate_up_proj" in modules):
        raise AdapterError(f"layer {layer}: both split and fused (qkv_proj / gate_up_proj) keys")
    if "up_proj" in modules and "gate_proj" not in modules:
        raise AdapterError(
            f"layer {layer}: LoRA on up_proj without gate_proj, which SGLang 0.5.23 drops silently"
        )


def _layer_factors(
    layer: int, module: str, parts: dict[str, torch.Tensor], r: int, sites: ModelSites,
    out: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> list[str]:  # fmt: skip
    """Put one module's factors on its site(s); returns what matched no hooked module."""
    hooked = sites.layers.get(layer, {})
    label = f"layers.{layer}.{module}"
    if module in _FUSED:  # one A for every slice, B stacked in slice order
        found = [hooked[leaf] for leaf in _FUSED[module] if leaf in hooked]
        if len(found) != len(_FUSED[module]):
            return [label]
        sizes = [site.out_features for site in found]
        a, b = _checked(label, parts, r, found[0].in_features, sum(sizes))
        for fused_site, b_slice in zip(found, b.split(sizes), strict=True):
            out[fused_site.path] = (a, b_slice)
        return []
    site = hooked.get(module)
    if site is None:
        return [label]
    out[site.path] = _checked(label, parts, r, site.in_features, site.out_features)
    return []


def _checked(
    label: str, parts: Mapping[str, torch.Tensor], r: int, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(parts) != {"A", "B"}:
        raise AdapterError(
            f"{label}: has lora_{'A' if 'A' in parts else 'B'} but no lora_{'B' if 'A' in parts else 'A'}"
        )
    a, b = parts["A"], parts["B"]
    if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
        raise AdapterError(
            f"{label}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit r={r} and the model's "
            f"module (expected lora_A [{r}, {in_features}], lora_B [{out_features}, {r}])"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{label}: factors must be floating point, got {a.dtype} and {b.dtype}")
    return a, b
