"""``weights.lora_sync: adapter`` with vLLM: the trainer's LoRA adapters, by ``disk``, into a server in vLLM
mode, and environments served by the newest through the bridge's proxy.

Peers: the reference server as stock ``vllm serve`` 0.33 with runtime LoRA (``--protocol vllm
--enable-scale-out --enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``/v1/load_lora_adapter``
and ``/v1/unload_lora_adapter``), the bridge's real gRPC server and proxy, atroposlib 0.4.0's own
``VLLMServer``, and ``peft.PeftModel`` as the judge. The trainer side is a real Megatron model with
rsLoRA adapters pushed by the real ``WeightPusher`` (``test_lora_sync._push_body``). vLLM selects an
adapter by ``model``; the proxy sets it to the newest, which is why environments go through it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from atropos_megatron.bridge.inference_proxy import start_proxies
from atropos_megatron.config import WeightsConfig
from tests.harness import run_ranks
from tests.hf_models import tiny_hf_model, tiny_tokenizer
from tests.integration.test_lora_sync import (
    RANK,
    TOLERANCE,
    _free_port,
    _logprobs,
    _peft_adapter,
    _push_body,
    _wait_until_unloaded,
)
from tests.integration.test_weight_push import PROBE, Bridge
from tests.reference_server import ReferenceServer

RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tests.hf_models import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("lora-sync-vllm")
    save_tiny_checkpoint("qwen2", root / "base", seed=0)
    tiny_tokenizer().save_pretrained(root / "tok")
    return root / "base"


def _prompt_logprobs(url: str, tokenizer_dir) -> list[float]:
    """The log-prob of each ``PROBE`` token after the first, as atroposlib's ``VLLMServer.get_logprobs``
    reads them at ``url`` (the prompt's own token comes first at each position)."""
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(base_url=url + "/v1", api_key="unused", model_name="base",
                             tokenizer_name=str(tokenizer_dir), server_type="vllm", health_check=False,
                             timeout=60)  # fmt: skip
    result = asyncio.run(VLLMServer(config).get_logprobs(input_ids=list(PROBE), top_k=1))
    assert [ids[0] for ids in result["prompt_topk_token_ids"][1:]] == PROBE[1:]
    return [lps[0] for lps in result["prompt_topk_logprobs"][1:]]


def _served_prompt_logprobs(url: str) -> list[float]:
    """vLLM's own token route, naming no adapter: the prompt log-probs of ``PROBE`` after the first."""
    body = {"token_ids": PROBE, "sampling_params": {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 0}}
    positions = httpx.post(url + "/inference/v1/generate", json=body, timeout=60).json()["prompt_logprobs"]
    return [position[str(token)]["logprob"] for position, token in zip(positions[1:], PROBE[1:], strict=True)]


def test_vllm_adapter_pushes_by_disk_reach_environments_through_the_proxy(base_dir, tmp_path, report):
    tokenizer_dir = base_dir.parent / "tok"
    for version in (1, 2):
        _peft_adapter(base_dir, tmp_path / f"adapter-{version}", seed=version)
    newest = _peft_adapter(base_dir, tmp_path / "adapter-3", seed=3)
    server = ReferenceServer(base_dir, tokenizer_path=tokenizer_dir, served_model_name="base", protocol="vllm",
                             enable_scale_out=True, enable_lora=True, max_lora_rank=RANK,
                             lora_target_modules=["all"], weight_version="0", env=RUNTIME_LORA)  # fmt: skip
    with server:
        fields = dict(inference_engine="vllm", transport="disk", lora_sync="adapter", pause_mode="in_place",
                      inference_servers=[server.url], disk_dir=str(tmp_path / "pushed"), health_interval_s=0,
                      request_timeout_s=30, retry_backoff_s=0.05, update_retries=1)  # fmt: skip
        bridge = Bridge(WeightsConfig(**fields))
        (proxy,) = start_proxies(
            bridge.service.weights.servers, [_free_port()], host="127.0.0.1", timeout_s=30, engine="vllm"
        )
        try:
            pushes = [(str(tmp_path / f"adapter-{v}"), "disk") for v in (1, 2, 3)]
            results = run_ranks(
                _push_body, 1, str(base_dir), pushes, fields, bridge.address, "bridge-secret", timeout_s=120
            )[0]
            assert [servers for _, servers in results] == [[(True, "1")], [(True, "2")], [(True, "3")]]

            through_proxy = _prompt_logprobs(proxy.url, tokenizer_dir)
        finally:
            proxy.stop()
            bridge.close()
        expected = _logprobs(newest)
        diff = max(abs(a - b) for a, b in zip(through_proxy, expected, strict=True))
        direct = _served_prompt_logprobs(server.url)  # names no adapter: the base model
        base_diff = max(abs(a - b) for a, b in zip(direct, _logprobs(tiny_hf_model("qwen2")), strict=True))
        report(
            f"vLLM adapter sync (disk), through the proxy vs PeftModel (rsLoRA): max |dlogprob| {diff:.1e}; "
            f"direct = base {base_diff:.1e}"
        )
        assert diff < TOLERANCE, "the proxy did not get the newest adapter's log-probs"
        assert base_diff < TOLERANCE, "a request naming no adapter should get the base model"
        assert max(abs(a - b) for a, b in zip(direct, expected, strict=True)) > 1e-3  # the test can fail
        assert httpx.get(server.url + "/weight_info", timeout=10).json() == {"weight_version": "3"}
        assert _wait_until_unloaded(server.url, "policy-v1"), "the adapter two pushes old was not unloaded"
