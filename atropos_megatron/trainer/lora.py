"""LoRA adapters on a built Megatron-Core GPT model: install, freeze the base, switch adapters off.

Megatron-Core has no LoRA. :func:`apply_lora` hangs a ``lora`` child module under each targeted linear
layer (so base parameter names, checkpoints of the base and the HF mapping are unchanged) and adds
``scale * B(A(dropout(x)))`` to the layer's output with a forward hook. The adapters are canonical (one
``A``/``B`` pair per HF projection, PEFT's names and shapes; layout and TP split rules in
``weights/lora_layout.py``):

- column-parallel layers (``linear_qkv``, ``linear_fc1``): every rank computes the rank-r activations
  ``A x`` of each projection, then this rank's rows with its rows of ``B``, placed in the fused row order
  by ``hf_mapping.fuse_rows`` (the GQA interleave, ``[gate; up]``). The backward all-reduces the r-wide
  gradient (Megatron's copy-to-TP-region), so the replicated ``A`` gets its full gradient on every rank.
- row-parallel layers (``linear_proj``, ``linear_fc2``): ``A``'s columns are split like the weight's,
  so ``A x`` is a partial sum; it is all-reduced at rank r (cheaper than reducing the output) and the
  replicated ``B`` maps it to the full output, added after the layer's own reduction.

With sequence parallelism the r-wide activations are gathered / reduce-scattered along the sequence
instead, and the replicated factors are marked ``sequence_parallel`` so that Megatron all-reduces
their gradients as it does the norms'. Transformer Engine's norm-fused linears are refused (the hook
would see the un-normalised input): LoRA models are built on the local spec (``model.uses_te_spec``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from atropos_megatron.config import LORA_TARGET_MODULES, LoraConfig, ModelConfig
from atropos_megatron.weights.hf_mapping import fuse_rows
from atropos_megatron.weights.lora_layout import (
    ADAPTER_MODULE,
    FACTORS,
    LoraSite,
    factor_shape,
    rank_model,
    sites_for,
)
from atropos_megatron.weights.megatron_shards import copy_shard


class _Factor(nn.Module):
    """One factor's weight, so that its name ends in ``lora_A.weight`` / ``lora_B.weight`` as in PEFT."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the parameter itself: it carries Megatron's partition attributes


class LoraAdapter(nn.Module):
    """One HF projection's factors as this TP rank holds them, and the dropout on its input."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter, dropout: float) -> None:
        super().__init__()
        self.lora_A = _Factor(a)
        self.lora_B = _Factor(b)
        # One dropout per projection, as PEFT has: q, k and v see independent masks.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()


class LinearAdapters(nn.Module):
    """The adapters of one Megatron linear layer (child ``lora`` of it) and the hook that applies them."""

    def __init__(
        self,
        site: LoraSite,
        adapters: dict[str, LoraAdapter],
        *,
        scale: float,
        model: ModelConfig,
        linear: nn.Module,
    ) -> None:
        super().__init__()
        self.site = site
        self.keys = tuple(adapters)
        for key, adapter in adapters.items():
            self.add_module(key, adapter)
        self.scale = scale
        self.enabled = True
        self._tp_group = linear.tp_group
        self._tp = linear.tp_group.size()
        self._sequence_parallel = bool(getattr(linear, "sequence_parallel", False))
        self._rank_model = rank_model(model, self._tp)
        self._has_dropout = any(not isinstance(self.adapter(k).dropout, nn.Identity) for k in self.keys)

    def adapter(self, key: str) -> LoraAdapter:
        return getattr(self, key)

    def add_delta(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        """Forward hook of the linear layer: ``(out + delta, bias)``; the output unchanged when disabled."""
        if not self.enabled:
            return output
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        delta = self._column_delta(x) if self.site.parallel == "column" else self._row_delta(x)
        return out + delta, bias

    def _column_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        with self._dropout_rng(split_input=self._sequence_parallel):
            h = torch.cat([self._down(key, x) for key in self.keys], dim=-1)  # [s, b, n * r]
        if self._sequence_parallel:
            h = tensor_parallel.gather_from_sequence_parallel_region(h, group=self._tp_group)
        else:
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h, group=self._tp_group)
        return F.linear(h, self._fused_b()) * self.scale

    def _row_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        (key,) = self.keys  # a row-parallel layer computes one HF projection
        with self._dropout_rng(split_input=True):
            h = self._down(key, x)  # this rank's input columns: a partial sum, [s, b, r]
        if self._sequence_parallel:
            h = tensor_parallel.reduce_scatter_to_sequence_parallel_region(h, group=self._tp_group)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h, group=self._tp_group)
        return F.linear(h, self.adapter(key).lora_B.weight) * self.scale

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``W + scale * B A`` (a new tensor, ``weight``'s dtype), whatever the split.

        The delta of a shard is computed from this rank's factors alone, so merged weights are
        gathered over TP like any other weight: column-parallel, this rank's fused ``B`` rows times
        every projection's (whole) ``A``; row-parallel, the whole ``B`` times this rank's ``A``
        columns. Computed in fp32 and rounded once, as PEFT's merge does for half precision.
        """
        if self.site.parallel == "column":
            b = self._fused_b()
            a = torch.cat([self.adapter(key).lora_A.weight for key in self.keys], dim=0)
        else:
            (key,) = self.keys
            b, a = self.adapter(key).lora_B.weight, self.adapter(key).lora_A.weight
        delta = (b.float() @ a.float()) * self.scale
        return (weight.float() + delta).to(weight.dtype)

    def _down(self, key: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter(key)
        return F.linear(adapter.dropout(x), adapter.lora_A.weight)

    def _fused_b(self) -> torch.Tensor:
        """This rank's ``B`` rows of every projection in the fused row order, ``[out / tp, n * r]``.

        Projection i's ``B`` fills columns ``i*r .. (i+1)*r`` of its own rows, so one matmul with the
        concatenated ``A x`` gives each projection's delta on exactly the rows its base weight has.
        Untargeted projections of the layer (e.g. ``k_proj``) contribute zero rows.
        """
        n = len(self.keys)
        first = self.adapter(self.keys[0]).lora_B.weight
        r = first.shape[1]
        blocks = []
        for key in self.site.keys:
            if key in self.keys:
                i = self.keys.index(key)
                blocks.append(F.pad(self.adapter(key).lora_B.weight, (i * r, (n - 1 - i) * r)))
            else:
                rows = factor_shape(self.site, key, "B", rank=r, model=self._rank_model, tp=1)[0]
                blocks.append(first.new_zeros(rows, n * r))
        return fuse_rows(self.site.linear, blocks, self._rank_model)

    def _dropout_rng(self, *, split_input: bool):
        """Megatron's per-TP-rank RNG stream when ranks hold different inputs (so masks differ), else the
        default stream, which is the same on every TP rank (so replicated inputs get one mask)."""
        if not (self._has_dropout and self.training and split_input):
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()


def apply_lora(
    chunks: Sequence[nn.Module], lora: LoraConfig, model: ModelConfig, *, seed: int = 0
) -> list[LinearAdapters]:
    """Install ``lora``'s adapters on every decoder layer of this rank's ``chunks`` and freeze the base.

    Call on the bare chunks (before Megatron's DDP wraps them: DDP collects the parameters that need
    gradients when it is built) and after the base weights are loaded. ``B`` starts at zero, so the
    model's outputs are unchanged; ``A`` is PEFT's default (Kaiming-uniform, ``a=sqrt(5)``) drawn
    whole from a generator seeded by ``seed``, the global layer and the projection, then split, so
    every TP/PP layout starts from the same adapters. A no-op returning ``[]`` when ``lora.rank == 0``.

    Raises:
        ValueError: the chunks already carry adapters, or a linear layer is one LoRA cannot wrap.
    """
    if not lora.enabled:
        return []
    installed = []
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            global_layer = layer.layer_number - 1
            for site, keys in sites_for(lora.target_modules):
                linear = layer.get_submodule(site.linear)
                _check_wrappable(linear, site)
                adapters = {
                    key: _new_adapter(
                        site, key, lora, model, linear, seed=_adapter_seed(seed, global_layer, key)
                    )
                    for key in keys
                }
                wrapper = LinearAdapters(site, adapters, scale=lora.scale, model=model, linear=linear)
                linear.add_module(ADAPTER_MODULE, wrapper)
                linear.register_forward_hook(wrapper.add_delta, with_kwargs=True)
                installed.append(wrapper)
    freeze_base(chunks)
    return installed


def freeze_base(chunks: Sequence[nn.Module]) -> None:
    """``requires_grad`` only on adapter factors: Megatron's DDP and optimizer then see only those."""
    for chunk in chunks:
        adapter_params = {
            id(p) for m in chunk.modules() if isinstance(m, LinearAdapters) for p in m.parameters()
        }
        for param in chunk.parameters():
            param.requires_grad_(id(param) in adapter_params)


def trainable_parameters(chunks: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that trains (all of them without LoRA)."""
    return [(name, p) for chunk in chunks for name, p in chunk.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, the model computes the base network: the GRPO reference model without a second copy."""
    wrappers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, LinearAdapters)]
    previous = [w.enabled for w in wrappers]
    for wrapper in wrappers:
        wrapper.enabled = False
    try:
        yield
    finally:
        for wrapper, enabled in zip(wrappers, previous, strict=True):
            wrapper.enabled = enabled


def _check_wrappable(linear: nn.Module, site: LoraSite) -> None:
    if hasattr(linear, ADAPTER_MODULE):
        raise ValueError(f"{site.linear} already carries LoRA adapters (apply_lora was called twice)")
    if hasattr(linear, "layer_norm_weight"):
        # TE's LayerNormLinear normalises inside the layer: the hook's input is not the projection's.
        raise ValueError(
            f"{site.linear} is Transformer Engine's norm-fused linear; LoRA needs the local layer spec"
        )
    if not hasattr(linear, "tp_group"):
        raise ValueError(f"{site.linear} is a {type(linear).__name__}, not a Megatron parallel linear layer")


def _new_adapter(
    site: LoraSite, key: str, lora: LoraConfig, model: ModelConfig, linear: nn.Module, *, seed: int
) -> LoraAdapter:
    tp, tp_rank = linear.tp_group.size(), linear.tp_group.rank()
    factors = {}
    for factor in FACTORS:
        local_shape = factor_shape(site, key, factor, rank=lora.rank, model=model, tp=tp)
        param = nn.Parameter(torch.empty(local_shape, dtype=linear.weight.dtype, device=linear.weight.device))
        dim = site.split_dim(factor)
        if dim is not None:
            _mark_split(param, dim)
        elif getattr(linear, "sequence_parallel", False):
            param.sequence_parallel = True  # replicated, but each rank sees only its share of tokens
        full = torch.zeros(factor_shape(site, key, factor, rank=lora.rank, model=model, tp=1))
        if factor == "A":
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        copy_shard(param, full, name=f"{site.linear}.lora.{key}.lora_{factor}", tp_rank=tp_rank, tp_size=tp)
        factors[factor] = param
    return LoraAdapter(factors["A"], factors["B"], lora.dropout)


def _mark_split(param: nn.Parameter, dim: int) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _adapter_seed(seed: int, global_layer: int, key: str) -> int:
    return seed * 1_000_003 + global_layer * len(LORA_TARGET_MODULES) + LORA_TARGET_MODULES.index(key)
