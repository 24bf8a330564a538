"""The trainer's side of the bridge: register, receive validated batches, acknowledge them, push weights.

Every call has a deadline. Only calls that are safe to repeat are retried while the bridge is
``UNAVAILABLE`` (restarting; for up to ``reconnect_s``): registration, acks, commits and status are
idempotent, and a batch whose answer was lost is asked for with ``redeliver_unacked``, which hands it
out again. A restarted bridge does not know the run until it registers again: the client does that
by itself, announcing the step of its last acknowledgement and of its last committed checkpoint, so
the bridge lines up exactly the batches this trainer has not trained yet. A weight push is not
retried here: the caller pushes again (every push carries the full weights).

Weights go out as :class:`WeightPushStream`: the caller sends buckets from its own thread (a
``distributed`` push must broadcast between two messages), the gRPC call consumes them from a small
queue in the background, and a full queue blocks the sender, so memory stays bounded.
"""

from __future__ import annotations

import itertools
import json
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

_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # waits between retries; the last one repeats until reconnect_s
_STOP_POLL_S = 0.25  # how soon a retry wait notices stop_waiting()
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
        reconnect_s: float = 300.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        """
        Args:
            timeout_s: deadline of one call (a batch request adds its own wait).
            reconnect_s: how long idempotent calls keep retrying while the bridge is unreachable.
        """
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
        self.reconnect_s = reconnect_s
        self._stop_waiting = False
        self._registration: bridge_pb2.RegisterRunRequest | None = None

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
        committed_step: int = 0,
        num_hidden_layers: int = 0,
        num_experts_per_tok: int = 0,
    ) -> bridge_pb2.RegisterRunResponse:
        """Register the run; ``starting_step``: the step the trainer's model is at, ``committed_step``:
        its newest durable checkpoint's (the same after a resume). The answer says how many batches the
        bridge serves again before new ones. ``num_hidden_layers`` and ``num_experts_per_tok`` (both
        > 0) ask for rollout routings: batches then carry ``routed_experts`` int16 ``[T, layers, k]``
        where the bridge captured them (``weights.capture_routed_experts``)."""
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
            committed_step=committed_step,
            num_hidden_layers=num_hidden_layers,
            num_experts_per_tok=num_experts_per_tok,
        )
        self._registration = request
        return self._call(self._stub.RegisterRun, request, rejoin=False)

    def next_batch(
        self, *, wait_s: float = 30.0, redeliver_unacked: bool = False
    ) -> codec.EncodedBatch | None:
        """The next batch, or None if the bridge had none within ``wait_s``.

        After a failed attempt the request asks for redelivery: a batch handed out whose answer was
        lost is the one that comes back.
        """

        def request(attempt: int) -> bridge_pb2.GetBatchRequest:
            return bridge_pb2.GetBatchRequest(
                request_id=_request_id(), wait_s=wait_s, redeliver_unacked=redeliver_unacked or attempt > 0
            )

        try:
            message = self._call(self._stub.GetBatch, request, timeout_s=wait_s + self.timeout_s)
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
        """The batch's update is applied: the model is now at ``trained_step``."""
        request = bridge_pb2.AckBatchRequest(
            request_id=_request_id(), batch_id=batch_id, trained_step=trained_step
        )
        self._call(self._stub.AckBatch, request)
        if self._registration is not None:
            self._registration.starting_step = max(self._registration.starting_step, trained_step)

    def commit_checkpoint(
        self, step: int, *, checkpoint_path: str = ""
    ) -> bridge_pb2.CommitCheckpointResponse:
        """The checkpoint at ``step`` is durable: the bridge may delete the batches it holds."""
        request = bridge_pb2.CommitCheckpointRequest(
            request_id=_request_id(), step=step, checkpoint_path=checkpoint_path
        )
        response = self._call(self._stub.CommitCheckpoint, request)
        if self._registration is not None:
            self._registration.committed_step = max(self._registration.committed_step, step)
        return response

    def status(self) -> bridge_pb2.BridgeStatus:
        return self._call(
            self._stub.GetStatus, bridge_pb2.GetStatusRequest(request_id=_request_id()), rejoin=False
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
        lora_name: str = "",
        lora_config: dict | None = None,
    ) -> WeightPushStream:
        """Start a ``PushWeights`` call; send buckets on the returned stream, then ``finish()`` it.

        ``group`` (``distributed`` only): the ``DistributedGroup`` fields as a dict (master_address,
        master_port, group_name, backend, world_size, init). ``lora_name`` and ``lora_config`` (its
        PEFT ``adapter_config.json``): the push is that LoRA adapter, not full weights.
        """
        header = bridge_pb2.WeightsHeader(
            request_id=_request_id(),
            weight_version=weight_version,
            transport=TRANSPORTS[transport],
            disk_path=disk_path,
            group=bridge_pb2.DistributedGroup(**group) if group else None,
            num_buckets=num_buckets,
            total_bytes=total_bytes,
            lora=bridge_pb2.LoraAdapter(name=lora_name, config_json=json.dumps(lora_config))
            if lora_name
            else None,
        )
        return WeightPushStream(self._push_weights, header, metadata=self._metadata, timeout_s=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stop_waiting(self) -> None:
        """Stop waiting for an unreachable bridge from now on: a call in its retry loop raises at once.

        For a trainer that was told to stop (under Slurm the bridge stops with it). Only sets a flag,
        so a signal handler may call it.
        """
        self._stop_waiting = True

    def _call(self, method, request, *, timeout_s: float | None = None, rejoin: bool = True):
        """``method(request)``, retried while the bridge is unavailable (up to ``reconnect_s``, unless
        :meth:`stop_waiting` was called) and, with ``rejoin``, after registering again with a bridge
        that restarted and forgot the run.

        ``request`` may be a function of the attempt number (0 first) that builds the request.
        """
        deadline = time.monotonic() + self.reconnect_s
        down_since = None
        for attempt in itertools.count():
            message = request(attempt) if callable(request) else request
            try:
                answer = method(message, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                if rejoin and exc.code() == grpc.StatusCode.FAILED_PRECONDITION and self._rejoin():
                    continue
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning(
                        "bridge unavailable (%s); retrying for up to %.0f s", exc.details(), self.reconnect_s
                    )
                if not self._wait_for_bridge(attempt, deadline):
                    raise
                continue
            if down_since is not None:
                logger.info("bridge reachable again after %.1f s", time.monotonic() - down_since)
            return answer
        raise AssertionError("unreachable")

    def _wait_for_bridge(self, attempt: int, deadline: float) -> bool:
        """Sleep before retry ``attempt + 1``; False when it is time to give up instead."""
        until = min(time.monotonic() + _RETRY_S[min(attempt, len(_RETRY_S) - 1)], deadline)
        while time.monotonic() < until and not self._stop_waiting:
            time.sleep(min(_STOP_POLL_S, max(until - time.monotonic(), 0)))
        return not self._stop_waiting and time.monotonic() < deadline

    def _rejoin(self) -> bool:
        """Register again if the bridge no longer knows the run (it restarted); False if it does."""
        if self._registration is None or self.status().registered:
            return False
        request = bridge_pb2.RegisterRunRequest()
        request.CopyFrom(self._registration)
        request.request_id = _request_id()
        response = self._call(self._stub.RegisterRun, request, rejoin=False)
        logger.warning(
            "the bridge restarted: registered again at step %d (checkpoint %d); %d batches to serve again",
            request.starting_step,
            request.committed_step,
            response.replayed_batches,
        )
        return True


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
