"""Rollout routings from the inference server to the trainer's batch, every process real.

A Qwen3-MoE reference server with ``--enable-return-routed-experts``; a bridge with
``weights.capture_routed_experts`` and its proxy in front of the server; atroposlib's own
``SGLangServer`` generating through the proxy (``tokens_and_logprobs_completion``, n=2, the
environment path that keeps the engine's tokens); the real Atropos API; the trainer's
``BridgeClient``. One Atropos batch holds that group and a group of tokens no proxy saw (an environment
that re-tokenized). The batch the trainer receives must carry, for the first group, exactly the top-k
of an independent HF forward pass's router logits at every input position, and -1 for the second.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from atropos_megatron.bridge.client import BridgeClient
from atropos_megatron.bridge.server import build_service, create_server, start_inference_proxies
from atropos_megatron.config import BridgeConfig, WeightsConfig
from tests.hf_models import save_tiny_checkpoint
from tests.integration.test_reference_server_routed_experts import hf_routing
from tests.reference_server import ReferenceServer

atropos_api = pytest.importorskip("tests.atropos_api")
pytest.importorskip("atroposlib")

GROUP = 2


async def _generate(proxy_url: str, tokenizer_dir: str):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.sglang_server import SGLangServer

    config = APIServerConfig(
        base_url=proxy_url + "/v1",
        api_key="unused",
        model_name="tiny",
        tokenizer_name=tokenizer_dir,
        server_type="sglang",
        health_check=False,
        timeout=120,
    )
    return await SGLangServer(config).tokens_and_logprobs_completion(
        prompt="w5 w17 w42 w99", n=GROUP, max_tokens=5, temperature=1.0
    )


def test_the_trainer_receives_the_engines_routing_of_each_token_it_generated(tmp_path, report):
    model = save_tiny_checkpoint("qwen3_moe", tmp_path / "model", seed=0).eval()
    config = model.config
    with (
        atropos_api.AtroposAPI() as api,
        ReferenceServer(
            tmp_path / "model", served_model_name="tiny", enable_return_routed_experts=True
        ) as server,
    ):
        weights = WeightsConfig(
            inference_servers=[server.url],
            lora_proxy_ports=[atropos_api.free_port()],
            capture_routed_experts=True,
            health_interval_s=0,
            request_timeout_s=60,
        )
        cfg = BridgeConfig(
            atropos_url=api.url, spool_dir=str(tmp_path / "spool"), poll_interval_s=0.05, request_timeout_s=30
        )
        service = build_service(cfg, weights)
        grpc_server, port = create_server(cfg, service, "127.0.0.1:0")
        (proxy,) = start_inference_proxies(service)
        client = BridgeClient(f"127.0.0.1:{port}", timeout_s=30)
        try:
            client.register_run(
                run_name="r3",
                batch_size=2 * GROUP,
                max_token_len=64,
                starting_step=0,
                num_steps=10,
                vocab_size=config.vocab_size,
                num_hidden_layers=config.num_hidden_layers,
                num_experts_per_tok=config.num_experts_per_tok,
            )
            prompt, outputs, logprobs, _ = asyncio.run(_generate(proxy.url, str(tmp_path / "model")))
            sequences = [prompt + out for out in outputs]
            generated = {
                "tokens": sequences,
                "masks": [[-100] * len(prompt) + out for out in outputs],
                "scores": [1.0, 0.0],
                "inference_logprobs": [[1.0] * len(prompt) + lp for lp in logprobs],
            }
            retokenized = {  # not the tokens the engine saw
                "tokens": [[3, 4, *out] for out in outputs],
                "masks": [[-100, -100, *out] for out in outputs],
                "scores": [0.0, 1.0],
            }
            groups = [generated, retokenized]
            response = httpx.post(api.url + "/scored_data_list", json=groups, timeout=30)
            response.raise_for_status()
            batch = client.next_batch(wait_s=60)
            assert batch is not None, "no batch from the bridge"
            status = client.status().routed_experts
        finally:
            client.close()
            proxy.stop()
            grpc_server.stop(0).wait()
            service.pipeline.stop()
            service.atropos.close()
            service.weights.stop()

    table = batch.routed_experts
    assert table.dtype == np.int16
    assert table.shape == (batch.num_tokens, config.num_hidden_layers, config.num_experts_per_tok)
    starts = np.concatenate([[0], np.cumsum(batch.seq_lens)])
    rows = 0
    for index, tokens in enumerate(sequences):
        own = table[starts[index] : starts[index + 1]]
        np.testing.assert_array_equal(own, hf_routing(model, tokens))
        np.testing.assert_array_equal(batch.input_ids[starts[index] : starts[index + 1]], tokens[:-1])
        rows += len(own)
    assert (table[starts[GROUP] :] == -1).all()  # the re-tokenized group: the trainer routes it itself
    assert status.enabled and status.shape_registered
    assert (status.captured, status.sequences_matched, status.sequences_unmatched) == (GROUP, GROUP, GROUP)
    assert (status.entries, status.bytes) == (0, 0)
    report(f"{rows} positions of {GROUP} sampled sequences carry HF's router top-k; {GROUP} unseen get -1")
