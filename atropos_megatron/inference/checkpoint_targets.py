"""Where each HF checkpoint tensor lives in the served transformers model: a parameter, or a slice of one.

Weight updates name tensors as checkpoints do (SGLang's ``load_weights`` takes on-disk names). For dense
models those are the in-memory parameter names. transformers 5 holds MoE experts fused instead
(``mlp.experts.gate_up_proj`` [E, 2I, H], each expert's ``[gate; up]``, and ``mlp.experts.down_proj``
[E, H, I]) and converts names at load and save time. Its conversion ops work only on a layer's full
set of experts (stack, then concatenate; the reverse returns copies), so they cannot place one tensor.
This module maps each per-expert name to a writable view of its slice of the fused parameter, so a
request holding only some experts (or only ``gate_proj`` of one expert) updates exactly those rows, as
SGLang's ``FusedMoE.weight_loader(param, w, name, shard_id=, expert_id=)`` does.

The layouts follow transformers 5.25's ``conversion_mapping.py`` (``qwen2_moe``, which ``qwen3_moe``
uses, and ``mixtral``). ``tests/integration/test_reference_server_moe.py`` checks every view against
``revert_weight_conversion`` (what ``save_pretrained`` writes). In-memory names that are not checkpoint
names (the fused tensors, Mixtral's ``mlp.gate.weight``) are refused like any unknown name: SGLang
skips them, so a client that sent them would change nothing on a real server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """One MoE family's checkpoint names. In memory the block is always ``mlp`` with fused experts."""

    block: str  # the MoE block's checkpoint name; it holds the router ``gate.weight`` and ``experts``
    gate: str  # per-expert leaf names; gate and up are concatenated in this order into gate_up_proj
    up: str
    down: str


EXPERT_LAYOUTS = {
    "qwen3_moe": ExpertLayout(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    "mixtral": ExpertLayout(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
}
_IN_MEMORY = re.compile(  # transformers' names of an MoE block's router and fused experts
    r"(?P<layer>model\.layers\.\d+)\.mlp\.(?:experts\.(?P<fused>gate_up_proj|down_proj)|gate\.weight)"
)


class CheckpointTargets:
    """The served model's tensors by checkpoint name; expert tensors resolve to views of fused ones."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = _in_memory_targets(model)
        self._layout = EXPERT_LAYOUTS.get(getattr(model.config, "model_type", None))
        self._expert_name = None if self._layout is None else _expert_name_pattern(self._layout)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor an update of ``name`` writes into (a view for an expert), or None if unknown."""
        match = None if self._expert_name is None else self._expert_name.fullmatch(name)
        if match is not None:
            return self._expert_view(match)
        return None if self._in_memory_only(name) else self._params.get(name)

    def checkpoint_names(self, param_name: str) -> list[str]:
        """The checkpoint names that together hold in-memory parameter ``param_name``."""
        match = None if self._layout is None else _IN_MEMORY.fullmatch(param_name)
        if match is None:
            return [param_name]
        block = f"{match['layer']}.{self._layout.block}."
        if match["fused"] is None:
            return [block + "gate.weight"]
        leaves = (
            (self._layout.gate, self._layout.up) if match["fused"] == "gate_up_proj" else (self._layout.down,)
        )
        experts = range(self._params[param_name].shape[0])
        return [f"{block}experts.{e}.{leaf}.weight" for e in experts for leaf in leaves]

    def why_unknown(self, name: str) -> str:
        """What to tell a client whose ``name`` resolved to nothing ("" when "unknown" says it all)."""
        if self._in_memory_only(name):
            example = self.checkpoint_names(name)[0]
            return f"an in-memory transformers name; send checkpoint names like {example!r}"
        match = None if self._expert_name is None else self._expert_name.fullmatch(name)
        fused = None if match is None else self._params.get(f"{match['layer']}.mlp.experts.down_proj")
        if fused is not None and match["expert"] is not None:
            return f"the layer has experts 0..{fused.shape[0] - 1}"
        return ""

    def _in_memory_only(self, name: str) -> bool:
        """A fused expert tensor, or a router whose checkpoint block is not ``mlp`` (Mixtral)."""
        match = None if self._layout is None else _IN_MEMORY.fullmatch(name)
        return match is not None and (match["fused"] is not None or self._layout.block != "mlp")

    def _expert_view(self, match: re.Match[str]) -> torch.Tensor | None:
        layer, expert, leaf = match["layer"], match["expert"], match["leaf"]
        if expert is None:
            return self._params.get(f"{layer}.mlp.gate.weight")  # the router
        fused_name = "down_proj" if leaf == self._layout.down else "gate_up_proj"
        fused = self._params.get(f"{layer}.mlp.experts.{fused_name}")
        if fused is None or int(expert) >= fused.shape[0]:
            return None
        view = fused[int(expert)]
        if leaf == self._layout.down:
            return view
        half = view.shape[0] // 2
        return view[:half] if leaf == self._layout.gate else view[half:]


def _expert_name_pattern(layout: ExpertLayout) -> re.Pattern[str]:
    """``model.layers.N.<block>.experts.E.<leaf>.weight``, or ``model.layers.N.<block>.gate.weight``.

    Indices without leading zeros: SGLang matches ``experts.{E}.{leaf}.`` as text, so ``experts.03``
    would reach no expert there either.
    """
    leaves = "|".join(re.escape(leaf) for leaf in (layout.gate, layout.up, layout.down))
    return re.compile(
        rf"(?P<layer>model\.layers\.\d+)\.{re.escape(layout.block)}\."
        rf"(?:experts\.(?P<expert>0|[1-9]\d*)\.(?P<leaf>{leaves})\.weight|gate\.weight)"
    )


def _in_memory_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every updatable tensor by in-memory name; a tied ``lm_head.weight`` aliases the input embedding."""
    targets = dict(model.named_parameters())
    persistent = set(model.state_dict())
    targets.update({name: buf for name, buf in model.named_buffers() if name in persistent})
    if getattr(model.config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        if output is not None:
            targets.setdefault("lm_head.weight", output.weight)
    return targets
