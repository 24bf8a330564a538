"""The ``Bridge`` gRPC servicer: translates between proto messages and the bridge's parts.

Decisions live elsewhere (``pipeline.BatchPipeline`` for batches, ``atropos_client`` for Atropos,
``weight_sync.WeightSync`` for weights); each method here checks its request, calls one of them and
maps failures to gRPC status codes. A bridge in ``agent`` mode has no Atropos side: its batch calls
answer FAILED_PRECONDITION. GetStatus also carries the Atropos API's side as ``atropos_watch`` last read
it and the stalls ``stalls.diagnose`` names; the watcher's thread logs a stall when it is first named
and disconnects quiet environments when ``bridge.disconnect_quiet_envs_s`` asks for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc

from atropos_megatron.bridge import stalls
from atropos_megatron.bridge.atropos_client import AtroposClient, AtroposUnavailable, Registration
from atropos_megatron.bridge.atropos_watch import AtroposWatch
from atropos_megatron.bridge.client import TRANSPORT_NAMES, WEIGHT_DTYPE_NAMES
from atropos_megatron.bridge.pipeline import BatchPipeline, Limits
from atropos_megatron.bridge.v1 import bridge_pb2, bridge_pb2_grpc
from atropos_megatron.bridge.weight_sync import (
    BucketTensor,
    GroupSpec,
    LoraPush,
    PushHeader,
    PushRefused,
    ServerSnapshot,
    WeightPush,
    WeightSync,
)
from atropos_megatron.bridge.weight_wire import DataChunk
from atropos_megatron.config import BridgeConfig

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 30.0


class BridgeService(bridge_pb2_grpc.BridgeServicer):
    """One run's bridge: registration with Atropos, then batches through the pipeline."""

    def __init__(
        self,
        cfg: BridgeConfig,
        atropos: AtroposClient | None,
        pipeline: BatchPipeline | None,
        weights: WeightSync,
    ) -> None:
        self.cfg = cfg
        self.atropos = atropos
        self.pipeline = pipeline
        self.weights = weights
        self._shared_buffer = None  # grpc transport: one bucket of shared memory, made on first use
        self._registered: tuple[str, bridge_pb2.RegisterRunResponse] | None = None
        self._routing_shape: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.stall_policy = stalls.StallPolicy(stall_after_s=cfg.stall_after_s)
        self._logged_stalls: tuple[str, ...] = ()
        self.watch: AtroposWatch | None = None
        if atropos is not None and pipeline is not None:
            self.watch = AtroposWatch(
                atropos,
                interval_s=cfg.atropos_watch_s,
                env_activity=pipeline.env_seen,
                on_view=self._after_atropos_poll,
                alive=lambda: not pipeline.stopped,
            )

    # -- naming stalls (the Atropos watcher's thread calls _after_atropos_poll) ---------------------

    def start_watch(self) -> None:
        """Start reading the Atropos API's state (idempotent; RegisterRun and GetStatus start it too)."""
        if self.watch is not None:
            self.watch.start()

    def stop_watch(self, *, wait_s: float = 10.0) -> None:
        """Stop watching the Atropos API (``wait_s``: how long to wait for a reading in progress)."""
        if self.watch is not None:
            self.watch.stop(timeout_s=wait_s)

    def stall_snapshot(self) -> stalls.Snapshot:
        """What ``stalls.diagnose`` looks at, from the watcher's last reading and the pipeline."""
        wait = self.pipeline.wait_state()
        return stalls.Snapshot(
            atropos=self.watch.view if self.watch is not None else None,
            bridge_registered=self._registered is not None,
            no_batch_since=wait.no_batch_since,
            rejections_since_batch=wait.rejections_since_batch,
            servers_behind=self.weights.servers_behind,
            atropos_url=self.cfg.atropos_url,
        )

    def _after_atropos_poll(self, view: stalls.AtroposView) -> None:
        """Log a stall when it is first named (one line per change) and disconnect quiet envs if asked."""
        now = time.monotonic()
        snapshot = self.stall_snapshot()
        named = stalls.diagnose(snapshot, now, self.stall_policy)
        codes = tuple(stall.code for stall in named)
        if codes != self._logged_stalls:
            if named:
                waited = now - snapshot.no_batch_since if snapshot.no_batch_since is not None else 0.0
                logger.warning(
                    "no batch ready for %.0f s: %s",
                    waited,
                    "; ".join(f"{s.code}: {s.message}" for s in named),
                )
            else:
                logger.info("no stall named any more (was: %s)", ", ".join(self._logged_stalls))
            self._logged_stalls = codes
        quiet_s = self.cfg.disconnect_quiet_envs_s or 0.0
        for env_id in stalls.envs_to_disconnect(snapshot, now, quiet_s, self.stall_policy):
            env = next(e for e in view.envs if e.env_id == env_id)
            self.watch.disconnect(
                env_id,
                f"it posted nothing for {now - env.last_active:.0f} s while environments' min_batch_allocation "
                f"kept the API from forming any batch (bridge.disconnect_quiet_envs_s={quiet_s:g})",
            )

    def RegisterRun(self, request, context):  # noqa: N802 - gRPC's method name
        self._require_job_mode(context)
        if request.batch_size <= 0 or request.max_token_len <= 0 or request.starting_step < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "batch_size and max_token_len must be > 0 and starting_step >= 0",
            )
        if not 0 <= request.committed_step <= request.starting_step:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "committed_step must be in [0, starting_step]")
        routing = (request.num_hidden_layers, request.num_experts_per_tok)
        if min(routing) < 0 or (0 in routing and routing != (0, 0)):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "num_hidden_layers and num_experts_per_tok must both be > 0 (routing replay) or both 0",
            )
        with self._lock:
            if self._registered is None:
                self._registered = (request.run_name, self._register_with_atropos(request, context))
            run_name, registered = self._registered
            if run_name != request.run_name:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this bridge serves run {run_name!r}")
            replayed = self.pipeline.register(
                starting_step=request.starting_step, committed_step=request.committed_step
            )
        logger.info(
            "run %r registered (batch_size %d, trainer at step %d, checkpoint at step %d, %d batches to serve "
            "again)",
            request.run_name,
            request.batch_size,
            request.starting_step,
            request.committed_step,
            replayed,
        )
        limits = Limits(
            vocab_size=request.vocab_size or None,
            max_token_len=request.max_token_len,
            routed_experts_shape=routing if routing != (0, 0) else None,
        )
        if limits.routed_experts_shape and self.pipeline.routed_experts is None:
            logger.warning(
                "the trainer replays rollout routings but weights.capture_routed_experts is off: its "
                "batches carry none (it routes every token itself)"
            )
        elif self.pipeline.routed_experts is not None and not limits.routed_experts_shape:
            logger.warning(
                "weights.capture_routed_experts is on but the trainer registered no routing shape "
                "(num_hidden_layers, num_experts_per_tok): batches carry no routed_experts"
            )
        self._routing_shape = limits.routed_experts_shape
        self.pipeline.start(limits)
        self.start_watch()
        response = bridge_pb2.RegisterRunResponse()
        response.CopyFrom(registered)
        response.replayed_batches = replayed
        return response

    def _register_with_atropos(self, request, context) -> bridge_pb2.RegisterRunResponse:
        """The run's one registration with the Atropos API (a re-registering trainer does not repeat it)."""
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
        return bridge_pb2.RegisterRunResponse(
            trainer_uuid=trainer_uuid, starting_step=self.pipeline.spool.next_step
        )

    def GetBatch(self, request, context):  # noqa: N802
        self._require_job_mode(context)
        if not self.pipeline.started:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "call RegisterRun first")
        wait_s = request.wait_s if request.wait_s > 0 else DEFAULT_WAIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, max(remaining - 0.5, 0.0))  # answer before the caller's deadline
        batch = self.pipeline.next_batch(
            wait_s,
            redeliver_unacked=request.redeliver_unacked,
            peek=request.peek,
            caller_alive=context.is_active,
        )
        if batch is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no batch from Atropos within {wait_s:.1f} s")
        return batch

    def AckBatch(self, request, context):  # noqa: N802
        self._require_job_mode(context)
        if not self.pipeline.ack(request.batch_id, request.trained_step):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown batch_id {request.batch_id!r}")
        logger.debug("batch %s acknowledged (trained step %d)", request.batch_id, request.trained_step)
        return bridge_pb2.AckBatchResponse()

    def CommitCheckpoint(self, request, context):  # noqa: N802
        self._require_job_mode(context)
        if request.step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "step must be >= 0")
        committed = self.pipeline.commit(request.step)
        retained = self.pipeline.spool.counts()["acked"]
        logger.debug(
            "checkpoint at step %d (%s) committed %d batches; %d kept",
            request.step,
            request.checkpoint_path,
            committed,
            retained,
        )
        return bridge_pb2.CommitCheckpointResponse(committed_batches=committed, retained_batches=retained)

    def GetStatus(self, request, context):  # noqa: N802
        snapshot = self.pipeline.snapshot() if self.pipeline is not None else {}
        self.weights.refresh()
        if self.pipeline is not None:
            self.start_watch()
            snapshot.update(self._waiting_fields())
        return bridge_pb2.BridgeStatus(
            registered=self._registered is not None,
            atropos_url=self.cfg.atropos_url if self.atropos is not None else "",
            atropos_reachable=self.atropos is not None and self.atropos.reachable,
            weight_version=self.weights.current_version,
            servers=[_server_to_proto(server) for server in self.weights.snapshot()],
            weight_pushes=self.weights.pushes,
            servers_behind=self.weights.servers_behind,
            mode=self.cfg.mode,
            routed_experts=self._routed_experts_status(),
            **snapshot,
        )

    def _routed_experts_status(self) -> bridge_pb2.RoutedExpertsCapture:
        store = self.pipeline.routed_experts if self.pipeline is not None else None
        if store is None:
            return bridge_pb2.RoutedExpertsCapture(enabled=False)
        counts = store.snapshot()
        fields = bridge_pb2.RoutedExpertsCapture.DESCRIPTOR.fields_by_name
        return bridge_pb2.RoutedExpertsCapture(
            enabled=True,
            shape_registered=self._routing_shape is not None,
            **{name: value for name, value in counts.items() if name in fields},
        )

    def _waiting_fields(self) -> dict:
        """BridgeStatus's Atropos view, named stalls and waiting times."""
        now = time.monotonic()
        wait = self.pipeline.wait_state()
        named = stalls.diagnose(self.stall_snapshot(), now, self.stall_policy)
        return {
            "atropos": _atropos_to_proto(self.watch.view if self.watch else None, now),
            "stalls": [bridge_pb2.Stall(code=s.code, message=s.message) for s in named],
            "seconds_since_batch": -1.0 if wait.last_handed_out is None else now - wait.last_handed_out,
            "seconds_without_batch": 0.0 if wait.no_batch_since is None else now - wait.no_batch_since,
            "last_acked_batch_id": wait.last_acked_batch_id,
            "last_acked_step": wait.last_acked_step,
        }

    def PushWeights(self, request_iterator, context):  # noqa: N802
        messages = iter(request_iterator)
        first = next(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a weight push starts with a header")
        try:
            header = _push_header(first.header)
            push = self.weights.begin_push(header)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PushRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        try:
            if header.transport == "grpc" and self._shared_buffer is None:
                from atropos_megatron.bridge.tensor_payload import SharedBuffer  # torch: grpc transport only

                self._shared_buffer = SharedBuffer()
            _feed_push(
                push, messages, self._shared_buffer, max_bucket_bytes=self.weights.cfg.max_bucket_bytes
            )
        except _BadStream as exc:
            push.abort(str(exc))
            context.abort(exc.code, str(exc))
        except BaseException as exc:  # the trainer went away mid-stream, or a bug: never leave a push open
            push.abort(f"{type(exc).__name__}: {exc}")
            raise
        result = push.finish()
        if self.weights.servers and not any(server.updated for server in result.servers):
            errors = "; ".join(f"{s.url}: {s.last_error}" for s in result.servers)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no inference server took the weights ({errors})")
        return bridge_pb2.PushWeightsResponse(
            weight_version=result.weight_version,
            buckets=result.buckets,
            bytes=result.bytes,
            seconds=result.seconds,
            servers=[_server_to_proto(server) for server in result.servers],
        )

    def _require_job_mode(self, context) -> None:
        if self.pipeline is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this bridge runs as a per-node weights agent (bridge.mode=agent): it serves no batches",
            )


class _BadStream(ValueError):
    """A malformed PushWeights stream; ``code`` is the gRPC status to answer with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


def _push_header(header: bridge_pb2.WeightsHeader) -> PushHeader:
    """The push header in the bridge's terms; ValueError names what is missing."""
    if header.transport not in TRANSPORT_NAMES:
        raise ValueError("header.transport must be GRPC, DISTRIBUTED or DISK")
    if not header.weight_version:
        raise ValueError("header.weight_version is empty")
    transport = TRANSPORT_NAMES[header.transport]
    if transport == "disk" and not header.disk_path:
        raise ValueError("the DISK transport needs header.disk_path")
    group = None
    if transport == "distributed":
        g = header.group
        if not g.group_name:
            raise ValueError("the DISTRIBUTED transport needs header.group.group_name")
        if g.init and not (g.master_address and g.master_port and g.backend and g.world_size >= 2):
            raise ValueError(
                "creating the DISTRIBUTED group needs header.group master_address, master_port, backend "
                "and world_size >= 2"
            )
        group = GroupSpec(g.master_address, g.master_port, g.group_name, g.backend, g.world_size, g.init)
    lora = None
    if header.HasField("lora"):
        if transport == "distributed":
            raise ValueError("a LoRA adapter push needs the GRPC or DISK transport")
        if not header.lora.name:
            raise ValueError("header.lora.name is empty")
        try:
            config = json.loads(header.lora.config_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"header.lora.config_json is not JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError("header.lora.config_json must be a JSON object (adapter_config.json)")
        lora = LoraPush(header.lora.name, config)
    return PushHeader(header.weight_version, transport, header.disk_path, group, lora)


def _bucket_tensors(bucket: bridge_pb2.WeightBucket) -> list[BucketTensor]:
    tensors = []
    for spec in bucket.tensors:
        if spec.dtype not in WEIGHT_DTYPE_NAMES:
            raise _BadStream(f"{spec.name}: weights must be float32, bfloat16 or float16")
        if any(size < 0 for size in spec.shape) or not spec.name:
            raise _BadStream(f"bucket {bucket.index}: a tensor without a name or with a negative size")
        tensors.append(BucketTensor(spec.name, WEIGHT_DTYPE_NAMES[spec.dtype], tuple(spec.shape)))
    if not tensors:
        raise _BadStream(f"bucket {bucket.index} is empty")
    return tensors


def _feed_push(push: WeightPush, messages, shared, *, max_bucket_bytes: int) -> None:
    """Apply each bucket of the stream as soon as it is whole (GRPC) or announced (DISTRIBUTED).

    ``messages`` are ``WeightsChunk`` protos, or ``weight_wire.DataChunk`` for data (our own decoder).
    """
    transport = push.header.transport
    pending = None  # GRPC: the bucket whose bytes are arriving
    for message in messages:
        part = "data" if isinstance(message, DataChunk) else message.WhichOneof("part")
        if part == "bucket":
            if transport == "disk":
                raise _BadStream("the DISK transport sends no buckets")
            if pending is not None:
                raise _BadStream(
                    f"bucket {message.bucket.index} started before the previous one was complete"
                )
            tensors = _bucket_tensors(message.bucket)
            if push.header.lora is not None and push.result.buckets:
                raise _BadStream("a LoRA adapter push carries its adapter in one bucket")
            if message.bucket.nbytes > max_bucket_bytes:
                raise _BadStream(
                    f"bucket {message.bucket.index} has {message.bucket.nbytes} bytes; weights.max_bucket_bytes "
                    f"is {max_bucket_bytes}",
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
            if transport == "distributed":
                push.apply_distributed_bucket(tensors, message.bucket.nbytes)
                continue
            from atropos_megatron.bridge.tensor_payload import SharedBucket  # torch, only for this path

            pending = SharedBucket(tensors, shared)
            if pending.nbytes != message.bucket.nbytes:
                raise _BadStream(
                    f"bucket {message.bucket.index}: nbytes {message.bucket.nbytes} != {pending.nbytes} implied "
                    "by its tensors"
                )
            if pending.complete:  # only zero-sized tensors: no data messages follow
                push.apply_tensor_bucket(pending)
                pending = None
        elif part == "data":
            if pending is None:
                raise _BadStream("bytes arrived outside a GRPC bucket")
            try:
                pending.write(message.data)
            except ValueError as exc:
                raise _BadStream(str(exc)) from exc
            if pending.complete:
                push.apply_tensor_bucket(pending)
                pending = None
        else:
            raise _BadStream("a second header in one push")
    if pending is not None:
        raise _BadStream("the stream ended inside a bucket")


def _server_to_proto(server: ServerSnapshot) -> bridge_pb2.InferenceServerStatus:
    return bridge_pb2.InferenceServerStatus(
        url=server.url,
        healthy=server.healthy,
        weight_version=server.weight_version,
        sglang_version=server.sglang_version,
        tp_size=server.tp_size,
        last_error=server.last_error,
        updated=server.updated,
        cache_flushes_skipped=server.flushes_skipped,
    )


def _atropos_to_proto(view: stalls.AtroposView | None, now: float) -> bridge_pb2.AtroposQueue:
    if view is None:
        return bridge_pb2.AtroposQueue(observed=False)
    return bridge_pb2.AtroposQueue(
        observed=True,
        reachable=view.reachable,
        error=view.error,
        age_s=now - view.observed_at,
        batches_formed=view.batches_formed,
        queued_groups=view.queued_groups,
        batch_size=view.batch_size,
        max_token_len=view.max_token_len,
        largest_group=view.largest_group,
        min_allocation_claimed=view.min_allocation_claimed,
        posting_rate=-1.0 if view.posting_rate is None else view.posting_rate,
        seconds_since_posted=-1.0 if view.last_posted is None else now - view.last_posted,
        envs=[
            bridge_pb2.AtroposEnv(
                env_id=env.env_id,
                queued_groups=env.queued_groups,
                seconds_quiet=now - env.last_active,
                weight=env.weight,
                disconnected=env.disconnected,
            )
            for env in view.envs
        ],
    )
