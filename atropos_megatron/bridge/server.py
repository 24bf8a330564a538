"""Run the bridge: build its parts from config, serve gRPC (with health, optional token and TLS).

``create_server`` binds and returns the port (tests bind port 0); ``serve`` runs until SIGTERM or
SIGINT and then drains in-flight calls. The address comes from config and is loopback by default.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from atropos_megatron.bridge.atropos_client import AtroposClient
from atropos_megatron.bridge.client import BridgeClient
from atropos_megatron.bridge.pipeline import BatchPipeline
from atropos_megatron.bridge.service import BridgeService
from atropos_megatron.bridge.spool import BatchSpool
from atropos_megatron.bridge.v1 import bridge_pb2
from atropos_megatron.bridge.weight_sync import PushHeader, ServerSnapshot, WeightSync
from atropos_megatron.bridge.weight_wire import decode_chunk
from atropos_megatron.config import BridgeConfig, WeightsConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = bridge_pb2.DESCRIPTOR.services_by_name["Bridge"].full_name
SHUTDOWN_GRACE_S = 5.0
_WORKERS = 16


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Reject every call without ``authorization: Bearer <token>`` (health checks included)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(value.encode(), self._expected):
                return continuation(handler_call_details)
        return self._deny


def build_service(cfg: BridgeConfig, weights: WeightsConfig | None = None) -> BridgeService:
    """The bridge's parts wired together from config (nothing is contacted yet)."""
    weight_sync = WeightSync(
        weights or WeightsConfig(),
        open_agent_stream=lambda address, header: _AgentStream(cfg, address, header),
    )
    if cfg.mode == "agent":
        return BridgeService(cfg, None, None, weight_sync)
    atropos = AtroposClient(
        cfg.atropos_url,
        timeout_s=cfg.request_timeout_s,
        poll_interval_s=cfg.poll_interval_s,
        poll_max_interval_s=cfg.poll_max_interval_s,
    )
    spool = BatchSpool(cfg.spool_dir)
    store = None
    if weights is not None and weights.capture_routed_experts:
        from atropos_megatron.bridge.routed_experts import RoutedExpertsStore

        store = RoutedExpertsStore(weights.routed_experts_store_bytes)

    def fetch(wait_s: float, stop: threading.Event):
        atropos.resume_step = spool.next_step  # what a re-registration after an API restart announces
        return atropos.fetch_batch(wait_s=wait_s, stop=stop)

    pipeline = BatchPipeline(spool, fetch, prefetch=cfg.prefetch_batches, routed_experts=store)
    return BridgeService(cfg, atropos, pipeline, weight_sync)


class _AgentStream:
    """A ``grpc`` push forwarded to a per-node bridge agent, with the job bridge's own credentials."""

    def __init__(self, cfg: BridgeConfig, address: str, header: PushHeader) -> None:
        self._client = BridgeClient(
            address, token=cfg.auth_token, tls_ca=cfg.tls_ca, max_message_bytes=cfg.max_message_bytes
        )
        lora = {"lora_name": header.lora.name, "lora_config": header.lora.config} if header.lora else {}
        self._stream = self._client.open_weight_push(header.weight_version, transport="grpc", **lora)

    def send_bucket(self, index, tensors, chunks) -> None:
        self._stream.send_bucket(index, tensors, chunks)

    def finish(self) -> list[ServerSnapshot]:
        try:
            response = self._stream.finish()
        finally:
            self._client.close()
        return [
            ServerSnapshot(
                s.url,
                s.healthy,
                s.weight_version,
                s.sglang_version,
                s.tp_size,
                s.last_error,
                s.updated,
                flushes_skipped=s.cache_flushes_skipped,
            )
            for s in response.servers
        ]

    def cancel(self) -> None:
        self._stream.cancel()
        self._client.close()


def create_server(
    cfg: BridgeConfig, service: BridgeService, address: str | None = None
) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``service`` on ``address`` (default ``cfg.address``); returns its port."""
    interceptors = [TokenAuthInterceptor(cfg.auth_token)] if cfg.auth_token else []
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_WORKERS), interceptors=interceptors, options=options
    )
    _add_bridge_service(service, server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = address or cfg.address
    if cfg.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the bridge to {address}")
    server.start()
    return server, port


def _add_bridge_service(service: BridgeService, server: grpc.Server) -> None:
    """Register the servicer like the generated ``add_BridgeServicer_to_server``, except PushWeights
    decodes its data messages with ``weight_wire`` (zero-copy) instead of protobuf."""
    handlers = {}
    for method in bridge_pb2.DESCRIPTOR.services_by_name["Bridge"].methods:
        request = getattr(bridge_pb2, method.input_type.name)
        response = getattr(bridge_pb2, method.output_type.name)
        make = (
            grpc.stream_unary_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        decode = decode_chunk if method.name == "PushWeights" else request.FromString
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=decode,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def serve(cfg: BridgeConfig, weights: WeightsConfig | None = None) -> None:
    """Run the bridge until SIGTERM/SIGINT, then finish in-flight calls and stop."""
    service = build_service(cfg, weights)
    proxies = start_inference_proxies(service)  # before the port opens: whoever waits on it finds them up
    server, port = create_server(cfg, service)
    security = ("TLS" if cfg.tls_cert else "plaintext") + (", token auth" if cfg.auth_token else "")
    upstream = "weights agent (no Atropos)" if cfg.mode == "agent" else f"Atropos at {cfg.atropos_url}"
    logger.info("bridge listening on %s (port %d, %s); %s", cfg.address, port, security, upstream)
    servers = service.weights.cfg.inference_servers
    logger.info("inference servers: %s", ", ".join(servers) if servers else "none configured")
    service.weights.start_monitor()
    stopped = threading.Event()

    def on_signal(signum, frame):
        if service.pipeline is not None:
            logger.info("signal %d: stopping (un-acknowledged batches stay in %s)", signum, cfg.spool_dir)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    service.stop_watch(wait_s=0)  # the other processes stop too: their absence is no stall worth a line
    server.stop(SHUTDOWN_GRACE_S).wait()
    for proxy in proxies:
        proxy.stop()
    service.weights.stop()
    if service.pipeline is not None:
        service.pipeline.stop()
        service.atropos.close()


def start_inference_proxies(service: BridgeService) -> list:
    """One proxy per inference server (``inference_proxy.py``) with ``weights.lora_sync: adapter`` (it names
    the newest adapter), ``weights.capture_routed_experts`` (it captures routings for the batches) or
    ``weights.inference_engine: vllm`` (it answers atroposlib's ``/generate`` through vLLM's token route)."""
    cfg = service.weights.cfg
    store = service.pipeline.routed_experts if service.pipeline is not None else None
    vllm = cfg.inference_engine == "vllm"
    if cfg.capture_routed_experts and store is None:
        logger.warning(
            "weights.capture_routed_experts is ignored by a bridge in agent mode: the job's bridge, which "
            "builds the batches, must run the proxies"
        )
    if cfg.lora_sync != "adapter" and store is None and not vllm:
        return []
    if not cfg.lora_proxy_ports:
        if cfg.lora_sync == "adapter":
            logger.warning(
                "weights.lora_sync is adapter but weights.lora_proxy_ports is empty: environments that name "
                "no adapter in their requests (atroposlib's do not) sample from the frozen base model"
            )
        elif vllm:
            logger.info(
                "no weights.lora_proxy_ports: environments must use server_type openai (text only, no "
                "token ids or log-probs); server_type vllm needs the bridge's /generate proxies"
            )
        return []
    from atropos_megatron.bridge.inference_proxy import start_proxies

    return start_proxies(
        service.weights.servers,
        cfg.lora_proxy_ports,
        host=cfg.lora_proxy_host,
        timeout_s=cfg.request_timeout_s,
        routed_experts=store,
        engine=cfg.inference_engine,
    )
