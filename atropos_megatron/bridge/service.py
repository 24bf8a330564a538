"""The ``Bridge`` gRPC servicer: translates between proto messages and the bridge's parts.

Decisions live elsewhere (``pipeline.BatchPipeline`` for batches, ``atropos_client`` for Atropos);
each method here checks its request, calls one of them and maps failures to gRPC status codes.
"""

from __future__ import annotations

import logging
import threading

import grpc

from atropos_megatron.bridge.atropos_client import AtroposClient, AtroposUnavailable, Registration
from atropos_megatron.bridge.pipeline import BatchPipeline, Limits
from atropos_megatron.bridge.v1 import bridge_pb2, bridge_pb2_grpc
from atropos_megatron.config import BridgeConfig

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 30.0


class BridgeService(bridge_pb2_grpc.BridgeServicer):
    """One run's bridge: registration with Atropos, then batches through the pipeline."""

    def __init__(self, cfg: BridgeConfig, atropos: AtroposClient, pipeline: BatchPipeline) -> None:
        self.cfg = cfg
        self.atropos = atropos
        self.pipeline = pipeline
        self._registered: tuple[str, bridge_pb2.RegisterRunResponse] | None = None
        self._lock = threading.Lock()

    def RegisterRun(self, request, context):  # noqa: N802 - gRPC's method name
        if request.batch_size <= 0 or request.max_token_len <= 0 or request.starting_step < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "batch_size and max_token_len must be > 0 and starting_step >= 0",
            )
        with self._lock:
            if self._registered is not None:
                run_name, response = self._registered
                if run_name == request.run_name:
                    return response
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this bridge serves run {run_name!r}")
            self.pipeline.spool.set_next_step(request.starting_step)
            registration = Registration(
                wandb_group=self.cfg.wandb_group,
                wandb_project=self.cfg.wandb_project,
                batch_size=request.batch_size,
                max_token_len=request.max_token_len,
                checkpoint_dir=request.checkpoint_dir,
                save_checkpoint_interval=request.save_checkpoint_interval,
                starting_step=self.pipeline.spool.next_step,
                num_steps=request.num_steps,
            )
            try:
                trainer_uuid = self.atropos.register(registration, deadline_s=self.cfg.request_timeout_s)
            except AtroposUnavailable as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            response = bridge_pb2.RegisterRunResponse(
                trainer_uuid=trainer_uuid, starting_step=self.pipeline.spool.next_step
            )
            self._registered = (request.run_name, response)
        logger.info(
            "run %r registered with Atropos (batch_size %d, starting at step %d)",
            request.run_name,
            request.batch_size,
            response.starting_step,
        )
        limits = Limits(vocab_size=request.vocab_size or None, max_token_len=request.max_token_len)
        self.pipeline.start(limits)
        return response

    def GetBatch(self, request, context):  # noqa: N802
        if not self.pipeline.started:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "call RegisterRun first")
        wait_s = request.wait_s if request.wait_s > 0 else DEFAULT_WAIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, max(remaining - 0.5, 0.0))  # answer before the caller's deadline
        batch = self.pipeline.next_batch(
            wait_s, redeliver_unacked=request.redeliver_unacked, peek=request.peek
        )
        if batch is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no batch from Atropos within {wait_s:.1f} s")
        return batch

    def AckBatch(self, request, context):  # noqa: N802
        if not self.pipeline.ack(request.batch_id):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown batch_id {request.batch_id!r}")
        logger.debug("batch %s acknowledged (trained step %d)", request.batch_id, request.trained_step)
        return bridge_pb2.AckBatchResponse()

    def GetStatus(self, request, context):  # noqa: N802
        snapshot = self.pipeline.snapshot()
        return bridge_pb2.BridgeStatus(
            registered=self._registered is not None,
            atropos_url=self.cfg.atropos_url,
            atropos_reachable=self.atropos.reachable,
            **snapshot,
        )
