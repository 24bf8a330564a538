"""Weights through the bridge into a real server in vLLM mode (``serve --protocol vllm``), by ``distributed``.

The peers are the reference server speaking vLLM 0.33's RL routes (``--weight-transfer-config
'{"backend": "gloo"}'``: vLLM's rendezvous with a gloo group instead of NCCL) and the bridge's real
gRPC server with ``weights.inference_engine: vllm``. The trainer side is the real ``WeightPusher``
fed with buckets of another model's weights; a push is proven by greedy completions from vLLM's token
route ``/inference/v1/generate`` (``--enable-scale-out``), whose (raw) log-probs must become the pushed
model's.
Transports vLLM cannot take are refused by name, by the config and by the bridge.
"""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
import torch

from atropos_megatron.config import ConfigError, ModelConfig, WeightsConfig
from atropos_megatron.weights.export import pack_buckets
from atropos_megatron.weights.transfer import WeightPusher
from tests.hf_models import hf_state, save_tiny_checkpoint
from tests.integration.test_weight_push import Bridge
from tests.reference_server import ReferenceServer, served_vllm_logprobs

TOLERANCE = 1e-5
PROMPT = [5, 17, 42, 99, 3, 249, 128]
BUCKET_BYTES = 32 * 1024  # several buckets, each one /update_weights call


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_vllm")
    base = save_tiny_checkpoint("qwen2", root / "base", seed=0)
    other = save_tiny_checkpoint("qwen2", root / "other", seed=1)
    return {"dir": root / "base", "base": base, "other": other}


@pytest.fixture(scope="module")
def server(models):
    with ReferenceServer(
        models["dir"],
        protocol="vllm",
        weight_transfer_config='{"backend": "gloo"}',
        weight_version="base",
        enable_scale_out=True,
    ) as srv:
        yield srv


def _weights(urls, **overrides) -> WeightsConfig:
    fields = dict(
        inference_engine="vllm",
        transport="distributed",
        pause_mode="in_place",
        inference_servers=list(urls),
        bucket_bytes=BUCKET_BYTES,
        health_interval_s=0,  # tests run health checks by hand
        retry_backoff_s=0.05,
        update_retries=1,
        request_timeout_s=60,
    )
    return WeightsConfig(**{**fields, **overrides})


def _buckets(model):
    return pack_buckets(hf_state(model).items(), bucket_bytes=BUCKET_BYTES)


@torch.no_grad()
def _raw_logprobs(model, prompt, output) -> list[float]:
    logits = model(torch.tensor([prompt + output])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def _assert_serves(url: str, model, version: str, report=None) -> float:
    tokens, logprobs, served_version = served_vllm_logprobs(url, PROMPT)
    diff = max(abs(a - b) for a, b in zip(logprobs, _raw_logprobs(model, PROMPT, tokens), strict=True))
    if report is not None:
        report(f"vLLM mode v{version}: max |served - pushed model logprob| = {diff:.2e}")
    assert served_version == version
    assert diff < TOLERANCE, f"{url} serves log-probs {diff:.2e} away from the pushed model"
    return diff


def test_distributed_pushes_reach_a_vllm_server(models, server, report):
    cfg = _weights([server.url])
    bridge = Bridge(cfg)
    pusher = WeightPusher(cfg, ModelConfig(), bridge.client)
    try:
        for model, version in (("other", "1"), ("base", "2"), ("other", "3")):  # 2, 3 reuse the group
            response = pusher.send(_buckets(models[model]), weight_version=version)
            assert [(s.updated, s.weight_version) for s in response.servers] == [(True, version)], response
            assert response.buckets > 1
            _assert_serves(server.url, models[model], version, report)
            assert httpx.get(server.url + "/is_paused").json() == {"is_paused": False}
        status = bridge.client.status()
        assert status.weight_version == "3" and status.weight_pushes == 3
        (served,) = status.servers
        assert served.healthy and served.sglang_version == "vllm 0.33.0" and served.tp_size == 1
    finally:
        pusher.close()
        bridge.close()


def test_a_restarted_vllm_server_is_held_then_caught_up(models, server):
    cfg = _weights([server.url], health_interval_s=3600)  # only the re-probe of a lost server runs
    bridge = Bridge(cfg)
    try:
        pusher = WeightPusher(cfg, ModelConfig(), bridge.client)
        pusher.send(_buckets(models["other"]), weight_version="10")
        pusher.close()
        server.stop()  # killed ...
        bridge.service.weights.check_servers()  # ... and seen gone
        bridge.service.weights.start_monitor()
        server.start()  # back with its initial weights ("base"): behind, so paused as soon as it answers
        deadline = time.monotonic() + 120
        while bridge.service.weights.servers_behind != 1:
            assert time.monotonic() < deadline, "the restarted server was not found behind and paused"
            time.sleep(0.05)
        assert httpx.get(server.url + "/is_paused").json() == {"is_paused": True}
        assert "behind" in bridge.client.status().servers[0].last_error

        pusher = WeightPusher(cfg, ModelConfig(), bridge.client)  # a new group: the server is new
        pusher.send(_buckets(models["other"]), weight_version="11")
        pusher.close()
        _assert_serves(server.url, models["other"], "11")
        assert bridge.client.status().servers_behind == 0
    finally:
        bridge.close()


def test_transports_vllm_cannot_take_are_refused_by_name(server):
    for overrides, field, words in (
        (dict(transport="grpc"), "weights.transport", "grpc is not supported"),
        (dict(transport="disk", disk_dir="/tmp"), "weights.transport", "disk is not supported"),
        (dict(lora_sync="adapter"), "weights.transport", "not supported for LoRA adapters"),  # disk only
        (dict(pause_mode="retract"), "weights.pause_mode", "vLLM has no retract"),
    ):
        with pytest.raises(ConfigError) as error:
            _weights([server.url], **overrides)
        assert field in str(error.value) and words in str(error.value)

    bridge = Bridge(_weights([server.url]))  # a trainer configured for SGLang pushes to it anyway
    try:
        for transport, extra in (("grpc", {}), ("disk", {"disk_path": "/tmp/weights"})):
            with pytest.raises(grpc.RpcError) as error:
                bridge.client.open_weight_push("1", transport=transport, **extra).finish()
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"the {transport} transport is not supported with vLLM" in error.value.details()
        assert httpx.get(server.url + "/is_paused").json() == {"is_paused": False}  # nothing was paused
    finally:
        bridge.close()


def test_a_server_of_the_other_engine_is_named_unhealthy(models, server):
    with ReferenceServer(models["dir"], weight_version="base") as sglang:  # SGLang's protocol
        bridge = Bridge(_weights([sglang.url]))
        try:
            (status,) = bridge.client.status().servers
            assert not status.healthy
            assert "answers as SGLang" in status.last_error and "inference_engine=sglang" in status.last_error
        finally:
            bridge.close()
