"""A counting reverse proxy in front of the Atropos API, for the chaos run.

The environment posts its scored groups through it (its ``--env.rollout_server_url`` points here);
everything is forwarded unchanged and the groups of every POST ``/scored_data`` (one group) and
``/scored_data_list`` (a list; bodies of 1 KiB or more come gzipped from atroposlib) that the API
accepted are counted, so that "groups posted by the environment" is measured at the boundary without
changing the environment. While the API is down the proxy hangs up, as the API's closed port would.
It runs as a thread of the chaos process and is never killed.
"""

from __future__ import annotations

import gzip
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"


class GroupCounter:
    """What the proxy saw (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.posted = 0
        """Groups in POSTs the API answered 2xx."""
        self.refused = 0
        """Groups in POSTs that failed (API down or 5xx), per attempt: the environment retries them
        (atroposlib: 3 attempts), then drops them."""
        self.registered_unix = 0.0
        """When the environment last registered successfully (``/register-env``, status success)."""

    def add(self, *, posted: int = 0, refused: int = 0, registered: bool = False) -> None:
        with self._lock:
            self.posted += posted
            self.refused += refused
            if registered:
                self.registered_unix = time.time()


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}


class _Proxy(BaseHTTPRequestHandler):
    """Forwards every request unchanged to ``server.upstream`` and counts what matters."""

    server: CountingProxy

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        self._forward()

    do_POST = do_PUT = do_DELETE = do_GET  # noqa: N815

    def _forward(self) -> None:
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if body or self.command in ("POST", "PUT"):
            headers["Content-Length"] = str(len(body))
        try:
            upstream = http.client.HTTPConnection(*self.server.upstream, timeout=300)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                status, reply_headers, reply = response.status, response.getheaders(), response.read()
            finally:
                upstream.close()
        except (OSError, http.client.HTTPException):
            # Hang up without an answer: the environment sees a dropped connection, as it would
            # see a refused one without the proxy (an HTTP 502 could take another path in its code).
            self._count(body, 0, {}, b"")
            self.close_connection = True
            return
        self._count(body, status, dict(reply_headers), reply)  # the API has it even if the env hears nothing
        try:
            self.send_response(status)
            for name, value in reply_headers:
                if name.lower() not in _HOP_HEADERS:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the environment gave up on the request (a cancelled worker, or it was killed)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _count(self, body: bytes, status: int, reply_headers: dict[str, str], reply: bytes) -> None:
        path = urlsplit(self.path).path
        if self.command == "POST" and path in ("/scored_data", "/scored_data_list"):
            groups = _groups_in(body, self.headers.get("Content-Encoding", ""))
            if 200 <= status < 300:
                self.server.counter.add(posted=groups)
            else:
                self.server.counter.add(refused=groups)
        elif self.command == "POST" and path == "/register-env" and status == 200:
            answer = _json_or_none(reply, reply_headers.get("Content-Encoding", ""))
            if isinstance(answer, dict) and answer.get("status") == "success":
                self.server.counter.add(registered=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the roles log
        pass


class CountingProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, counter: GroupCounter) -> None:
        super().__init__((HOST, 0), _Proxy)
        self.counter = counter
        self.upstream: tuple[str, int] = (HOST, 0)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"


def _json_or_none(data: bytes, encoding: str) -> Any:
    try:
        return json.loads(gzip.decompress(data) if "gzip" in encoding.lower() else data)
    except (OSError, ValueError):
        return None


def _groups_in(body: bytes, encoding: str) -> int:
    """Groups in a ``/scored_data`` (an object) or ``/scored_data_list`` (a list) body (gzip or not)."""
    payload = _json_or_none(body, encoding)
    if isinstance(payload, list):
        return len(payload)
    return 1 if isinstance(payload, dict) else 0
