"""The bridge's LoRA adapter proxy: which requests get the newest adapter named, and that everything
else (other routes, methods, status codes, headers, streamed bodies) passes through unchanged."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from atropos_megatron.bridge.inference_proxy import InferenceProxy, name_adapter


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions", "/generate?x=1"])
def test_generation_requests_that_name_no_adapter_get_the_newest(path):
    body = json.dumps({"input_ids": [[1, 2], [3]], "sampling_params": {}}).encode()
    assert json.loads(name_adapter(path, body, "policy-v7"))["lora_path"] == "policy-v7"
    with_null = json.dumps({"text": "hi", "lora_path": None}).encode()
    assert json.loads(name_adapter(path, with_null, "policy-v7"))["lora_path"] == "policy-v7"


def test_vllm_names_the_adapter_as_the_model_unless_one_of_the_bridges_is_named():
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = json.dumps({"model": "/models/qwen", "prompt": "hi"}).encode()
        assert json.loads(name_adapter(path, body, "policy-v7", engine="vllm"))["model"] == "policy-v7"
        nameless = json.dumps({"prompt": "hi"}).encode()
        assert json.loads(name_adapter(path, nameless, "policy-v7", engine="vllm"))["model"] == "policy-v7"
        pinned = json.dumps({"model": "policy-v6", "prompt": "hi"}).encode()  # in transit: keeps its own
        assert name_adapter(path, pinned, "policy-v7", engine="vllm") is pinned
    assert "lora_path" not in json.loads(name_adapter("/v1/completions", body, "policy-v7", engine="vllm"))


@pytest.mark.parametrize(
    ("path", "body", "adapter"),
    [
        ("/generate", {"text": "hi", "lora_path": "mine"}, "policy-v7"),  # the client chose
        ("/generate", {"text": "hi"}, None),  # no adapter pushed yet: the base model, as B = 0 is
        ("/flush_cache", {}, "policy-v7"),  # not a generation route
        ("/v1/models", {}, "policy-v7"),
    ],
)
def test_everything_else_passes_unchanged(path, body, adapter):
    raw = json.dumps(body).encode()
    assert name_adapter(path, raw, adapter) is raw
    assert name_adapter("/generate", b"not json", "policy-v7") == b"not json"
    assert name_adapter("/generate", b"[1, 2]", "policy-v7") == b"[1, 2]"


class _Upstream(BaseHTTPRequestHandler):
    """Echoes the request (method, path, JSON body) back; ``/stream`` answers in three chunks."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        reply = json.dumps({"method": "POST", "path": self.path, "body": json.loads(body or b"{}")}).encode()
        self.send_response(418 if self.path == "/teapot" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "yes")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_the_proxy_forwards_status_headers_and_streams_and_names_the_current_adapter():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    current = {"name": "policy-v1"}
    proxy = InferenceProxy(
        f"http://127.0.0.1:{upstream.server_address[1]}",
        lambda: current["name"],
        host="127.0.0.1",
        port=0,
        timeout_s=10,
    ).start()
    try:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            echoed = client.post("/generate", json={"text": "hi"})
            assert echoed.status_code == 200 and echoed.headers["x-upstream"] == "yes"
            assert echoed.json()["body"] == {"text": "hi", "lora_path": "policy-v1"}
            current["name"] = "policy-v2"  # a push completed: the next request names the new one
            assert (
                client.post("/v1/completions", json={"prompt": "x"}).json()["body"]["lora_path"]
                == "policy-v2"
            )
            assert client.post("/teapot", json={"a": 1}).status_code == 418
            with client.stream("POST", "/stream", json={}) as streamed:
                assert b"".join(streamed.iter_bytes()) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()


def test_an_unreachable_server_is_a_502_naming_it():
    proxy = InferenceProxy("http://127.0.0.1:9", lambda: None, host="127.0.0.1", port=0, timeout_s=5).start()
    try:
        response = httpx.post(proxy.url + "/generate", json={"text": "hi"}, timeout=10)
        assert (
            response.status_code == 502 and "127.0.0.1:9 unreachable" in response.json()["error"]["message"]
        )
    finally:
        proxy.stop()


class _ScaleOut(BaseHTTPRequestHandler):
    """vLLM 0.33's ``/inference/v1/generate`` answering what ``reply`` (a class attribute) says: a status
    and body in vLLM's shapes (``GenerateTokensResponse``, or the 403 without ``--enable-scale-out``)."""

    protocol_version = "HTTP/1.1"
    reply: tuple[int, dict] = (200, {})
    seen: list = []

    def do_POST(self):  # noqa: N802
        self.seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        status, body = self.reply
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def test_vllm_generate_aborts_retry_and_vllm_errors_pass_through(caplog):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ScaleOut)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy = InferenceProxy(f"http://127.0.0.1:{upstream.server_address[1]}", lambda: "policy-v4",
                           host="127.0.0.1", port=0, timeout_s=10, engine="vllm").start()  # fmt: skip
    atropos = {"prompt": {"prompt_token_ids": [1, 2]}, "logprobs": 0, "max_tokens": 2}
    try:
        choice = {"index": 0, "finish_reason": "abort", "stop_reason": None, "token_ids": [5],
                  "logprobs": {"content": [{"token_id": 5, "logprob": -1.0, "rank": 1, "top_logprobs": []}]}}  # fmt: skip
        _ScaleOut.reply = (200, {"choices": [choice]})
        aborted = httpx.post(proxy.url + "/generate", json=atropos, timeout=10)
        assert aborted.status_code == 503 and "aborted" in aborted.json()["error"]["message"]
        path, sent = _ScaleOut.seen[-1]
        assert path == "/inference/v1/generate" and sent["model"] == "policy-v4"  # the newest adapter
        disabled = {"error": {"message": "Scale-out endpoints are disabled. Restart vllm serve with "
                              "--enable-scale-out to enable them.", "type": "PermissionDeniedError",
                              "param": None, "code": 403}}  # fmt: skip
        _ScaleOut.reply = (403, disabled)
        for _ in range(2):
            refused = httpx.post(proxy.url + "/generate", json=atropos, timeout=10)
            assert refused.status_code == 403 and refused.json() == disabled
        assert caplog.text.count("--enable-scale-out (the launcher does)") == 1  # said once, then counted
        assert proxy.counts == {"aborted": 1, "vllm_403": 2}
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
