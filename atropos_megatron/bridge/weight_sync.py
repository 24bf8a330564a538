"""Keep every inference server on the trainer's newest weights: one push at a time, all servers at once.

A push (one ``PushWeights`` stream) runs the same phases on every reachable server in parallel, each
server through its engine's ``inference_client.InferenceClient`` (``weights.inference_engine``): pause
-> begin the update -> one update call per bucket -> the finishing steps (tag ``weight_version``) ->
resume. With SGLang that is its recommended sequence (notes/sglang-protocol.md §1.9):
``pause_generation`` -> ``begin_weight_update`` (0.5.21+) -> updates -> ``end_weight_update`` ->
``flush_cache`` -> ``update_weight_version`` -> ``continue_generation``; with vLLM, its RL routes
(``vllm_client.py``): ``/pause`` -> ``/start_weight_update`` -> ``/update_weights`` ->
``/finish_weight_update`` -> ``/resume``. Each call is retried with backoff; a server that still fails
drops out of the push, stays paused (it may hold a mix of old and new tensors, and must not serve
that) and is reported unhealthy. Every push carries the full weights, so the next one brings it up to
date. A transport (or adapter push) the engine cannot take is refused before anything is paused.

Between pushes a monitor thread checks each server (every ``weights.health_interval_s``, and an
unreachable one every ``RECHECK_S`` until it answers). One that comes back behind the current
``weight_version`` (restarted with its initial weights, say) is paused as soon as it answers, so
environments sample from a stale policy for at most about ``RECHECK_S`` after its HTTP port opens;
the next push updates it and lets it continue. GetStatus reports such servers (``servers_behind``):
a trainer with no batch to train pushes its weights again for them, since with a single server no
batch would ever come (the environments wait for that paused server).

Per-node agents (``weights.bridge_agents``) receive ``grpc`` pushes as a forwarded stream and apply
them to their own node's servers: tensors travel through shared memory, which only works on one host.

A LoRA adapter push (``weights.lora_sync: adapter``; the header names the adapter) pauses nothing
and opens no session (a new adapter changes no weight a running request uses): the adapter is loaded
under a new name per push
(``/load_lora_adapter_from_tensors`` from the one bucket, or ``/load_lora_adapter`` from the PEFT
directory on disk), and each server's newest adapter is what the adapter proxies
(``bridge/inference_proxy.py``) name in requests from then on. Versioned names, not one name updated in
place: every request runs from start to end on one adapter. The adapter before the newest stays
loaded for one more push (a request the proxy named it in may still be on its way to the server, and
SGLang fails a request whose adapter is gone); older ones are unloaded in the background (SGLang
returns only when the requests using them have finished).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from atropos_megatron.bridge.client import weight_nbytes
from atropos_megatron.bridge.inference_client import (
    GroupJoin,
    InferenceClient,
    InferenceError,
    ServerInfo,
    build_client,
)
from atropos_megatron.config import KEPT_ADAPTERS, WeightsConfig
from atropos_megatron.logs import FirstTimeInfo

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
RECHECK_S = 0.25
"""How often an unreachable server is probed: a restarted one is paused this soon after it answers."""


class PushRefused(RuntimeError):
    """The push cannot start (another is running, or a distributed group no longer matches the servers)."""


@dataclass(frozen=True)
class GroupSpec:
    """The ``distributed`` transport's broadcast group, as the trainer (rank 0) created it."""

    master_address: str
    master_port: int
    group_name: str
    backend: str
    world_size: int
    init: bool


@dataclass(frozen=True)
class LoraPush:
    """The LoRA adapter a push carries instead of full weights."""

    name: str
    config: dict[str, Any]
    """Its PEFT ``adapter_config.json`` (SGLang's ``config_dict``)."""


@dataclass(frozen=True)
class PushHeader:
    weight_version: str
    transport: str  # "grpc" | "distributed" | "disk"
    disk_path: str = ""
    group: GroupSpec | None = None
    lora: LoraPush | None = None


@dataclass(frozen=True)
class BucketTensor:
    """One tensor of a bucket: HF name, SGLang dtype name (``"bfloat16"``), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return weight_nbytes(self.dtype, self.shape)


@dataclass
class ServerState:
    """What the bridge knows about one inference server."""

    url: str
    client: InferenceClient
    info: ServerInfo | None = None
    reachable: bool = False
    weight_version: str = ""
    last_error: str = ""
    held: bool = False  # paused by the bridge because it is behind; released by the next push
    flushes_skipped: int = 0  # updates after which the server refused /flush_cache (requests in flight)
    adapters: list[str] = field(
        default_factory=list
    )  # LoRA adapters it holds, oldest first (lora_sync: adapter)

    @property
    def adapter(self) -> str | None:
        """The newest LoRA adapter it holds (what the proxy names); None: the base model only."""
        return self.adapters[-1] if self.adapters else None

    def snapshot(self, *, updated: bool = False) -> ServerSnapshot:
        return ServerSnapshot(
            url=self.url,
            healthy=self.reachable,
            weight_version=self.weight_version,
            sglang_version=self.info.label if self.info else "",  # the engine's release (vLLM: "vllm X")
            tp_size=self.info.tp_size if self.info else 0,
            last_error=self.last_error,
            updated=updated,
            flushes_skipped=self.flushes_skipped,
        )


@dataclass(frozen=True)
class ServerSnapshot:
    url: str
    healthy: bool
    weight_version: str
    sglang_version: str
    tp_size: int
    last_error: str
    updated: bool = False
    flushes_skipped: int = 0


@dataclass
class PushResult:
    weight_version: str
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    servers: list[ServerSnapshot] = field(default_factory=list)


class WeightSync:
    """Every configured server and agent, the current weight version, and the one running push."""

    def __init__(
        self,
        cfg: WeightsConfig,
        *,
        open_agent_stream: Callable[[str, PushHeader], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.servers = [
            ServerState(
                url,
                build_client(
                    cfg.inference_engine,
                    url,
                    admin_api_key=cfg.admin_api_key,
                    timeout_s=cfg.request_timeout_s,
                ),
            )
            for url in cfg.inference_servers
        ]
        self.current_version = ""
        self.pushes = 0
        self._open_agent_stream = open_agent_stream
        self._push_lock = threading.Lock()
        self.push_log, self.done_log = FirstTimeInfo(), FirstTimeInfo()  # a push per step: INFO once
        self._state_lock = threading.Lock()
        self._group_members: tuple[str, ...] = ()
        self._last_check = float("-inf")
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, 2 * len(self.servers)), thread_name_prefix="weights"
        )

    # -- monitoring -----------------------------------------------------------------------------

    def start_monitor(self) -> None:
        if self.cfg.health_interval_s > 0 and self.servers and self._monitor is None:
            self._monitor = threading.Thread(target=self._monitor_loop, name="weights-monitor", daemon=True)
            self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=HEALTH_TIMEOUT_S + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            server.client.close()

    def check_servers(self) -> None:
        """One health round: refresh each server's reachability and version; hold the ones behind."""
        if self._push_lock.locked():
            return  # a push is talking to the servers; its own results are fresher
        list(self._pool.map(self._check, self.servers))
        self._last_check = time.monotonic()

    def refresh(self) -> None:
        """Check the servers unless the monitor did within its interval (GetStatus must not be stale:
        the trainer sizes the ``distributed`` group from it)."""
        interval = self.cfg.health_interval_s
        if interval <= 0 or time.monotonic() - self._last_check > interval:
            self.check_servers()

    @property
    def servers_behind(self) -> int:
        """Servers paused because they serve an older weight_version than the last push."""
        return sum(server.held and server.reachable for server in self.servers)

    def _monitor_loop(self) -> None:
        next_round = time.monotonic() + self.cfg.health_interval_s
        while not self._stop.wait(min(RECHECK_S, self.cfg.health_interval_s)):
            try:
                if time.monotonic() >= next_round:
                    self.check_servers()
                    next_round = time.monotonic() + self.cfg.health_interval_s
                elif not self._push_lock.locked():  # a restarted server must be paused before it serves
                    for server in [s for s in self.servers if not s.reachable]:
                        self._check(server)
            except Exception:  # noqa: BLE001 - the monitor must never die
                logger.exception("weight-server health check failed")

    def _check(self, server: ServerState) -> None:
        try:
            info = server.client.server_info(timeout_s=HEALTH_TIMEOUT_S)
        except InferenceError as exc:
            if server.reachable:
                logger.warning("inference server %s is unreachable: %s", server.url, exc)
            server.reachable, server.last_error = False, str(exc)
            return
        if not server.reachable:
            logger.info(
                "inference server %s is reachable (weight_version %r)", server.url, info.weight_version
            )
            server.held = False  # possibly a new process: whatever paused the old one is gone
            server.adapters = []  # ... and so are its adapters (the next push loads one again)
        server.info, server.reachable, server.weight_version = info, True, info.weight_version
        if not self.current_version or info.weight_version == self.current_version:
            return
        try:  # behind: pausing again is harmless, and covers a restart between two checks
            server.client.pause(self.cfg.pause_mode)
        except InferenceError as exc:
            server.last_error = str(exc)
            return
        server.last_error = f"behind: serves {info.weight_version!r}, current is {self.current_version!r}"
        if not server.held:
            logger.warning("%s: %s; paused until the next push", server.url, server.last_error)
        server.held = True

    def snapshot(self) -> list[ServerSnapshot]:
        return [server.snapshot() for server in self.servers]

    # -- pushes ---------------------------------------------------------------------------------

    def begin_push(self, header: PushHeader) -> WeightPush:
        """Start a push: pause and open a session on every reachable server. Raises PushRefused."""
        if not self._push_lock.acquire(blocking=False):
            raise PushRefused("another weight push is still running")
        try:
            push = WeightPush(self, header)
            push.start()
        except BaseException:
            self._push_lock.release()
            raise
        return push

    def _push_done(self, push: WeightPush, *, succeeded: bool) -> None:
        if succeeded:
            self.current_version = push.header.weight_version
            self.pushes += 1
        self._push_lock.release()


class WeightPush:
    """One weight update across servers (and agents). Use through :meth:`WeightSync.begin_push`."""

    def __init__(self, sync: WeightSync, header: PushHeader) -> None:
        self.sync = sync
        self.cfg = sync.cfg
        self.header = header
        self.result = PushResult(weight_version=header.weight_version)
        self._started = time.monotonic()
        self._active: list[ServerState] = []
        self._agents: list[tuple[str, Any]] = []
        self._group_inits: list = []
        self._closed = False

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        sync = self.sync
        for server in sync.servers:
            reason = server.client.refusal(self.header.transport, adapter=self.header.lora is not None)
            if reason:
                raise PushRefused(f"{server.url} ({server.client.engine}): {reason}")
        probed = list(sync._pool.map(self._probe, sync.servers))
        self._active = [server for server, ok in zip(sync.servers, probed, strict=True) if ok]
        new_group = self.header.transport == "distributed" and self._check_group()
        if self.header.transport == "grpc":
            for address in self.cfg.bridge_agents:
                self._agents.append((address, sync._open_agent_stream(address, self.header)))
        if new_group:
            offsets = self._rank_offsets()
            self._start_group_init(offsets, early=True)
        self._each(self._prepare)
        if new_group:
            self._start_group_init(offsets, early=False)
        logger.log(
            self.sync.push_log.level(),
            "weight push %r (%s) to %d server(s)%s",
            self.header.weight_version,
            self.header.transport,
            len(self._active),
            f" and {len(self._agents)} agent(s)" if self._agents else "",
        )

    def _probe(self, server: ServerState) -> bool:
        try:
            server.info = server.client.server_info(timeout_s=HEALTH_TIMEOUT_S)
        except InferenceError as exc:
            server.reachable, server.last_error = False, str(exc)
            logger.warning("weight push %r skips %s: %s", self.header.weight_version, server.url, exc)
            return False
        server.reachable, server.weight_version = True, server.info.weight_version
        return True

    def _check_group(self) -> bool:
        """Whether this push creates the group (else it reuses the one made with the same servers)."""
        group = self.header.group
        if group is None:
            raise PushRefused("the distributed transport needs a group in the header")
        members = tuple(server.url for server in self._active)
        expected = 1 + sum(server.info.tp_size for server in self._active)
        if group.init and group.world_size != expected:
            raise PushRefused(
                f"group world_size {group.world_size} != 1 + the TP ranks of the {len(members)} reachable "
                f"server(s) ({expected}); read GetStatus and create the group again"
            )
        if not group.init and members != self.sync._group_members:
            raise PushRefused("the servers changed since the group was created; push again with init=true")
        return group.init

    def _prepare(self, server: ServerState) -> None:
        if self.header.lora is not None:
            return  # a new adapter changes no weight a running request uses: nothing to pause
        self._retrying(server, "pause", lambda: server.client.pause(self.cfg.pause_mode))
        server.held = True
        self._retrying(server, "begin_update", lambda: server.client.begin_update(server.info))

    def _rank_offsets(self) -> dict[str, int]:
        """Each server's first rank in the group: the trainer is rank 0, servers follow in order."""
        offsets, offset = {}, 1
        for server in self._active:
            offsets[server.url] = offset
            offset += server.info.tp_size
        return offsets

    def _start_group_init(self, offsets: dict[str, int], *, early: bool) -> None:
        """Make the servers join the trainer's new group: before ``begin_update`` (``early``) for
        engines whose ``group_before_update`` says so, after it for the others."""
        group = self.header.group
        servers = [s for s in self._active if s.client.group_before_update == early]
        for server in servers:  # drop any previous group of this name; a fresh server has none
            with contextlib.suppress(InferenceError):
                server.client.reset_weight_group(group.group_name)
        for server in servers:
            join = GroupJoin(
                group.master_address,
                group.master_port,
                offsets[server.url],
                group.world_size,
                group.group_name,
                group.backend,
            )
            # Returns only once the trainer has joined the rendezvous, so it runs in the background.
            self._group_inits.append((server, self.sync._pool.submit(server.client.init_weight_group, join)))
        self.sync._group_members = tuple(server.url for server in self._active)

    def _await_group(self) -> None:
        for server, future in self._group_inits:
            try:
                future.result()
            except InferenceError as exc:
                self._drop(server, f"init_weight_group: {exc}")
        self._group_inits = []

    # -- buckets --------------------------------------------------------------------------------

    def apply_tensor_bucket(self, bucket) -> None:
        """``grpc`` transport: ``bucket`` is a complete ``tensor_payload.SharedBucket``; with a LoRA
        header it is the whole adapter (one bucket per adapter push: ``service._feed_push`` checks)."""
        lora = self.header.lora

        def payloads(server: ServerState) -> list[str]:
            return [bucket.payload() for _ in range(server.info.tp_size)]

        def update(server: ServerState) -> None:
            client = server.client
            if lora is None:
                self._retrying(
                    server, "update_from_tensor", lambda: client.update_from_tensor(payloads(server))
                )
            else:
                self._retrying(
                    server,
                    "load_adapter_from_tensors",
                    lambda: client.load_adapter_from_tensors(lora.name, lora.config, payloads(server)),
                )

        forwards = [
            (address, stream, self.sync._pool.submit(self._forward, stream, bucket))
            for address, stream in self._agents
        ]
        self._each(update)
        for address, stream, future in forwards:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - one agent failing must not stop the others
                logger.warning("agent %s dropped from push %r: %s", address, self.header.weight_version, exc)
                stream.cancel()
                self._agents.remove((address, stream))
        self._count(bucket.nbytes)

    def _forward(self, stream, bucket) -> None:
        tensors = [(t.name, t.dtype, t.shape) for t in bucket.tensors]
        # Copied: the stream encodes queued chunks later, and the next bucket reuses the shared buffer.
        chunks = (bytes(chunk) for chunk in bucket.chunks(4 * 1024 * 1024))
        stream.send_bucket(self.result.buckets, tensors, chunks)

    def apply_distributed_bucket(self, tensors: Sequence[BucketTensor], nbytes: int) -> None:
        """``distributed`` transport: announce the bucket; the trainer's broadcast carries the bytes.

        No retries: a broadcast happens once. A server that fails leaves the group; the trainer must
        create a new group for the next push (GetStatus shows who is left).
        """
        self._await_group()
        names, dtypes = [t.name for t in tensors], [t.dtype for t in tensors]
        shapes = [list(t.shape) for t in tensors]

        def update(server: ServerState) -> None:
            try:
                server.client.update_from_group(
                    names, dtypes, shapes, group_name=self.header.group.group_name
                )
            except InferenceError as exc:
                self._drop(server, f"update_from_group: {exc}")
                self.sync._group_members = ()  # the group lost a member: it must be created again

        self._each(update, drop_on_error=False)
        self._count(nbytes)

    def _count(self, nbytes: int) -> None:
        self.result.buckets += 1
        self.result.bytes += nbytes

    # -- end ------------------------------------------------------------------------------------

    def finish(self) -> PushResult:
        """Load from disk (``disk``), then end, flush, version and continue every server."""
        if self.header.transport == "distributed":
            self._await_group()
        if self.header.transport == "disk" and self.header.lora is not None:
            name, path = self.header.lora.name, self.header.disk_path
            self._each(lambda s: self._retrying(s, "load_adapter", lambda: s.client.load_adapter(name, path)))
        elif self.header.transport == "disk":
            path = self.header.disk_path
            self._each(
                lambda s: self._retrying(s, "update_from_disk", lambda: s.client.update_from_disk(path))
            )
        self._each(self._complete)
        agent_servers: list[ServerSnapshot] = []
        for address, stream in self._agents:
            try:
                agent_servers.extend(stream.finish())
            except Exception as exc:  # noqa: BLE001
                logger.warning("agent %s failed push %r: %s", address, self.header.weight_version, exc)
                agent_servers.append(
                    ServerSnapshot(address, False, "", "", 0, f"bridge agent: {exc}", updated=False)
                )
        updated = {server.url for server in self._active}
        self.result.servers = [
            s.snapshot(updated=s.url in updated) for s in self.sync.servers
        ] + agent_servers
        self.result.seconds = time.monotonic() - self._started
        succeeded = bool(updated) or not self.sync.servers
        level = self.sync.done_log.level() if len(updated) == len(self.sync.servers) else logging.WARNING
        logger.log(
            level,
            "weight push %r done: %d bucket(s), %.1f MB in %.2f s; %d/%d server(s) updated%s",
            self.header.weight_version,
            self.result.buckets,
            self.result.bytes / 1e6,
            self.result.seconds,
            len(updated),
            len(self.sync.servers),
            " (later pushes that reach every server: at DEBUG)" if level == logging.INFO else "",
        )
        self._close(succeeded=succeeded)
        return self.result

    def _complete(self, server: ServerState) -> None:
        if self.header.lora is not None:
            self._complete_adapter(server)
            return
        version = self.header.weight_version
        # Only aborted requests drain while the server is paused; retracted or frozen ones stay until
        # it resumes, so retrying a flush then would only stall the push (a minute by default).
        attempts = self.cfg.flush_cache_attempts if self.cfg.pause_mode == "abort" else 1
        for step in server.client.finish_update_steps(server.info, version, flush_attempts=attempts):
            if not step.best_effort:
                self._retrying(server, step.name, step.call)
                continue
            try:  # the weights are in; a cache the server will not flush yet must not strand them
                step.call()
            except InferenceError as exc:
                self._note_flush_skipped(server, exc)
        self._retrying(server, "resume", server.client.resume)
        server.held, server.weight_version, server.last_error = False, version, ""

    def _complete_adapter(self, server: ServerState) -> None:
        """After an adapter load: name it in the proxy, retire old adapters, release a held server."""
        version = self.header.weight_version
        self._retrying(server, "set_weight_version", lambda: server.client.set_weight_version(version))
        # The proxy names it from the next request on; the one before stays for requests in transit.
        server.adapters = [*server.adapters, self.header.lora.name]
        retired, server.adapters = server.adapters[:-KEPT_ADAPTERS], server.adapters[-KEPT_ADAPTERS:]
        for name in retired:  # returns once the requests still running on it are done: never wait here
            self.sync._pool.submit(self._unload, server, name)
        if server.held:  # paused by the monitor (restarted, behind): it has the newest adapter now
            self._retrying(server, "resume", server.client.resume)
        server.held, server.weight_version, server.last_error = False, version, ""

    def _unload(self, server: ServerState, name: str) -> None:
        try:
            server.client.unload_adapter(name)
        except InferenceError as exc:  # the adapter stays loaded: memory, not correctness
            logger.warning("%s: could not unload LoRA adapter %r: %s", server.url, name, exc)

    def _note_flush_skipped(self, server: ServerState, exc: InferenceError) -> None:
        """SGLang refuses ``/flush_cache`` while requests are in flight, which retract and in_place
        pushes leave by design; the update itself is in. Said once per server, then counted."""
        server.flushes_skipped += 1
        if server.flushes_skipped == 1:
            logger.warning(
                "%s: prefix cache not flushed after the update (%s): expected while requests are in "
                "flight (pause_mode=%s); counted in bridge-status from now on, not logged again",
                server.url,
                exc,
                self.cfg.pause_mode,
            )
        else:
            logger.debug("%s: cache not flushed after the update: %s", server.url, exc)

    def abort(self, reason: str) -> None:
        """The stream broke: close sessions, keep servers paused (they may hold a mix of versions)."""
        if self._closed:
            return
        if self.header.lora is not None:  # nothing was paused; the servers keep their previous adapter
            logger.error("LoRA adapter push %r aborted: %s", self.header.weight_version, reason)
            for _, stream in self._agents:
                stream.cancel()
            self._close(succeeded=False)
            return
        logger.error("weight push %r aborted: %s; servers stay paused", self.header.weight_version, reason)
        for _, future in self._group_inits:
            future.cancel()
        for server in self._active:
            with contextlib.suppress(InferenceError):  # so that the next push can begin its own
                server.client.abandon_update(server.info)
            server.last_error = (
                f"push {self.header.weight_version!r} aborted ({reason}); paused until the next push"
            )
        for _, stream in self._agents:
            stream.cancel()
        if self.header.transport == "distributed":
            self.sync._group_members = ()
        self._close(succeeded=False)

    def _close(self, *, succeeded: bool) -> None:
        self._closed = True
        self.sync._push_done(self, succeeded=succeeded)

    # -- plumbing -------------------------------------------------------------------------------

    def _each(self, call: Callable[[ServerState], None], *, drop_on_error: bool = True) -> None:
        """Run ``call`` on every active server in parallel; a server whose call raises drops out."""
        servers = list(self._active)
        futures = [self.sync._pool.submit(call, server) for server in servers]
        for server, future in zip(servers, futures, strict=True):
            try:
                future.result()
            except InferenceError as exc:
                if drop_on_error:
                    self._drop(server, str(exc))

    def _retrying(self, server: ServerState, what: str, call: Callable[[], None]) -> None:
        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.update_retries + 1):
            try:
                call()
                return
            except InferenceError as exc:
                if attempt == self.cfg.update_retries:
                    raise
                logger.warning(
                    "%s %s failed (%s); retry %d in %.1f s", server.url, what, exc, attempt + 1, delay
                )
                time.sleep(delay)
                delay *= 2

    def _drop(self, server: ServerState, error: str) -> None:
        with self.sync._state_lock:
            if server in self._active:
                self._active.remove(server)
        server.last_error = error
        server.reachable = False
        logger.error(
            "%s dropped from weight push %r: %s (it stays paused until a push reaches it)",
            server.url,
            self.header.weight_version,
            error,
        )
