"""Rollout routing replay in the bridge, without processes: the store, the /generate rewrite, the join of
captured routings to a batch, and their way through the proto, the spool and the pipeline."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from atropos_megatron.bridge import codec
from atropos_megatron.bridge.inference_proxy import InferenceProxy
from atropos_megatron.bridge.pipeline import BatchPipeline, Limits
from atropos_megatron.bridge.routed_experts import (
    RoutedExpertsStore,
    ask_routed_experts,
    attach_routed_experts,
    capture_response,
    token_key,
)
from atropos_megatron.bridge.spool import BatchSpool
from atropos_megatron.config import ConfigError, WeightsConfig

LAYERS, TOP_K = 3, 2


def _routing(rows: int, seed: int) -> np.ndarray:
    """int32 ``[rows, LAYERS, TOP_K]`` expert ids, as SGLang computes them."""
    return np.random.default_rng(seed).integers(0, 8, (rows, LAYERS, TOP_K)).astype(np.int32)


def _b64(routing: np.ndarray) -> str:
    return base64.b64encode(routing.astype("<i4").tobytes()).decode()


def _sample(output_ids: list[int], routing: np.ndarray | None) -> dict:
    meta = {"finish_reason": {"type": "length", "length": len(output_ids)}, "weight_version": "3"}
    if routing is not None:
        meta["routed_experts"] = _b64(routing)
    return {"text": "", "output_ids": output_ids, "meta_info": meta}


def _put(store: RoutedExpertsStore, tokens: list[int], routing: np.ndarray) -> None:
    assert store.put(token_key(tokens), routing.astype(np.int16).reshape(len(tokens) - 1, -1))


# ----- the store


def test_the_store_hands_each_routing_out_once_oldest_first_and_stays_within_its_bytes():
    a, b = _routing(4, 0), _routing(4, 1)
    entry_bytes = a.size * 2 + 5 * 4  # int16 ids + the int32 key
    store = RoutedExpertsStore(max_bytes=3 * entry_bytes)
    _put(store, [1, 2, 3, 4, 5], a)
    _put(store, [1, 2, 3, 4, 5], b)  # the same sequence sampled twice: one entry each
    first, again, missing = store.take([token_key([1, 2, 3, 4, 5]), token_key([1, 2, 3, 4, 5]), b"x"])
    np.testing.assert_array_equal(first.reshape(a.shape), a)  # oldest first
    np.testing.assert_array_equal(again.reshape(b.shape), b)
    assert missing is None and store.snapshot()["entries"] == 0 and store.snapshot()["bytes"] == 0
    _put(store, [9, 9, 9, 9, 9], a)
    (one, twice) = store.take([token_key([9, 9, 9, 9, 9])] * 2)  # a group holding it twice: both get it
    assert one is twice
    for seed in range(4):  # the fourth evicts the first
        _put(store, [seed, 1, 1, 1, 1], _routing(4, seed))
    assert store.take([token_key([0, 1, 1, 1, 1])]) == [None]
    assert store.take([token_key([3, 1, 1, 1, 1])])[0] is not None
    assert not store.put(b"k" * 8, np.zeros((10, 1000), np.int16))  # larger than the bound: dropped
    counts = store.snapshot()
    assert (counts["captured"], counts["evicted"], counts["entries"]) == (7, 2, 2)
    assert counts["bytes"] == 2 * entry_bytes
    assert token_key([1, -1]) is None and token_key([2**31]) is None and token_key(["a"]) is None


# ----- the proxy's rewrite of /generate


def test_generate_requests_with_input_ids_ask_for_their_routing_and_nothing_else_changes():
    body = json.dumps({"input_ids": [5, 6], "sampling_params": {"n": 2}, "return_logprob": True}).encode()
    rewritten, capture = ask_routed_experts("/generate", body)
    assert json.loads(rewritten) == {**json.loads(body), "return_routed_experts": True}
    assert capture.prompts == [[5, 6]] and not capture.client_asked
    _, batched = ask_routed_experts("/generate?x=1", json.dumps({"input_ids": [[1], [2, 3]]}).encode())
    assert batched.prompts == [[1], [2, 3]]
    _, asked = ask_routed_experts(
        "/generate", json.dumps({"input_ids": [1], "return_routed_experts": True}).encode()
    )
    assert asked.client_asked
    for path, request in [
        ("/generate", {"text": "hi"}),  # no token ids to key the routing by
        ("/generate", {"input_ids": [1, 2], "stream": True}),
        ("/generate", {"input_ids": [1, 2], "routed_experts_start_len": 1}),  # partial rows
        ("/v1/completions", {"prompt": [1, 2]}),
        ("/flush_cache", {}),
    ]:
        raw = json.dumps(request).encode()
        assert ask_routed_experts(path, raw) == (raw, None), (path, request)
    assert ask_routed_experts("/generate", b"not json") == (b"not json", None)


def test_responses_lose_their_routing_which_is_stored_by_prompt_plus_output_ids():
    store = RoutedExpertsStore(max_bytes=1 << 20)
    _, capture = ask_routed_experts("/generate", json.dumps({"input_ids": [[1, 2], [3, 4, 5]]}).encode())
    routings = [_routing(4, 0), _routing(3, 1), _routing(5, 2), None]  # 2 prompts x n=2, prompt-major
    outputs = [[7, 8, 9], [7, 8], [6, 6, 6], [9]]
    response = [_sample(out, r) for out, r in zip(outputs, routings, strict=True)]
    returned = json.loads(capture_response(capture, json.dumps(response).encode(), store))
    for got, sent in zip(returned, response, strict=True):  # everything but the routing as the server sent it
        sent["meta_info"].pop("routed_experts", None)
        assert got == sent
    keys = [token_key([1, 2, 7, 8, 9]), token_key([1, 2, 7, 8]), token_key([3, 4, 5, 6, 6, 6])]
    for got, expected in zip(store.take(keys), routings, strict=False):
        np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    counts = store.snapshot()
    assert (counts["captured"], counts["no_routing"]) == (3, 1)  # the last sample came without one

    single = _sample([4], _routing(2, 3))
    _, asked = ask_routed_experts(
        "/generate", json.dumps({"input_ids": [1, 2], "return_routed_experts": True}).encode()
    )
    kept = json.loads(capture_response(asked, json.dumps(single).encode(), store))
    assert kept["meta_info"]["routed_experts"] == single["meta_info"]["routed_experts"]  # the client asked
    bad = _sample([4], _routing(2, 3))
    bad["meta_info"]["routed_experts"] = "!!"
    capture_response(asked, json.dumps(bad).encode(), store)
    wrong_rows = _sample([4, 5], _routing(2, 3)[:, :1])  # 2 rows x 3 ids cannot be 3 rows
    capture_response(asked, json.dumps(wrong_rows).encode(), store)
    assert store.snapshot()["malformed"] == 2


class _SGLang(BaseHTTPRequestHandler):
    """Answers /generate like SGLang with --enable-return-routed-experts (one sample, 2 output tokens)."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(request)
        rows = len(request["input_ids"]) + 2 - 1
        sample = _sample([11, 12], _routing(rows, 7) if request.get("return_routed_experts") else None)
        reply = json.dumps(sample).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_the_proxy_captures_through_http_and_names_adapters_as_before():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _SGLang)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    store = RoutedExpertsStore(max_bytes=1 << 20)
    url = f"http://127.0.0.1:{upstream.server_address[1]}"
    proxy = InferenceProxy(
        url, lambda: "policy-v2", host="127.0.0.1", port=0, timeout_s=10, routed_experts=store
    )
    try:
        proxy.start()
        response = httpx.post(proxy.url + "/generate", json={"input_ids": [1, 2, 3]}, timeout=10)
        assert response.status_code == 200 and int(response.headers["content-length"]) == len(
            response.content
        )
        assert "routed_experts" not in response.json()["meta_info"] and response.json()["output_ids"] == [
            11,
            12,
        ]
        assert _SGLang.seen[-1] == {
            "input_ids": [1, 2, 3],
            "lora_path": "policy-v2",
            "return_routed_experts": True,
        }
        (routing,) = store.take([token_key([1, 2, 3, 11, 12])])
        np.testing.assert_array_equal(routing.reshape(4, LAYERS, TOP_K), _routing(4, 7))
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()


# ----- the join, the proto and the spool


def _groups() -> list[dict]:
    tokens = [[1, 2, 7, 8, 9], [1, 2, 7, 8], [3, 4, 5, 6]]
    return [
        {"tokens": tokens[:2], "masks": [[-100, -100, *t[2:]] for t in tokens[:2]], "scores": [1.0, 0.0]},
        {"tokens": tokens[2:], "masks": [[-100, -100, 5, 6]], "scores": [0.5]},
    ]


def _encode(groups, step: int = 0) -> codec.EncodedBatch:
    batch, rejections = codec.encode_batch(
        groups, batch_id=f"b{step}", step=step, vocab_size=100, max_token_len=16, fetched_unix_s=0.0
    )
    assert not rejections
    return batch


def test_the_join_gives_each_input_token_its_routing_and_minus_one_rows_where_there_is_none():
    store = RoutedExpertsStore(max_bytes=1 << 20)
    first, third = _routing(4, 0), _routing(3, 2)
    _put(store, [1, 2, 7, 8, 9], first)
    _put(store, [3, 4, 5, 6], third)
    batch = _encode(_groups())
    joined = attach_routed_experts(batch, store, num_layers=LAYERS, top_k=TOP_K)
    table = joined.batch.routed_experts
    assert (joined.matched, joined.unmatched) == (2, 1)
    assert table.dtype == np.int16 and table.shape == (batch.num_tokens, LAYERS, TOP_K)
    np.testing.assert_array_equal(table[:4], first)  # position i: input token i
    assert (table[4:7] == -1).all()  # [1, 2, 7, 8]: never captured
    np.testing.assert_array_equal(table[7:], third)
    assert store.snapshot()["entries"] == 0  # claimed

    nothing = attach_routed_experts(_encode(_groups()), store, num_layers=LAYERS, top_k=TOP_K)
    assert nothing.batch.routed_experts is None and nothing.unmatched == 3
    _put(store, [1, 2, 7, 8, 9], first)
    other_model = attach_routed_experts(_encode(_groups()), store, num_layers=2, top_k=TOP_K)
    assert other_model.batch.routed_experts is None  # 3 x 2 ids per token are not 2 x 2
    counts = store.snapshot()
    assert (counts["sequences_matched"], counts["sequences_unmatched"], counts["width_mismatch"]) == (2, 7, 1)


def test_routed_experts_travel_in_the_proto_and_the_spool(tmp_path):
    store = RoutedExpertsStore(max_bytes=1 << 20)
    _put(store, [3, 4, 5, 6], _routing(3, 2))
    batch = attach_routed_experts(_encode(_groups()), store, num_layers=LAYERS, top_k=TOP_K).batch
    message = codec.batch_to_proto(batch)
    spool = BatchSpool(tmp_path)
    spool.put(message)
    (restored,) = BatchSpool(tmp_path).unacked()  # a restarted bridge reads it back
    decoded = codec.batch_from_proto(restored)
    assert decoded.routed_experts.dtype == np.int16
    np.testing.assert_array_equal(decoded.routed_experts, batch.routed_experts)
    assert codec.batch_from_proto(codec.batch_to_proto(_encode(_groups()))).routed_experts is None
    for bad in (
        batch.routed_experts[:-1],
        batch.routed_experts.astype(np.int32),
        batch.routed_experts[:, :, 0],
    ):
        broken = codec.batch_to_proto(batch)
        broken.routed_experts.CopyFrom(codec.tensor_to_proto(bad))
        with pytest.raises(ValueError, match="routed_experts"):
            codec.batch_from_proto(broken)


def test_the_pipeline_attaches_routings_when_the_trainer_registered_a_shape(tmp_path):
    store = RoutedExpertsStore(max_bytes=1 << 20)
    batches = [_groups(), _groups()]

    def fetch(wait_s: float, stop: threading.Event):
        if batches:
            return batches.pop(0)
        stop.wait(wait_s)
        return None

    for step, shape in enumerate([(LAYERS, TOP_K), None]):
        _put(store, [1, 2, 7, 8], _routing(3, 5))
        pipeline = BatchPipeline(
            BatchSpool(tmp_path / str(step)), fetch, prefetch=1, poll_s=0.05, routed_experts=store
        )
        pipeline.start(Limits(vocab_size=100, max_token_len=16, routed_experts_shape=shape))
        try:
            batch = codec.batch_from_proto(pipeline.next_batch(wait_s=30))
        finally:
            pipeline.stop()
        if shape is None:  # the trainer takes no routings: none attached, but not kept either
            assert batch.routed_experts is None and store.snapshot()["entries"] == 0
        else:
            assert (batch.routed_experts[4:7] >= 0).all() and (batch.routed_experts[:4] == -1).all()


def test_the_config_requires_proxy_ports_for_capture():
    with pytest.raises(ConfigError, match="weights.capture_routed_experts"):
        WeightsConfig(capture_routed_experts=True, inference_servers=["http://a:1"])
    cfg = WeightsConfig(capture_routed_experts=True, inference_servers=["http://a:1"], lora_proxy_ports=[9])
    assert cfg.routed_experts_store_bytes > 0
    with pytest.raises(ConfigError, match="weights.routed_experts_store_bytes"):
        WeightsConfig(routed_experts_store_bytes=0)


def test_the_status_names_the_capture_counts_only_when_capture_is_on():
    from atropos_megatron.bridge.v1 import bridge_pb2
    from atropos_megatron.status import _bridge_lines

    assert not any("routed" in line for line in _bridge_lines(bridge_pb2.BridgeStatus()))
    capture = bridge_pb2.RoutedExpertsCapture(
        enabled=True, sequences_matched=6, sequences_unmatched=2, bytes=2048
    )
    (line,) = [
        line for line in _bridge_lines(bridge_pb2.BridgeStatus(routed_experts=capture)) if "routed" in line
    ]
    assert "matched 6, unmatched 2" in line and "2.0 KiB" in line and "asked for none" in line
