"""SGLang's routed-experts output on the reference server: the experts each fed token was routed to.

SGLang 0.5.23 started with ``--enable-return-routed-experts`` records, for every token the model is
fed, the logical expert ids the router of every layer picked, and returns a finished request's
rows in ``meta_info["routed_experts"]`` when the request sets ``return_routed_experts``: base64 of
the little-endian int32 bytes of ``[prompt + completion tokens - 1, num_hidden_layers,
num_experts_per_tok]`` (``state_capturer/base.py: get_topk`` slices ``[start_len : seqlen - 1]``; the
last sampled token is never fed through the model, so it has no row). Dense layers (Qwen3-MoE's
``mlp_only_layers``) are never written and stay 0, because the host buffer is zeroed at start-up.
Without the server flag a request that asks gets no field at all.

Here forward hooks on transformers' router modules (``Qwen3MoeTopKRouter``, ``MixtralTopKRouter``,
which return ``(router_logits, scores, indices)``) record each forward pass's top-k indices;
``generation.py`` keeps a row's prompt positions from the prefill and one position per decode step
that fed one of its sampled tokens. The hooks only read: generation is unchanged with them.
"""

from __future__ import annotations

import base64
import importlib
from dataclasses import dataclass

import torch

ROUTERS: dict[str, tuple[str, str]] = {
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter"),
}
"""HF ``model_type`` -> the router class whose third output is the ``[tokens, top_k]`` expert ids."""


class RoutedExpertsError(ValueError):
    """The model cannot report routed experts (not a supported mixture-of-experts model)."""


@dataclass(frozen=True)
class RoutingSpec:
    """Where a model's routers are and the shape of one token's routing (``[num_layers, top_k]``)."""

    routers: dict[int, torch.nn.Module]
    """Decoder layer index -> its router; dense layers have none."""
    num_layers: int
    top_k: int


def routing_spec(model: torch.nn.Module) -> RoutingSpec:
    """The routers of an HF causal LM, by layer; RoutedExpertsError for a model without them."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROUTERS:
        raise RoutedExpertsError(
            f"--enable-return-routed-experts needs a mixture-of-experts model ({', '.join(ROUTERS)}); "
            f"this one is {model_type!r}"
        )
    module, name = ROUTERS[model_type]
    router_class = getattr(importlib.import_module(module), name)
    routers = {}
    for index, layer in enumerate(model.model.layers):
        found = [m for m in layer.modules() if isinstance(m, router_class)]
        if len(found) > 1:
            raise RoutedExpertsError(
                f"decoder layer {index} has {len(found)} {name} modules, expected 0 or 1"
            )
        if found:
            routers[index] = found[0]
    return RoutingSpec(routers, int(model.config.num_hidden_layers), int(model.config.num_experts_per_tok))


class RoutingRecorder:
    """Forward hooks on every router while the context is open; :meth:`take` returns one pass's ids."""

    def __init__(self, spec: RoutingSpec) -> None:
        self.spec = spec
        self._step: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for layer, router in self.spec.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def record(module, args, output) -> None:
            self._step[layer] = output[2].detach()  # (router_logits, scores, indices)

        return record

    def take(self, batch: int, seq: int) -> torch.Tensor:
        """The last forward pass's ids as int32 ``[batch, seq, num_layers, top_k]`` (0 in dense layers).

        The routers see ``hidden_states.view(-1, hidden)`` of ``[batch, seq, hidden]``: batch-major rows.
        """
        spec = self.spec
        out = torch.zeros(batch * seq, spec.num_layers, spec.top_k, dtype=torch.int32)
        for layer, indices in self._step.items():
            out[:, layer] = indices.to(device="cpu", dtype=torch.int32)
        self._step.clear()
        return out.view(batch, seq, spec.num_layers, spec.top_k)


def encode_routed_experts(routing: torch.Tensor) -> str:
    """SGLang's wire form: base64 of the little-endian int32 bytes (``detokenizer_manager``)."""
    return base64.b64encode(routing.numpy().astype("<i4", copy=False).tobytes()).decode("ascii")
