"""HF PEFT LoRA adapter directories: read them (refusing what our adapters cannot be) and write them.

PEFT is the exchange format for adapters (``weights/lora_layout.py`` names and shapes ours after
it). A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with the names of
``get_peft_model_state_dict`` (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
Our adapters are plain LoRA on the seven decoder projections; an adapter that needs anything else
(DoRA, trained biases, extra saved modules, per-layer ranks, ...) would load into a different model,
so it is refused, naming the option.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atropos_megatron.config import LORA_TARGET_MODULES, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_PLAIN_LORA = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "exclude_modules": (None, []),
    "use_bdlora": (None, False),
}
"""PEFT options and the values under which an adapter is plain LoRA (as ours is)."""


class PeftAdapterError(ValueError):
    """The directory is not a PEFT LoRA adapter that our adapters can represent."""


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter as read from disk."""

    lora: LoraConfig
    """``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora`` and ``target_modules`` as our config."""
    tensors: dict[str, torch.Tensor]
    """PEFT state-dict name -> tensor (``A`` ``[r, in]``, ``B`` ``[out, r]``)."""
    base_model: str | None
    """``base_model_name_or_path``: what PEFT says the adapter was trained on (informational)."""


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory.

    Raises:
        FileNotFoundError: a file is missing.
        PeftAdapterError: not LoRA, an unsupported option (named), or target modules we have no
            adapters for.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist (a PEFT adapter directory has both files)")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    lora = lora_config_from_peft(config, source=str(path / ADAPTER_CONFIG))
    return PeftAdapter(
        lora=lora, tensors=load_file(path / ADAPTER_WEIGHTS), base_model=config.get("base_model_name_or_path")
    )


def lora_config_from_peft(config: dict[str, Any], *, source: str) -> LoraConfig:
    """Our :class:`LoraConfig` for a PEFT ``adapter_config.json`` dict (see :func:`read_peft_adapter`)."""
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise PeftAdapterError(
            f"{source}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported"
        )
    for option, plain in _PLAIN_LORA.items():
        if option in config and config[option] not in plain:
            raise PeftAdapterError(
                f"{source}: {option}={config[option]!r} is not supported (plain LoRA needs {plain[0]!r})"
            )
    targets = config.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output layer, i.e. all seven here
        targets = list(LORA_TARGET_MODULES)
    if isinstance(targets, list):
        # PEFT matches an entry as a module name's suffix and saves "all-linear" resolved to full
        # paths (model.layers.0.self_attn.q_proj); a layer without its adapter is caught on load.
        targets = sorted({str(entry).rpartition(".")[2] for entry in targets})
    if not isinstance(targets, list) or not set(targets) <= set(LORA_TARGET_MODULES):
        raise PeftAdapterError(
            f"{source}: target_modules={targets!r} is not supported; a list from {', '.join(LORA_TARGET_MODULES)}"
        )
    return LoraConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=[key for key in LORA_TARGET_MODULES if key in targets],
    )


def check_same_adapters(adapter: LoraConfig, configured: LoraConfig, *, source: str) -> None:
    """Refuse an adapter whose shapes or scale differ from ``model.lora``'s, naming the field."""
    pairs = (
        ("rank", "r", adapter.rank, configured.rank),
        ("alpha", "lora_alpha", adapter.alpha, configured.alpha),
        ("use_rslora", "use_rslora", adapter.use_rslora, configured.use_rslora),
        ("target_modules", "target_modules", set(adapter.target_modules), set(configured.target_modules)),
    )
    for ours, theirs, value, wanted in pairs:
        if value != wanted:
            shown = sorted(value) if isinstance(value, set) else value
            raise PeftAdapterError(
                f"{source} has {theirs}={shown!r}, but model.lora.{ours} is {getattr(configured, ours)!r}"
            )


def peft_config(lora: LoraConfig, *, base_model: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of plain LoRA as PEFT writes it, trimmed to what loaders read: what
    ``PeftModel.from_pretrained`` needs, and SGLang's ``config_dict`` for adapters sent as tensors."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": list(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft_adapter(
    path: str | Path, lora: LoraConfig, tensors: dict[str, torch.Tensor], *, base_model: str | None = None
) -> None:
    """Write ``tensors`` (PEFT names) and their ``adapter_config.json`` into the directory ``path``.

    PEFT, SGLang's and vLLM's adapter loaders all read these two files.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = peft_config(lora, base_model=base_model)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        path / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
