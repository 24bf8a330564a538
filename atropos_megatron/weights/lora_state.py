"""LoRA adapters in and out of a Megatron model by PEFT name, whole over tensor parallelism.

PEFT is the exchange format (``get_peft_model_state_dict`` names: ``base_model.model.model.layers.0.
self_attn.q_proj.lora_A.weight``, ``A`` ``[r, in]``, ``B`` ``[out, r]``). Each factor that TP splits
carries Megatron's partition attributes, so ``megatron_shards``' one rule cuts and rebuilds it, as it
does every base weight. Pipeline stages hold only their own layers: :func:`adapter_state` returns this
stage's adapters and :func:`load_adapter_state` takes what belongs to this stage; moving adapters
between stages is the exporter's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from atropos_megatron.trainer import parallel
from atropos_megatron.weights.lora_layout import is_adapter_name, megatron_to_peft_name, peft_to_megatron_name
from atropos_megatron.weights.megatron_shards import copy_shard, gather_shards, iter_global_params


def adapter_state(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Collective over the TP group: this stage's adapter factors, whole, by PEFT name (detached copies)."""
    tp_group = parallel.tensor_parallel_group()
    tp = dist.get_world_size(tp_group)
    state = {}
    for chunk in chunks:
        for name, param in iter_global_params(chunk):
            if not is_adapter_name(name):
                continue
            local = param.detach().clone()
            shards = [local]
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                shards = [torch.empty_like(local) for _ in range(tp)]
                dist.all_gather(shards, local, group=tp_group)
            state[megatron_to_peft_name(name)] = gather_shards(shards, param, tp_size=tp)
    return state


def load_adapter_state(chunks: Sequence[torch.nn.Module], peft_tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's share of each adapter factor from whole PEFT-named tensors (in place).

    Tensors of layers on other pipeline stages are ignored.

    Raises:
        ValueError: a name that is not a PEFT LoRA factor, an adapter this model does not have for a
            layer it holds (a projection outside ``lora.target_modules``), or a shape mismatch.
        KeyError: an adapter of this stage that ``peft_tensors`` lacks.
    """
    wanted = {peft_to_megatron_name(name): name for name in peft_tensors}
    layout = parallel.current_layout()
    held_layers = set()
    loaded = set()
    for chunk in chunks:
        held_layers.update(layer.layer_number - 1 for layer in chunk.decoder.layers)
        for name, param in iter_global_params(chunk):
            if not is_adapter_name(name):
                continue
            if name not in wanted:
                raise KeyError(f"{megatron_to_peft_name(name)} is missing from the adapter tensors")
            peft_name = wanted[name]
            copy_shard(
                param, peft_tensors[peft_name], name=peft_name, tp_rank=layout.tp_rank, tp_size=layout.tp
            )
            loaded.add(name)
    for name, peft_name in wanted.items():
        if name not in loaded and int(name.split(".")[2]) in held_layers:
            raise ValueError(f"{peft_name}: the model has no such adapter (not in lora.target_modules?)")
