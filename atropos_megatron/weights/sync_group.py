"""A standalone process group for pushing weights to inference servers, built the way SGLang builds it.

SGLang's ``/init_weights_update_group`` joins a group of ``world_size`` ranks at ``tcp://addr:port``
(the trainer is rank 0). Both sides must derive identical TCPStore keys, so this mirrors SGLang's
``init_custom_process_group``: rendezvous -> ``PrefixStore(group_name, store)`` -> a process group
created as if it were a default group (no global ranks), registered with ranks ``0..world_size-1``.

It works whether or not the process already has a default group: the trainer's rank 0 has one for
training, the inference server has none. A plain ``init_process_group`` cannot be used here: it would
replace the default group and prefix the store with ``default_pg``, so the peers never meet (they
hang until the timeout).

vLLM's weight-transfer group (``/init_weight_transfer_engine``) is joined by :func:`init_vllm_sender`:
with ``nccl`` through vLLM's own trainer-side helper (``vllm.distributed.weight_transfer.nccl_common.
trainer_init``: rank 0 hosts a prefix-less ``TCPStore`` (``StatelessProcessGroup``), hands the NCCL
unique id to the workers through it as a pickled vLLM object, then builds a ``PyNcclCommunicator``,
so the ``vllm`` package must be importable on the sending rank); with ``gloo`` (the reference server's
CPU stand-in, ``serve --protocol vllm``) as above under the store prefix :data:`VLLM_GROUP_NAME`.
What this module does not do: choose ports, retry, or decide which tensors to send.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

BACKENDS = ("gloo", "nccl")
VLLM_GROUP_NAME = "vllm_weight_transfer"
"""Store prefix of the gloo group ``serve --protocol vllm`` builds (vLLM's own ``nccl`` group has none)."""


def init_custom_process_group(
    *,
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 300,
) -> dist.ProcessGroup:
    """Join (and, as rank 0, host) the weight-sync group; returns when all ``world_size`` ranks joined.

    Args:
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors).
        init_method: ``tcp://host:port``; rank 0 listens there, the others connect.
        world_size, rank: this process's place in the group (the trainer is rank 0).
        group_name: must be the same on every rank and unique in this process.
        timeout_s: rendezvous and collective timeout.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    if group_name in c10d._world.pg_names.values():
        raise ValueError(f"a process group named {group_name!r} already exists in this process")
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    with _no_split_from_default_group():
        group, _ = c10d._new_process_group_helper(
            world_size,
            rank,
            [],  # empty: created like a default group, so no default group is needed or consulted
            c10d.Backend(backend),
            store,
            group_name=group_name,
            timeout=timeout,
        )
    # Collectives translate global <-> group ranks through this table; here they coincide.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_group(group: dist.ProcessGroup | VllmSender | None) -> None:
    """Tear down a group from :func:`init_custom_process_group` or :func:`init_vllm_sender` (a no-op
    for ``None``)."""
    if isinstance(group, VllmSender):
        group.destroy()
    elif group is not None:
        dist.destroy_process_group(group)


class VllmSender:
    """The trainer's end (rank 0) of a vLLM weight-transfer group: it broadcasts one tensor at a time, as
    vLLM's unpacked receive (``nccl_engine.receive_weights``, ``packed: false``) expects."""

    def __init__(self, communicator: Any, backend: str) -> None:
        self.communicator = communicator  # vLLM's PyNcclCommunicator (nccl) or a ProcessGroup (gloo)
        self.backend = backend

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.backend == "nccl":  # as NCCLTrainerWeightTransferEngine._broadcast, unpacked
            self.communicator.broadcast(tensor.contiguous(), src=0, stream=torch.cuda.current_stream())
        else:
            dist.broadcast(tensor.contiguous(), src=0, group=self.communicator)

    def destroy(self) -> None:
        if self.backend == "nccl":
            self.communicator.destroy()
        else:
            dist.destroy_process_group(self.communicator)


def init_vllm_sender(
    *, backend: str, master_address: str, master_port: int, world_size: int, timeout_s: float = 300
) -> VllmSender:
    """Join (as rank 0, hosting the rendezvous) the group the vLLM servers join through
    ``/init_weight_transfer_engine``; returns when every rank has joined.

    Raises:
        RuntimeError: ``nccl`` without the ``vllm`` package (its workers read the NCCL unique id as a
            pickled ``vllm`` object, so only vLLM's helper can hand it over).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "gloo":
        host = f"[{master_address}]" if ":" in master_address else master_address
        group = init_custom_process_group(
            backend="gloo",
            init_method=f"tcp://{host}:{master_port}",
            world_size=world_size,
            rank=0,
            group_name=VLLM_GROUP_NAME,
            timeout_s=timeout_s,
        )
        return VllmSender(group, "gloo")
    try:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init
    except ImportError as exc:
        raise RuntimeError(
            "weights.inference_engine=vllm over nccl joins vLLM's weight-transfer group with vLLM's own "
            "trainer-side helper (vllm.distributed.weight_transfer.nccl_common.trainer_init): install the "
            "vllm package the servers run on the trainer's sending rank"
        ) from exc
    info = {"master_address": master_address, "master_port": master_port, "world_size": world_size}
    return VllmSender(trainer_init(info), "nccl")


@contextlib.contextmanager
def _no_split_from_default_group() -> Iterator[None]:
    """Hide the default group's bound device while the weight-sync group is created.

    When the trainer's default group was initialised eagerly (``init_process_group(device_id=...)``),
    torch creates new NCCL groups by ``ncclCommSplit`` of the default communicator, a collective over
    all training ranks that the inference peers are not part of: it would hang or build the wrong
    communicator. Without a bound device torch creates a fresh communicator, as SGLang's side does.
    """
    default = c10d._world.default_pg if dist.is_initialized() else None
    bound = getattr(default, "bound_device_id", None)
    if bound is None:
        yield
        return
    default.bound_device_id = None
    try:
        yield
    finally:
        default.bound_device_id = bound
