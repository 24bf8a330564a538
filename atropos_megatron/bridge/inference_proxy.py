"""HTTP proxies in front of the inference servers, for three jobs: name the newest LoRA adapter in every
generation request (``weights.lora_sync: adapter``), capture the experts an MoE model routed each
token to (``weights.capture_routed_experts``), and answer atroposlib's ``/generate`` on stock vLLM
(``weights.inference_engine: vllm``). Any of them; everything else passes unchanged.

Adapters: SGLang applies a LoRA adapter only to requests that name it (``lora_path`` in ``/generate`` and the
``/v1`` routes, or ``model: "<served>:<adapter>"``), and has no default adapter; atroposlib's clients
name none. With ``weights.lora_sync: adapter`` an unchanged environment would therefore sample from
the frozen base (docs/sglang-lora.md §4, §8). The bridge loads each push as a new adapter
(``policy-v<step>``) and runs one proxy per server: environments point their ``base_url`` at the
proxy, which forwards every request and response unchanged (streaming included), except that a
generation request naming no adapter gets ``lora_path`` = that server's newest adapter.

Routed experts: a ``/generate`` request with ``input_ids`` gets ``return_routed_experts: true``; its
response is read whole (not streamed), each sample's ``meta_info.routed_experts`` is stored by its
token ids for the batches (``routed_experts.py``) and removed from what the environment receives.

vLLM: stock ``vllm serve`` has no ``/generate``; a ``POST /generate`` in Atropos's shape is sent to
vLLM's ``/inference/v1/generate`` and its reply translated back (``vllm_generate.py``, docs/vllm.md §9),
so environments on ``server_type: vllm`` get token ids and log-probs. ``/health`` and ``/v1`` pass; an
adapter is named by vLLM's ``model`` instead of SGLang's ``lora_path``.

Threads, not an event loop: the bridge stays free of web frameworks, and a request's thread mostly
waits on the server.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from atropos_megatron.bridge import vllm_generate
from atropos_megatron.bridge.routed_experts import (
    CaptureRequest,
    RoutedExpertsStore,
    ask_routed_experts,
    capture_response,
)

logger = logging.getLogger(__name__)

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "host",
}  # fmt: skip


def name_adapter(path: str, body: bytes, adapter: str | None, *, engine: str = "sglang") -> bytes:
    """``body`` naming ``adapter`` when ``path`` generates and the body names no adapter of its own.

    SGLang: ``lora_path`` is set unless the body has one (an explicit ``model: "<served>:<adapter>"``
    takes priority in SGLang anyway). vLLM: ``model`` is set unless it already names one of the
    bridge's adapters (same stem as ``adapter``, e.g. ``policy-v``): vLLM selects an adapter by its name
    as the model, and environments send the served model's name there. Anything else (another route,
    no adapter yet, a body that is not a JSON object) passes unchanged.
    """
    if adapter is None or path.split("?", 1)[0] not in GENERATION_ROUTES:
        return body
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict):
        return body
    if engine == "vllm":
        model = request.get("model")
        if isinstance(model, str) and model.startswith(adapter.rstrip("0123456789")):
            return body
        request["model"] = adapter
    elif request.get("lora_path") is not None:
        return body
    else:
        request["lora_path"] = adapter
    return json.dumps(request).encode()


class InferenceProxy:
    """One server's proxy: ``http://host:port`` forwards to ``upstream`` naming ``adapter()``, with
    ``routed_experts`` capturing routings into it, and for ``engine="vllm"`` answering Atropos's
    ``/generate`` through vLLM's token route."""

    def __init__(
        self,
        upstream: str,
        adapter: Callable[[], str | None],
        *,
        host: str,
        port: int,
        timeout_s: float,
        routed_experts: RoutedExpertsStore | None = None,
        engine: str = "sglang",
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.adapter = adapter
        self.routed_experts = routed_experts
        # weights.inference_engine: how adapters are named, and whether /generate is translated
        self.engine = engine
        self.counts: Counter[str] = Counter()  # translated /generate requests, by outcome
        self._counts_lock = threading.Lock()
        self._client = httpx.Client(base_url=self.upstream, timeout=timeout_s)
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"inference-proxy-{port}", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> InferenceProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[httpx.Response, CaptureRequest | None]:
        """The upstream response (streamed: close it), and what to capture from it (None: nothing)."""
        capture = None
        if method == "POST":
            body = name_adapter(path, body, self.adapter(), engine=self.engine)
            if self.routed_experts is not None:
                body, capture = ask_routed_experts(path, body)
        request = self._client.build_request(method, path, headers=headers, content=body)
        return self._client.send(request, stream=True), capture

    def translates(self, method: str, path: str) -> bool:
        """Whether this request is Atropos's ``/generate``, to be answered through vLLM's token route."""
        return (
            self.engine == "vllm"
            and method == "POST"
            and path.split("?", 1)[0] == vllm_generate.ATROPOS_ROUTE
        )

    def generate_via_vllm(self, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        """Atropos's ``/generate`` answered through vLLM's ``/inference/v1/generate``: (status, JSON).

        vLLM's own errors pass through with their status; a refused translation is 400, an aborted
        sample 503 (atroposlib retries it), a reply of another shape 502, an unreachable server 502.
        """
        try:
            request = vllm_generate.to_scale_out(json.loads(body or b"null"), adapter=self.adapter())
        except ValueError as exc:  # TranslationError, or the body is not JSON
            return self._refuse(400, "refused", f"Atropos /generate request: {exc}")
        headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "accept-encoding")}
        upstream = self._client.post(vllm_generate.SCALE_OUT_ROUTE, json=request.body, headers=headers)
        if upstream.status_code != 200:
            first = self._count(f"vllm_{upstream.status_code}") == 1
            reply = _json_or_text(upstream)
            if first and upstream.status_code == 403 and "--enable-scale-out" in json.dumps(reply):
                logger.warning(  # once: every request would say the same
                    "%s refuses %s: start vllm serve with --enable-scale-out (the launcher does) so "
                    "environments on server_type vllm get token ids and log-probs",
                    self.upstream, vllm_generate.SCALE_OUT_ROUTE,
                )  # fmt: skip
            return upstream.status_code, reply
        try:
            translated = vllm_generate.to_atropos(upstream.json(), request)
        except vllm_generate.GenerationAborted as exc:
            return self._refuse(503, "aborted", str(exc))
        except (vllm_generate.UnexpectedReply, ValueError) as exc:
            if self.counts["unexpected_reply"] == 0:  # once: the server's version, not one request, differs
                logger.warning("%s%s answered a reply the translator refuses: %s", self.upstream,
                               vllm_generate.SCALE_OUT_ROUTE, exc)  # fmt: skip
            return self._refuse(502, "unexpected_reply", f"{self.upstream}: {exc}")
        self._count("translated")
        return 200, translated

    def _refuse(self, status: int, outcome: str, message: str) -> tuple[int, dict]:
        self._count(outcome)
        return status, {"error": {"message": message, "code": status}}

    def _count(self, outcome: str) -> int:
        """Count one ``outcome``; how many there have been."""
        with self._counts_lock:
            self.counts[outcome] += 1
            return self.counts[outcome]

    def captured_body(self, capture: CaptureRequest, upstream: httpx.Response) -> bytes:
        """The whole (decoded) response body with the routings taken out and stored."""
        content = upstream.read()
        if upstream.status_code != 200:
            return content
        return capture_response(capture, content, self.routed_experts)


def _handler_for(proxy: InferenceProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._forward()

        def do_POST(self) -> None:  # noqa: N802
            self._forward()

        def do_DELETE(self) -> None:  # noqa: N802
            self._forward()

        def _forward(self) -> None:
            body = self._read_body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            try:
                if proxy.translates(self.command, self.path):
                    self._send_json(*proxy.generate_via_vllm(headers, body))
                    return
                upstream, capture = proxy.forward(self.command, self.path, headers, body)
            except httpx.HTTPError as exc:
                self._send_json(502, {"error": {"message": f"{proxy.upstream} unreachable: {exc}"}})
                return
            try:
                if capture is not None:
                    self._send_whole(upstream, proxy.captured_body(capture, upstream))
                    return
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.multi_items():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in upstream.iter_raw():  # as sent (a compressed body stays compressed)
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()  # streamed responses reach the client as they come
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, httpx.HTTPError):
                self.close_connection = True  # the client or the server went away mid-response
            finally:
                upstream.close()

        def _send_json(self, status: int, reply: dict | str) -> None:
            content = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def _send_whole(self, upstream: httpx.Response, content: bytes) -> None:
            """A rewritten body: decoded (no Content-Encoding) with its own length."""
            self.send_response(upstream.status_code)
            for key, value in upstream.headers.multi_items():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-encoding":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - a line per request is noise
            logger.debug("%s -> %s: " + format, self.client_address[0], proxy.upstream, *args)

    return Handler


def _json_or_text(response: httpx.Response) -> dict | str:
    try:
        return response.json()
    except ValueError:
        return response.text


def start_proxies(
    servers,
    ports: list[int],
    *,
    host: str,
    timeout_s: float,
    routed_experts: RoutedExpertsStore | None = None,
    engine: str = "sglang",
) -> list[InferenceProxy]:
    """One started proxy per server (``ServerState``s, same order as ``ports``), naming its adapter (if
    any), capturing routings into ``routed_experts`` (if given) and translating Atropos's ``/generate``
    for vLLM (``engine="vllm"``)."""
    proxies = []
    for server, port in zip(servers, ports, strict=True):
        proxy = InferenceProxy(
            server.url,
            lambda server=server: server.adapter,
            host=host,
            port=port,
            timeout_s=timeout_s,
            routed_experts=routed_experts,
            engine=engine,
        )
        proxies.append(proxy.start())
        jobs = (
            "vLLM /generate"
            if engine == "vllm"
            else "routed-experts capture"
            if routed_experts is not None
            else "LoRA adapter"
        )
        logger.info("%s proxy %s -> %s (environments' base_url)", jobs, proxy.url, server.url)
    return proxies
