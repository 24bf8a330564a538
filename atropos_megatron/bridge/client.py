"""The trainer's side of the bridge: register, receive validated batches, acknowledge them, push weights.

Every call has a deadline. Only calls that are safe to repeat are retried on ``UNAVAILABLE`` (the
bridge restarting): registration, acks and status are idempotent, and a batch whose answer was lost
is handed out again by ``next_batch(redeliver_unacked=True)``. A weight push is not retried here: the
caller pushes again (every push carries the full weights).

Weights go out as :class:`WeightPushStream`: the caller sends buckets from its own thread (a
``distributed`` push must broadcast between two messages), the gRPC call consumes them from a small
queue in the background, and a full queue blocks the sender, so memory stays bounded.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from atropos_megatron.bridge import codec
from atropos_megatron.bridge.v1 import bridge_pb2, bridge_pb2_grpc
from atropos_megatron.bridge.weight_wire import DataChunk, encode_chunk

logger = logging.getLogger(__name__)

_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)
CHUNK_BYTES = 4 * 1024 * 1024  # bytes per data message of a weight bucket
_QUEUE_DEPTH = 8  # messages buffered ahead of the gRPC call (so at most 32 MiB of bucket bytes)
_END = object()

# SGLang's dtype names (``getattr(torch, name)``) <-> the contract's enum, for weights.
WEIGHT_DTYPES = {
    "float32": bridge_pb2.DTYPE_FLOAT32,
    "bfloat16": bridge_pb2.DTYPE_BFLOAT16,
    "float16": bridge_pb2.DTYPE_FLOAT16,
}
WEIGHT_DTYPE_NAMES = {value: name for name, value in WEIGHT_DTYPES.items()}
WEIGHT_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of SGLang dtype name ``dtype`` and ``shape``."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * WEIGHT_ITEMSIZE[dtype]


TRANSPORTS = {
    "grpc": bridge_pb2.WEIGHT_TRANSPORT_GRPC,
    "distributed": bridge_pb2.WEIGHT_TRANSPORT_DISTRIBUTED,
    "disk": bridge_pb2.WEIGHT_TRANSPORT_DISK,
}
TRANSPORT_NAMES = {value: name for name, value in TRANSPORTS.items()}


class BridgeClient:
    """A connection to one bridge."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        timeout_s: float = 60.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = bridge_pb2_grpc.BridgeStub(self._channel)
        # PushWeights with our own encoder (weight_wire): bucket bytes go out without protobuf copies.
        self._push_weights = self._channel.stream_unary(
            "/atropos_megatron.bridge.v1.Bridge/PushWeights",
            request_serializer=encode_chunk,
            response_deserializer=bridge_pb2.PushWeightsResponse.FromString,
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def register_run(
        self,
        *,
        run_name: str,
        batch_size: int,
        max_token_len: int,
        starting_step: int,
        num_steps: int,
        checkpoint_dir: str = "",
        save_checkpoint_interval: int = 0,
        vocab_size: int = 0,
    ) -> bridge_pb2.RegisterRunResponse:
        request = bridge_pb2.RegisterRunRequest(
            request_id=_request_id(),
            run_name=run_name,
            batch_size=batch_size,
            max_token_len=max_token_len,
            starting_step=starting_step,
            num_steps=num_steps,
            checkpoint_dir=checkpoint_dir,
            save_checkpoint_interval=save_checkpoint_interval,
            vocab_size=vocab_size,
        )
        return self._call(self._stub.RegisterRun, request, retry=True)

    def next_batch(
        self, *, wait_s: float = 30.0, redeliver_unacked: bool = False
    ) -> codec.EncodedBatch | None:
        """The next batch, or None if the bridge had none within ``wait_s``."""
        request = bridge_pb2.GetBatchRequest(
            request_id=_request_id(), wait_s=wait_s, redeliver_unacked=redeliver_unacked
        )
        try:
            message = self._stub.GetBatch(request, timeout=wait_s + self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise
        return codec.batch_from_proto(message)

    def peek_batch(self, *, wait_s: float = 30.0) -> bridge_pb2.TrainingBatch:
        """The oldest waiting batch as the proto message, left queued for the trainer; raises if none came."""
        request = bridge_pb2.GetBatchRequest(request_id=_request_id(), wait_s=wait_s, peek=True)
        return self._stub.GetBatch(request, timeout=wait_s + self.timeout_s, metadata=self._metadata)

    def ack(self, batch_id: str, *, trained_step: int = 0) -> None:
        request = bridge_pb2.AckBatchRequest(
            request_id=_request_id(), batch_id=batch_id, trained_step=trained_step
        )
        self._call(self._stub.AckBatch, request, retry=True)

    def status(self) -> bridge_pb2.BridgeStatus:
        return self._call(
            self._stub.GetStatus, bridge_pb2.GetStatusRequest(request_id=_request_id()), retry=True
        )

    def open_weight_push(
        self,
        weight_version: str,
        *,
        transport: str = "grpc",
        disk_path: str = "",
        group: dict | None = None,
        num_buckets: int = 0,
        total_bytes: int = 0,
        timeout_s: float | None = None,
    ) -> WeightPushStream:
        """Start a ``PushWeights`` call; send buckets on the returned stream, then ``finish()`` it.

        ``group`` (``distributed`` only): the ``DistributedGroup`` fields as a dict (master_address,
        master_port, group_name, backend, world_size, init).
        """
        header = bridge_pb2.WeightsHeader(
            request_id=_request_id(),
            weight_version=weight_version,
            transport=TRANSPORTS[transport],
            disk_path=disk_path,
            group=bridge_pb2.DistributedGroup(**group) if group else None,
            num_buckets=num_buckets,
            total_bytes=total_bytes,
        )
        return WeightPushStream(self._push_weights, header, metadata=self._metadata, timeout_s=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, *, retry: bool):
        for attempt, pause in enumerate((*_RETRY_S, None) if retry else (None,)):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                if pause is None or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                logger.warning(
                    "bridge unavailable (%s); retry %d in %.1f s", exc.details(), attempt + 1, pause
                )
                time.sleep(pause)
        raise AssertionError("unreachable")


class WeightPushStream:
    """One open ``PushWeights`` call (see the module docstring). Not thread-safe: one sender."""

    def __init__(self, call, header: bridge_pb2.WeightsHeader, *, metadata, timeout_s: float | None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._queue.put(bridge_pb2.WeightsChunk(header=header))
        self._future = call.future(self._messages(), timeout=timeout_s, metadata=metadata)
        self._finished = False

    def send_bucket(
        self,
        index: int,
        tensors: Sequence[tuple[str, str, Sequence[int]]],
        data: Iterable[bytes] | bytes | memoryview | None = None,
        *,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        """Announce bucket ``index`` (``(hf_name, sglang_dtype_name, shape)`` per tensor) and send its bytes.

        ``data`` is the bucket's bytes (any buffer, cut into ``chunk_bytes`` messages) or an iterable of
        byte chunks; None for the ``distributed`` transport, whose bytes go by broadcast. The bytes
        are read when gRPC sends them, after this returns: leave the buffer untouched until
        :meth:`finish` (the exporter's buckets are fresh buffers, so this holds for them).
        """
        specs = [
            bridge_pb2.TensorSpec(name=name, dtype=WEIGHT_DTYPES[dtype], shape=list(shape))
            for name, dtype, shape in tensors
        ]
        nbytes = sum(weight_nbytes(dtype, shape) for _, dtype, shape in tensors)
        self._put(
            bridge_pb2.WeightsChunk(bucket=bridge_pb2.WeightBucket(index=index, tensors=specs, nbytes=nbytes))
        )
        if data is None:
            return
        if isinstance(data, bytes | bytearray | memoryview):
            view = memoryview(data).cast("B")
            data = (view[start : start + chunk_bytes] for start in range(0, len(view), chunk_bytes))
        for chunk in data:
            self._put(DataChunk(chunk))  # encoded straight from the caller's memory (weight_wire)

    def finish(self) -> bridge_pb2.PushWeightsResponse:
        """End the stream and wait for the bridge's answer (raises ``grpc.RpcError`` on failure)."""
        if not self._finished:
            self._finished = True
            self._put(_END)
        return self._future.result()

    def cancel(self) -> None:
        self._finished = True
        self._future.cancel()

    def done(self) -> bool:
        """Whether the call has ended (the bridge answered or refused, or it was cancelled)."""
        return self._future.done()

    def _put(self, item) -> None:
        while True:  # block while the call is alive, but never forever on a call that already failed
            if self._future.done():
                self._future.result()  # raises the call's error
                raise RuntimeError("the PushWeights call ended before the stream did")
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _messages(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item


def _request_id() -> str:
    return uuid.uuid4().hex
