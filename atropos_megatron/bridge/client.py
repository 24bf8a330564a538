"""The trainer's side of the bridge: register, receive validated batches, acknowledge them.

Every call has a deadline. Only calls that are safe to repeat are retried on ``UNAVAILABLE`` (the
bridge restarting): registration, acks and status are idempotent, and a batch whose answer was lost
is handed out again by ``next_batch(redeliver_unacked=True)``.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import grpc

from atropos_megatron.bridge import codec
from atropos_megatron.bridge.v1 import bridge_pb2, bridge_pb2_grpc

logger = logging.getLogger(__name__)

_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)


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


def _request_id() -> str:
    return uuid.uuid4().hex
