"""The trainer's weights as full, HF-named tensors in byte-bounded buckets, for inference servers.

SGLang's weight-update protocol takes full (unsharded) tensors under HuggingFace names and reshards
them itself, so the trainer gathers each parameter out of its TP x PP (x VPP) layout and sends it to
one *sender* rank (pipeline stage 0, TP rank 0, data-parallel replica 0):

- each pipeline stage's TP ranks gather every parameter to their TP rank 0, in the fixed order of
  ``iter_global_params`` over the stage's chunks, and ``gather_shards`` rebuilds the full tensor;
- each stage's TP rank 0 sends its full tensors to the sender point to point over the pipeline group;
  the sender receives stage 0's, then stage 1's, ..., knowing each stage's list (global name, full
  shape, dtype) from one ``all_gather_object`` at the start;
- the sender maps each Megatron tensor to HF tensors (``hf_mapping.megatron_to_hf``: fused q/k/v and
  gate/up split, vocabulary padding cut), optionally casts them, and packs them into buckets.

MoE experts are also split over the expert-parallel ranks, which are data-parallel ranks of the dense
layers: after its TP gather, each expert is gathered over the EP group to EP rank 0 (which is in
data-parallel replica 0), named by its global index, and then travels like any other tensor. Only one
copy of each expert takes part (expert data-parallel rank 0).

With LoRA the adapters are merged: a linear layer that carries them is exported as
``W + scale * B A``, computed per shard before the TP gather (``LinearAdapters.merged_weight``), and
the factors themselves are not sent, so the servers run a plain HF model.

Other data-parallel replicas hold the same weights and take no part. With tied embeddings the last
stage's copy of the embedding (``output_layer.weight``) is never sent: HF checkpoints of tied models
have no ``lm_head``. Memory beyond the model: the sender holds one bucket plus the tensor in flight (and its HF parts),
every other rank at most one gathered tensor.

Deliberately not here: the transport to the inference servers (the bridge's job; it consumes the
buckets on the sender), quantisation, and context parallelism (replicas along CP would
each run an export; ``parallel.py`` does not expose the CP rank yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from atropos_megatron.config import LoraConfig, ModelConfig
from atropos_megatron.trainer import parallel
from atropos_megatron.weights.hf_mapping import megatron_to_hf
from atropos_megatron.weights.lora_layout import ADAPTER_MODULE, is_adapter_name, megatron_to_peft_name
from atropos_megatron.weights.megatron_shards import (
    gather_shards,
    is_expert_name,
    iter_global_params,
    shift_expert,
)

Progress = Callable[[int], object]
"""Called on the sender with the bytes of each bucket as it is handed out (e.g. a tqdm bar's ``update``)."""

_OUTPUT = "output_layer.weight"
_ROUTER = ".mlp.router.weight"  # replicated over TP


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies in a bucket's bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Bytes from the start of the bucket."""
    nbytes: int


@dataclass
class WeightBucket:
    """Tensors of one dtype, back to back in one flat byte buffer (SGLang's flattened-bucket layout)."""

    index: int
    """0, 1, ... within one export."""
    tensors: list[TensorSpec]
    data: torch.Tensor
    """uint8 ``[sum of nbytes]``, contiguous: the tensors' bytes in order, no padding."""

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` pairs as views into :attr:`data` (no copy)."""
        return [(spec.name, _view(self.data, spec)) for spec in self.tensors]


def pack_buckets(
    named: Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int,
    device: torch.device | str | None = None,
) -> Iterator[WeightBucket]:
    """Copy ``named`` tensors, in order, into buckets of at most ``bucket_bytes`` bytes each.

    A bucket holds one dtype (a new one starts when the dtype changes), so every offset is a multiple
    of the element size and a receiver can view its tensors straight out of the bytes. A tensor bigger
    than ``bucket_bytes`` travels alone. Each tensor is copied in as it arrives (the caller may free it),
    into a buffer allocated fresh per bucket: a consumer may still hold the previous bucket (SGLang's
    tensor path does while the server loads it). The buffer is allocated with ``bucket_bytes`` of
    capacity up front (unused tail pages of a CPU buffer are never touched); ``data`` is its used prefix.

    Args:
        device: where the buckets live (default CPU).

    Raises:
        ValueError: ``bucket_bytes`` is not positive.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    device = torch.device("cpu") if device is None else torch.device(device)
    buffer: torch.Tensor | None = None
    specs: list[TensorSpec] = []
    used = index = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if specs and (tensor.dtype != specs[0].dtype or used + nbytes > bucket_bytes):
            yield WeightBucket(index, specs, buffer[:used])
            buffer, specs, used, index = None, [], 0, index + 1
        if buffer is None:
            buffer = torch.empty(max(bucket_bytes, nbytes), dtype=torch.uint8, device=device)
        spec = TensorSpec(name, tensor.dtype, tuple(tensor.shape), used, nbytes)
        _view(buffer, spec).copy_(tensor)
        del tensor  # the producer may free it while computing the next one
        specs.append(spec)
        used += nbytes
    if specs:
        yield WeightBucket(index, specs, buffer[:used])


def _view(data: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return data[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)


def is_export_sender() -> bool:
    """Whether this rank receives the exported tensors (pipeline stage 0, TP rank 0, DP rank 0)."""
    layout = parallel.current_layout()
    return layout.pp_rank == 0 and layout.tp_rank == 0 and layout.dp_rank == 0


def export_hf_tensors(
    chunks: Sequence[torch.nn.Module], model: ModelConfig, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full HF ``(name, tensor)`` of the model, on the sender only.

    Collective over the model-parallel ranks of data-parallel replica 0: every one of them must
    exhaust the iterator (it yields nothing except on the sender); other replicas return at once.
    Tensors are on the parameters' device; ``dtype`` casts them (one at a time). Without a cast, some
    may be views of the sender's own parameters: read them, never modify them.
    """
    layout = parallel.current_layout()
    holds_other_experts = layout.ep > 1 and layout.expert_dp_rank == 0
    if layout.dp_rank != 0 and not holds_other_experts:
        return
    params = _exported_params(
        chunks,
        layout,
        lambda name: (
            not (model.tie_word_embeddings and name == _OUTPUT)  # HF has no lm_head when tied
            and not is_adapter_name(name)  # merged into their layer's weight instead
        ),
    )
    if layout.dp_rank != 0:  # another data-parallel replica: only its own experts
        params = [(name, param) for name, param in params if is_expert_name(name)]
    experts_per_rank = model.moe.num_experts // layout.ep
    for name, full in _full_tensors(params, layout, _adapters_by_weight(chunks), experts_per_rank):
        hf_tensors = megatron_to_hf([(name, full)], model)
        del full  # (and every other reference below) so that the next gather is the only full tensor
        for hf_name, tensor in hf_tensors:
            yield hf_name, tensor if dtype is None else tensor.to(dtype)
            del tensor


def export_adapter_tensors(
    chunks: Sequence[torch.nn.Module], lora: LoraConfig, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every LoRA factor, whole and PEFT-named, on the sender only, scaled for :func:`served_lora`.

    Collective like :func:`export_hf_tensors` (same gather path). With rsLoRA each ``B`` is multiplied
    by ``sqrt(r)``: SGLang scales adapters by ``lora_alpha / r`` and reads no ``use_rslora``, so the
    rsLoRA factor travels inside ``B`` and the adapter is served (and loads in PEFT) as plain LoRA.
    """
    layout = parallel.current_layout()
    if layout.dp_rank != 0:
        return
    params = _exported_params(chunks, layout, is_adapter_name)
    fold = lora.scale / served_lora(lora).scale
    for name, full in _full_tensors(params, layout, {}, experts_per_rank=0):
        tensor = full * fold if fold != 1.0 and name.endswith("lora_B.weight") else full
        del full
        yield megatron_to_peft_name(name), tensor if dtype is None else tensor.to(dtype)
        del tensor


def served_lora(lora: LoraConfig) -> LoraConfig:
    """The adapter as inference servers get it: plain LoRA (rsLoRA folded into ``B``), no dropout."""
    return replace(lora, use_rslora=False, dropout=0.0, adapter=None)


def export_hf_buckets(
    chunks: Sequence[torch.nn.Module],
    model: ModelConfig,
    *,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Iterator[WeightBucket]:
    """:func:`export_hf_tensors` packed by :func:`pack_buckets` (buckets on the sender only).

    Args:
        device: where the buckets live. CPU by default (disk and HTTP transports, tests); the
            ``distributed`` transport broadcasts from the GPU, so it passes the GPU device.
        progress: called with each bucket's bytes on the sender.
    """
    tensors = export_hf_tensors(chunks, model, dtype=dtype)
    for bucket in pack_buckets(tensors, bucket_bytes=bucket_bytes, device=device):
        if progress is not None:
            progress(bucket.nbytes)
        yield bucket
        del bucket  # only the consumer decides how long a bucket lives


def unwrap_chunk(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's wrappers (DDP, Float16Module), which each keep it as ``.module``.

    Without this, parameter names would carry ``module.`` prefixes that no mapping knows.
    """
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def _exported_params(
    chunks: Sequence[torch.nn.Module], layout: parallel.ParallelLayout, keep: Callable[[str], bool]
) -> list[tuple[str, torch.nn.Parameter]]:
    """``(global name, parameter)`` of this rank's chunks whose name ``keep`` accepts, checked to say
    how they are split (see :func:`_check_split_attributes`)."""
    params = [
        (name, param)
        for chunk in chunks
        for name, param in iter_global_params(unwrap_chunk(chunk))
        if keep(name)
    ]
    _check_split_attributes(params, layout.tp)
    return params


def _check_split_attributes(params: list[tuple[str, torch.nn.Parameter]], tp_size: int) -> None:
    """Refuse matrices that do not say how they are split: they would be exported as one TP shard.

    Megatron's local-spec layers set ``tensor_model_parallel`` on their weights only while initialising
    them, so a model built with ``perform_initialization=False`` has none. Every matrix of a GPT model
    (embedding, output layer, linear layers) except the MoE router is split, so a matrix without the
    attribute at TP > 1 means the attributes are missing, not that the matrix is replicated.

    Raises:
        ValueError: naming the parameters (before any communication, so every rank raises).
    """
    if tp_size == 1:
        return
    missing = [
        name
        for name, param in params
        if param.dim() >= 2 and not hasattr(param, "tensor_model_parallel") and not name.endswith(_ROUTER)
    ]
    if missing:
        raise ValueError(
            f"at TP={tp_size}, these parameters lack Megatron's tensor_model_parallel attributes, so their "
            f"shards cannot be gathered (was the model built with perform_initialization=False?): "
            + ", ".join(missing)
        )


def _adapters_by_weight(chunks: Sequence[torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """``id(weight) -> adapters`` of every linear layer that carries LoRA adapters (none without LoRA)."""
    found = {}
    for chunk in chunks:
        for module in unwrap_chunk(chunk).modules():
            adapters = getattr(module, ADAPTER_MODULE, None)
            if adapters is not None and hasattr(adapters, "merged_weight"):
                found[id(module.weight)] = adapters
    return found


def _full_tensors(
    params: list[tuple[str, torch.nn.Parameter]],
    layout: parallel.ParallelLayout,
    adapters: dict[int, torch.nn.Module],
    experts_per_rank: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron ``(global name, tensor)`` of every stage on the sender, stage by stage.

    A weight in ``adapters`` is sent merged with its layer's LoRA adapters. Each expert parameter of
    EP rank 0 comes with the same local expert of every other EP rank (``experts_per_rank`` apart).
    """
    tp_group = parallel.tensor_parallel_group()
    pp_group = parallel.pipeline_parallel_group()
    ep_group = parallel.expert_parallel_group() if layout.ep > 1 else None
    stage_head = layout.tp_rank == 0 and layout.ep_rank == 0  # sends its stage's tensors to the sender
    sender = stage_head and layout.pp_rank == 0
    stages: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
    if layout.pp > 1 and stage_head:  # other TP and EP ranks never send to the sender
        local = [
            (each, _full_shape(param, layout.tp), param.dtype)
            for name, param in params
            for each in _ep_names(name, layout.ep if ep_group else 1, experts_per_rank)
        ]
        stages = [[] for _ in range(layout.pp)]
        dist.all_gather_object(stages, local, group=pp_group)
    for name, param in params:
        wrapped = adapters.get(id(param))
        local = param.detach() if wrapped is None else wrapped.merged_weight(param.detach())
        full = _gather_tp(param, local, layout, tp_group)
        if full is None:
            continue
        if ep_group is not None and is_expert_name(name):
            gathered = _gather_ep(full, layout, ep_group)
            del full
            named = (
                zip(_ep_names(name, layout.ep, experts_per_rank), gathered, strict=True) if gathered else ()
            )
        else:
            named = [(name, full)]
            del full
        for each, tensor in named:
            if sender:
                yield each, tensor
            else:
                dist.send(tensor, group=pp_group, group_dst=0)
                if tensor.is_cuda:
                    # NCCL returns before the send is done and keeps the tensor alive until it is: wait, so
                    # that a stage holds one gathered tensor at a time rather than its share of the model.
                    torch.cuda.current_stream(tensor.device).synchronize()
            del tensor
    if sender:
        device = params[0][1].device if params else torch.device("cpu")
        for stage in range(1, layout.pp):
            for name, shape, dtype in stages[stage]:
                full = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(full, group=pp_group, group_src=stage)
                yield name, full
                del full


def _ep_names(name: str, ep_size: int, experts_per_rank: int) -> list[str]:
    """Global names of ``name`` on each EP rank, in rank order (``[name]`` for non-expert tensors)."""
    if ep_size == 1 or not is_expert_name(name):
        return [name]
    return [shift_expert(name, rank * experts_per_rank) for rank in range(ep_size)]


def _gather_ep(
    full: torch.Tensor, layout: parallel.ParallelLayout, ep_group: dist.ProcessGroup
) -> list[torch.Tensor]:
    """Every EP rank's tensor in the place of ``full`` (same local expert), on EP rank 0; ``[]`` elsewhere."""
    full = full.contiguous()
    if layout.ep_rank != 0:
        dist.gather(full, None, group=ep_group, group_dst=0)
        return []
    gathered = [torch.empty_like(full) for _ in range(layout.ep)]
    dist.gather(full, gathered, group=ep_group, group_dst=0)
    return gathered


def _full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _gather_tp(
    param: torch.nn.Parameter,
    data: torch.Tensor,
    layout: parallel.ParallelLayout,
    tp_group: dist.ProcessGroup,
) -> torch.Tensor | None:
    """The full tensor of which ``data`` is this rank's shard (split as ``param``), on TP rank 0 (None on
    the other TP ranks)."""
    if layout.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return data if layout.tp_rank == 0 else None
    data = data.contiguous()
    if layout.tp_rank != 0:
        dist.gather(data, None, group=tp_group, group_dst=0)
        return None
    if param.partition_dim == 0 and getattr(param, "partition_stride", 1) == 1:
        # Row blocks in rank order are the full tensor: gather straight into it, no second copy.
        full = data.new_empty(_full_shape(param, layout.tp))
        dist.gather(data, list(full.chunk(layout.tp)), group=tp_group, group_dst=0)
        return full
    shards = [torch.empty_like(data) for _ in range(layout.tp)]
    dist.gather(data, shards, group=tp_group, group_dst=0)
    return gather_shards(shards, param, tp_size=layout.tp)
