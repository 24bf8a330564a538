"""Where HF PEFT's LoRA adapters sit on a Megatron-Core decoder layer, and how each splits over TP.

Canonical LoRA: one adapter per HF projection (``A`` ``[r, in]``, ``B`` ``[out, r]``), named as PEFT
names it, also where Megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``. This
module is the pure layout knowledge (names, shapes, which factor TP splits and along which dimension);
the modules that compute with the adapters are ``trainer/lora.py``, and moving adapters in and out by
PEFT name is ``weights/lora_state.py``. The fused row order itself comes from ``hf_mapping`` (one
definition for base weights and adapters: a LoRA that ignores the GQA interleave trains a different
model than the one served, Megatron-Bridge PR #1818).

Each factor splits the way the base weight does, so the LoRA delta lands on the base's output rows:

- column-parallel (``linear_qkv``, ``linear_fc1``): a TP rank computes some output rows of each
  projection (rank t: q, k and v of query groups ``t*ng/tp ..``, the t-th chunk of gate and of up
  rows), so ``B``'s rows split into contiguous chunks per projection and ``A`` is whole on every rank;
- row-parallel (``linear_proj``, ``linear_fc2``): a rank holds a contiguous chunk of input columns,
  so ``A``'s columns split and ``B`` is whole.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.hf_mapping import linear_projections

PEFT_PREFIX = "base_model.model."
ADAPTER_MODULE = "lora"
"""Child module of a Megatron linear layer that holds its adapters (``linear_qkv.lora.q_proj...``)."""
Factor = Literal["A", "B"]
FACTORS: tuple[Factor, ...] = ("A", "B")

_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_PEFT_LAYER = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LoraSite:
    """One Megatron linear layer of a decoder layer and the HF projections it computes."""

    linear: str
    """Module path relative to the decoder layer, e.g. ``self_attention.linear_qkv``."""
    parallel: Literal["column", "row"]
    """Megatron's split of the base weight: output rows (column) or input columns (row)."""
    projections: tuple[str, ...]
    """HF modules relative to the layer, in the linear's output-row order (``self_attn.q_proj``, ...)."""

    @property
    def keys(self) -> tuple[str, ...]:
        """The projections' short names (``q_proj``): ``lora.target_modules`` entries and module keys."""
        return tuple(projection_key(p) for p in self.projections)

    def split_dim(self, factor: Factor) -> int | None:
        """Dimension of ``factor`` that TP splits (None: whole on every TP rank)."""
        if self.parallel == "column":
            return 0 if factor == "B" else None
        return 1 if factor == "A" else None


SITES: tuple[LoraSite, ...] = tuple(
    LoraSite(linear, parallel, linear_projections(linear))
    for linear, parallel in (
        ("self_attention.linear_qkv", "column"),
        ("self_attention.linear_proj", "row"),
        ("mlp.linear_fc1", "column"),
        ("mlp.linear_fc2", "row"),
    )
)


def projection_key(hf_projection: str) -> str:
    """``self_attn.q_proj`` -> ``q_proj``."""
    return hf_projection.rpartition(".")[2]


def sites_for(target_modules: list[str]) -> list[tuple[LoraSite, tuple[str, ...]]]:
    """The sites with at least one targeted projection, each with its targeted keys in row order."""
    chosen = []
    for site in SITES:
        keys = tuple(key for key in site.keys if key in target_modules)
        if keys:
            chosen.append((site, keys))
    return chosen


def projection_features(key: str, model: ModelConfig) -> tuple[int, int]:
    """``(in_features, out_features)`` of the HF projection ``key`` (e.g. ``k_proj``) at TP=1."""
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    hidden, ffn = model.hidden_size, model.ffn_hidden_size
    features = {
        "q_proj": (hidden, model.num_attention_heads * head_dim),
        "k_proj": (hidden, model.query_groups * head_dim),
        "v_proj": (hidden, model.query_groups * head_dim),
        "o_proj": (model.num_attention_heads * head_dim, hidden),
        "gate_proj": (hidden, ffn),
        "up_proj": (hidden, ffn),
        "down_proj": (ffn, hidden),
    }
    return features[key]


def factor_shape(site: LoraSite, key: str, factor: Factor, *, rank: int, model: ModelConfig, tp: int):
    """Shape of ``key``'s ``factor`` as one TP rank holds it (``A``: ``[r, in]``, ``B``: ``[out, r]``)."""
    in_features, out_features = projection_features(key, model)
    shape = [rank, in_features] if factor == "A" else [out_features, rank]
    dim = site.split_dim(factor)
    if dim is not None:
        if shape[dim] % tp:
            raise ValueError(
                f"{key}.lora_{factor}: dimension {dim} ({shape[dim]}) does not split over TP={tp}"
            )
        shape[dim] //= tp
    return tuple(shape)


def rank_model(model: ModelConfig, tp: int) -> ModelConfig:
    """``model`` with heads and query groups divided by ``tp``: what one TP rank's ``linear_qkv`` holds.

    Lets ``hf_mapping.fuse_rows`` build one rank's fused rows from that rank's rows of each projection.
    """
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    return dataclasses.replace(
        model,
        num_attention_heads=model.num_attention_heads // tp,
        num_query_groups=model.query_groups // tp,
        head_dim=head_dim,
        ffn_hidden_size=model.ffn_hidden_size // tp,
    )


def megatron_adapter_name(layer: int, site: LoraSite, key: str, factor: Factor) -> str:
    """Global Megatron name of an adapter factor (``decoder.layers.0.self_attention.linear_qkv.lora...``)."""
    return f"decoder.layers.{layer}.{site.linear}.{ADAPTER_MODULE}.{key}.lora_{factor}.weight"


def peft_adapter_name(layer: int, hf_projection: str, factor: Factor) -> str:
    """PEFT's name (``get_peft_model_state_dict``) of an adapter factor."""
    return f"{PEFT_PREFIX}model.layers.{layer}.{hf_projection}.lora_{factor}.weight"


_MCORE_TO_PEFT_SUFFIX = {
    f"{site.linear}.{ADAPTER_MODULE}.{projection_key(p)}.lora_{f}.weight": f"{p}.lora_{f}.weight"
    for site in SITES
    for p in site.projections
    for f in FACTORS
}
_PEFT_TO_MCORE_SUFFIX = {peft: mcore for mcore, peft in _MCORE_TO_PEFT_SUFFIX.items()}


def is_adapter_name(megatron_name: str) -> bool:
    """Whether a global Megatron parameter name is a LoRA factor."""
    match = _MCORE_LAYER.match(megatron_name)
    return bool(match) and match.group(2) in _MCORE_TO_PEFT_SUFFIX


def megatron_to_peft_name(megatron_name: str) -> str:
    """PEFT name of a global Megatron adapter name.

    Raises:
        ValueError: not an adapter name.
    """
    match = _MCORE_LAYER.match(megatron_name)
    suffix = _MCORE_TO_PEFT_SUFFIX.get(match.group(2)) if match else None
    if suffix is None:
        raise ValueError(f"{megatron_name!r} is not a LoRA adapter parameter")
    return f"{PEFT_PREFIX}model.layers.{match.group(1)}.{suffix}"


def peft_to_megatron_name(peft_name: str) -> str:
    """Global Megatron name of a PEFT adapter name (the inverse of :func:`megatron_to_peft_name`).

    Raises:
        ValueError: not a LoRA factor of a projection we support (PEFT module names, which carry the
            adapter name as in ``lora_A.default.weight``, are not state-dict names).
    """
    match = _PEFT_LAYER.match(peft_name)
    suffix = _PEFT_TO_MCORE_SUFFIX.get(match.group(2)) if match else None
    if suffix is None:
        raise ValueError(
            f"{peft_name!r} is not a PEFT LoRA factor of a supported projection "
            f"(expected e.g. {peft_adapter_name(0, 'self_attn.q_proj', 'A')!r})"
        )
    return f"decoder.layers.{match.group(1)}.{suffix}"
