"""Weights through the bridge into real inference-server processes, by every transport.

The peers are the reference SGLang-protocol server (two processes: one speaking SGLang 0.5.23's
protocol with begin/end sessions, one 0.5.17's without) and the bridge's real gRPC server. The trainer
side is the real ``WeightPusher`` fed with buckets of a second model's weights; a push is proven by the
servers' log-probs of a probe sequence, which must become exactly those of the pushed model.
"""

from __future__ import annotations

import copy
import time

import grpc
import httpx
import pytest
import torch

from atropos_megatron.bridge.client import BridgeClient
from atropos_megatron.bridge.server import build_service, create_server
from atropos_megatron.config import BridgeConfig, ModelConfig, WeightsConfig
from atropos_megatron.weights.export import pack_buckets
from atropos_megatron.weights.transfer import WeightPusher
from tests.hf_models import hf_state, save_tiny_checkpoint
from tests.reference_server import ReferenceServer, served_logprobs

ADMIN_KEY = "admin-secret"
TOKEN = "bridge-secret"
PROBE = [5, 17, 42, 99, 3, 250 - 1, 128, 64, 7, 31]
TOLERANCE = 1e-5
BUCKET_BYTES = 32 * 1024  # several buckets, and the embedding alone in one


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The servers start from ``base``; pushes switch them to ``other`` and back."""
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_checkpoint("qwen2", root / "base", seed=0)
    other = save_tiny_checkpoint("qwen2", root / "other", seed=1)
    return {"dir": root / "base", "base": base, "other": other}


@pytest.fixture(scope="module")
def servers(models):
    new = ReferenceServer(models["dir"], admin_api_key=ADMIN_KEY, weight_version="base")
    old = ReferenceServer(
        models["dir"], admin_api_key=ADMIN_KEY, weight_version="base", sglang_version="0.5.17"
    )
    with new, old:
        yield [new, old]


class Bridge:
    """An in-process bridge (agent mode: weights only) and a client on it."""

    def __init__(self, weights: WeightsConfig, *, mode: str = "agent", token: str | None = TOKEN) -> None:
        self.cfg = BridgeConfig(mode=mode, auth_token=token, request_timeout_s=30)
        self.service = build_service(self.cfg, weights)
        self.server, port = create_server(self.cfg, self.service, "127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.client = BridgeClient(self.address, token=token, timeout_s=30)

    def close(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.service.weights.stop()


def _weights(servers, tmp_path, **overrides) -> WeightsConfig:
    fields = dict(
        inference_servers=[s.url for s in servers],
        admin_api_key=ADMIN_KEY,
        bucket_bytes=BUCKET_BYTES,
        disk_dir=str(tmp_path / "pushed"),
        health_interval_s=0,  # tests run health checks by hand
        retry_backoff_s=0.05,
        flush_cache_attempts=2,
        update_retries=1,
        request_timeout_s=30,
    )
    return WeightsConfig(**{**fields, **overrides})


def _buckets(model, dtype=torch.float32):
    return pack_buckets(((n, t.to(dtype)) for n, t in hf_state(model).items()), bucket_bytes=BUCKET_BYTES)


@torch.no_grad()
def _model_logprobs(model) -> list[float]:
    tokens = torch.tensor([PROBE])
    logprobs = torch.log_softmax(model(tokens).logits.float(), dim=-1)[0, :-1]
    return logprobs.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()


def _assert_serves(url: str, model, version: str, report=None) -> None:
    got, served_version = served_logprobs(url, PROBE)
    diff = max(abs(a - b) for a, b in zip(got, _model_logprobs(model), strict=True))
    if report is not None:
        report(f"{url} v{version}: max |logprob diff| = {diff:.2e}")
    assert served_version == version
    assert diff < TOLERANCE, f"{url} serves logprobs {diff:.2e} away from the pushed model"


def _push(bridge: Bridge, cfg: WeightsConfig, model, version: str, dtype=torch.float32):
    pusher = WeightPusher(cfg, ModelConfig(), bridge.client)
    try:
        return pusher.send(_buckets(model, dtype), weight_version=version)
    finally:
        pusher.close()


# ------------------------------------------------------------------------------------------------


def test_every_transport_reaches_both_protocol_generations(models, servers, tmp_path, report):
    bridge = Bridge(_weights(servers, tmp_path))
    pushers = {}
    try:
        for transport, model, version in (
            ("grpc", "other", "1"),
            ("disk", "base", "2"),
            ("distributed", "other", "3"),
            ("distributed", "base", "4"),  # the group made for push 3 is reused
        ):
            cfg = _weights(servers, tmp_path, transport=transport)
            pusher = pushers.setdefault(transport, WeightPusher(cfg, ModelConfig(), bridge.client))
            response = pusher.send(_buckets(models[model]), weight_version=version)
            assert response.weight_version == version
            assert all(s.updated and s.weight_version == version for s in response.servers), response
            for server in servers:
                _assert_serves(server.url, models[model], version, report)
            status = bridge.client.status()
            assert status.weight_version == version and status.weight_pushes == int(version)
            assert {s.sglang_version for s in status.servers} == {"0.5.23", "0.5.17"}
        assert "weight_v2" in {p.name for p in (tmp_path / "pushed").iterdir()}
    finally:
        for pusher in pushers.values():
            pusher.close()
        bridge.close()


def test_a_server_that_dies_is_skipped_held_when_it_returns_and_caught_up(models, servers, tmp_path):
    # Health rounds an hour apart: only the quick re-probe of an unreachable server can find it back.
    cfg = _weights(servers, tmp_path, transport="grpc", health_interval_s=3600)
    bridge = Bridge(cfg)
    new, old = servers
    try:
        _push(bridge, cfg, models["base"], "10")
        old.stop()  # killed: the next push goes on without it
        response = _push(bridge, cfg, models["other"], "11")
        by_url = {s.url: s for s in response.servers}
        assert by_url[new.url].updated and not by_url[old.url].updated
        assert not by_url[old.url].healthy and by_url[old.url].last_error
        _assert_serves(new.url, models["other"], "11")

        bridge.service.weights.start_monitor()
        old.start()  # back with its initial weights: behind, so the bridge pauses it as soon as it answers
        deadline = time.monotonic() + 120
        while bridge.service.weights.servers_behind != 1:
            assert time.monotonic() < deadline, "the restarted server was not found behind and paused"
            time.sleep(0.05)
        status = bridge.client.status()
        assert status.servers_behind == 1  # the trainer pushes again for it when it has no batch
        by_url = {s.url: s for s in status.servers}
        assert by_url[old.url].healthy and by_url[old.url].weight_version == "base"
        assert "behind" in by_url[old.url].last_error
        with pytest.raises(httpx.ReadTimeout):  # paused: generation waits instead of serving stale weights
            httpx.post(
                old.url + "/generate",
                json={"input_ids": PROBE, "sampling_params": {"max_new_tokens": 1}},
                timeout=1.5,
            )

        _push(bridge, cfg, models["other"], "12")  # the next push brings it up to date and resumes it
        for server in servers:
            _assert_serves(server.url, models["other"], "12")
        assert bridge.client.status().servers_behind == 0
    finally:
        bridge.close()


def test_a_job_bridge_forwards_grpc_pushes_to_a_node_agent(models, servers, tmp_path):
    agent_cfg = _weights(servers[:1], tmp_path, transport="grpc")
    agent = Bridge(agent_cfg)
    job_cfg = _weights([], tmp_path, transport="grpc", bridge_agents=[agent.address])
    job = Bridge(job_cfg, mode="job")
    try:
        response = _push(job, job_cfg, models["base"], "20", dtype=torch.bfloat16)
        assert [s.url for s in response.servers] == [servers[0].url] and response.servers[0].updated
        rounded = copy.deepcopy(models["base"])  # the fp32 server now holds bf16-rounded weights
        with torch.no_grad():
            for param in rounded.parameters():
                param.copy_(param.to(torch.bfloat16).float())
        _assert_serves(servers[0].url, rounded, "20")
    finally:
        job.close()
        agent.close()


def test_bad_streams_and_missing_tokens_are_refused(tmp_path):
    cfg = _weights([], tmp_path, transport="grpc")  # no servers: only the stream is under test
    bridge = Bridge(cfg)
    try:
        stream = bridge.client.open_weight_push("1")
        stream.send_bucket(0, [("w", "float32", (4,))], b"\0" * 15)  # one byte short
        with pytest.raises(grpc.RpcError) as error:
            stream.finish()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        stream = bridge.client.open_weight_push("1", transport="disk")  # DISK without a path
        with pytest.raises(grpc.RpcError) as error:
            stream.finish()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        big = cfg.max_bucket_bytes // 4 + 1
        stream = bridge.client.open_weight_push("1")
        stream.send_bucket(0, [("w", "float32", (big,))])
        with pytest.raises(grpc.RpcError) as error:
            stream.finish()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        with BridgeClient(bridge.address, timeout_s=5) as anonymous:
            with pytest.raises(grpc.RpcError) as error:
                anonymous.open_weight_push("1").finish()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED

        response = bridge.client.open_weight_push("2").finish()  # a good (empty) push still works
        assert response.weight_version == "2" and bridge.client.status().weight_version == "2"
        with pytest.raises(grpc.RpcError) as error:  # an agent serves no batches
            bridge.client.next_batch(wait_s=0.1)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        bridge.close()
