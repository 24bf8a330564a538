"""A standalone process group for pushing weights to inference servers, built the way SGLang builds it.

SGLang's ``/init_weights_update_group`` joins a group of ``world_size`` ranks at ``tcp://addr:port``
(the trainer is rank 0). Both sides must derive identical TCPStore keys, so this mirrors SGLang's
``init_custom_process_group``: rendezvous -> ``PrefixStore(group_name, store)`` -> a process group
created as if it were a default group (no global ranks), registered with ranks ``0..world_size-1``.

It works whether or not the process already has a default group: the trainer's rank 0 has one for
training, the inference server has none. A plain ``init_process_group`` cannot be used here: it would
replace the default group and prefix the store with ``default_pg``, so the peers never meet (they
hang until the timeout). What this module does not do: choose ports, retry, or move tensors.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

BACKENDS = ("gloo", "nccl")


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


def destroy_group(group: dist.ProcessGroup | None) -> None:
    """Tear down a group from :func:`init_custom_process_group` (a no-op for ``None``)."""
    if group is not None:
        dist.destroy_process_group(group)


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
