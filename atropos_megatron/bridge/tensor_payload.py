"""One weight bucket received over gRPC, held in shared memory, as SGLang's tensor-update payload.

The ``grpc`` transport hands buckets to same-host servers through ``/update_weights_from_tensor`` with
``load_format="flattened_bucket"``: the HTTP body carries a pickled *handle* to shared memory, not the
bytes (notes/sglang-protocol.md §1.3). The buffer is allocated in shared memory from the start, so the
bytes arriving from the trainer are written exactly once and every server maps the same pages.

One shared buffer (:class:`SharedBuffer`) is reused for every bucket: buckets are applied one at a
time and every server has copied a bucket into its weights before it answers, and fresh shared
memory costs ~0.6 s per GB in page faults. So the bridge keeps one bucket's worth (the largest seen)
of shared memory for its lifetime.

This is the only bridge module that needs torch (SGLang's payload is a torch ``ForkingPickler``
pickle); it is imported when the first bucket of a ``grpc`` push arrives, so a bridge that serves only
batches, or the ``distributed``/``disk`` transports, never loads torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atropos_megatron import sglang_wire
from atropos_megatron.bridge.weight_sync import BucketTensor


class SharedBuffer:
    """Shared memory for one bucket at a time, grown to the largest bucket seen and then reused."""

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 view of ``nbytes`` shared bytes (valid until the next ``take``)."""
        if self._storage is None or self._storage.numel() < nbytes:
            sglang_wire.use_file_system_sharing()
            self._storage = None  # release the smaller one first
            self._storage = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        return self._storage[:nbytes]


class SharedBucket:
    """A bucket's bytes in shared memory, filled chunk by chunk, then encoded for every server.

    The buffer is ``shared``'s until the next bucket: finish with this one (every server answered)
    before starting another.
    """

    def __init__(self, tensors: Sequence[BucketTensor], shared: SharedBuffer) -> None:
        self.tensors = list(tensors)
        self.nbytes = sum(t.nbytes for t in self.tensors)
        self._buffer = shared.take(self.nbytes)
        self._view = memoryview(self._buffer.numpy())
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self.nbytes

    def write(self, chunk: bytes | memoryview) -> None:
        """Append the next bytes (one copy); raises ValueError when they would overflow the bucket."""
        end = self._filled + len(chunk)
        if end > self.nbytes:
            raise ValueError(f"bucket holds {self.nbytes} bytes; {end} arrived")
        self._view[self._filled : end] = chunk
        self._filled = end

    def payload(self) -> str:
        """One receiver's ``serialized_named_tensors`` entry: base64 ForkingPickler of the flattened bucket.

        Call once per server and TP rank: each pickle carries one reference to the shared memory,
        which its receiver releases.
        """
        if not self.complete:
            raise ValueError(f"bucket incomplete: {self._filled} of {self.nbytes} bytes")
        metadata = sglang_wire.bucket_metadata(
            [(t.name, t.shape, getattr(torch, t.dtype)) for t in self.tensors]
        )
        return sglang_wire.serialize_payload({"flattened_tensor": self._buffer, "metadata": metadata})

    def chunks(self, chunk_bytes: int):
        """The bucket's bytes as ``bytes`` pieces of at most ``chunk_bytes`` (to forward it on)."""
        for start in range(0, self.nbytes, chunk_bytes):
            yield self._view[start : start + chunk_bytes]
