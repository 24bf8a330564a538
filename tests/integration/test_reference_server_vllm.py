"""``serve --protocol vllm`` driven as a vLLM 0.33 server is: atroposlib 0.4.0's own ``VLLMServer`` on
``/generate``, and vLLM's RL weight-transfer sequence with the test process as the trainer (rank 0)."""

from __future__ import annotations

import asyncio
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.atropos_api import free_port
from tests.hf_models import hf_state, save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer

TOL = 1e-5
PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_server_vllm")
    save_tiny_checkpoint("qwen2", root / "a")
    tiny_tokenizer().save_pretrained(root / "tok")
    return types.SimpleNamespace(a=root / "a", tok=root / "tok")


@pytest.fixture(scope="module")
def server(dirs):
    with ReferenceServer(
        dirs.a, tokenizer_path=dirs.tok, served_model_name="tiny", protocol="vllm",
        weight_transfer_config='{"backend": "gloo"}', weight_version="A",
    ) as srv:  # fmt: skip
        yield srv


def raw_logprobs(model, prompt, output):
    """vLLM's default raw_logprobs: log_softmax of the unscaled logits, teacher-forced."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def max_diff(a, b):
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def vllm_client(server, dirs):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(base_url=server.url + "/v1", api_key="unused", model_name="tiny", tokenizer_name=str(dirs.tok),
                             server_type="vllm", health_check=False, timeout=60)  # fmt: skip
    return VLLMServer(config)


def sample(server, dirs, **kwargs):
    client = vllm_client(server, dirs)
    return asyncio.run(client.tokens_and_logprobs_completion(input_ids=list(PROMPT), **kwargs))


def test_atroposlib_vllm_server_tokens_and_logprobs(server, dirs, report):
    model = tiny_hf_model("qwen2", seed=0)
    prompt, outputs, logprobs, finishes = sample(server, dirs, n=3, max_tokens=5, temperature=0.7)
    assert prompt == PROMPT and len(outputs) == 3 and finishes == ["length"] * 3
    worst = max(
        max_diff(lp, raw_logprobs(model, PROMPT, out)) for out, lp in zip(outputs, logprobs, strict=True)
    )
    assert worst < TOL
    report(f"atroposlib VLLMServer n=3 T=0.7: max|dlogprob|={worst:.2e}")
    assert httpx.get(server.url + "/health").status_code == 200


def test_bad_requests_and_routes_out_of_order(server):
    r = httpx.post(server.url + "/generate", json={"prompt": {"prompt_token_ids": [1]}, "bogus": 1})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/update_weights", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = httpx.post(server.url + "/update_weights", json={"update_info": {"names": []}})
    assert r.status_code == 500 and "start_weight_update must be called" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/finish_weight_update", json={})
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    r = httpx.post(server.url + "/init_weight_transfer_engine", json={"init_info": {"backend": "gloo"}})
    assert r.status_code == 500 and "Invalid init_info" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/pause?mode=later")
    assert r.status_code == 400
    assert httpx.get(server.url + "/get_world_size").json() == {"world_size": 1}


def test_vllm_weight_transfer_sequence_updates_served_weights(server, dirs, report):
    from atropos_megatron.weights.sync_group import destroy_group, init_custom_process_group

    port = free_port()
    init_info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                 "packed": False}  # fmt: skip
    post = lambda path, body=None: httpx.post(server.url + path, json=body, timeout=60)  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, "/init_weight_transfer_engine", {"init_info": init_info})
        group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                                          rank=0, group_name="vllm_weight_transfer", timeout_s=60)  # fmt: skip
        try:
            assert pending.result().json() == {"message": "Weight transfer initialized"}
            assert post("/pause?mode=keep").json() == {"status": "paused"}
            assert httpx.get(server.url + "/is_paused").json() == {"is_paused": True}
            assert post("/start_weight_update").status_code == 200
            named = list(hf_state(tiny_hf_model("qwen2", seed=1)).items())
            update_info = {"names": [n for n, _ in named], "dtype_names": [str(t.dtype)[6:] for _, t in named],
                           "shapes": [list(t.shape) for _, t in named]}  # fmt: skip
            pending = pool.submit(post, "/update_weights", {"update_info": update_info})
            for _, tensor in named:
                torch.distributed.broadcast(tensor.contiguous(), src=0, group=group)
            assert pending.result().json() == {"message": "Weights updated"}, pending.result().text
            assert post("/finish_weight_update", {"weight_version": "B"}).status_code == 200
            assert post("/resume").json() == {"status": "resumed"}
        finally:
            destroy_group(group)
    assert httpx.get(server.url + "/weight_info").json() == {"weight_version": "B"}
    prompt, outputs, logprobs, _ = sample(server, dirs, n=1, max_tokens=5, temperature=0.0)
    diff = max_diff(logprobs[0], raw_logprobs(tiny_hf_model("qwen2", seed=1), prompt, outputs[0]))
    assert diff < TOL
    report(f"after vLLM-sequence update: max|dlogprob|={diff:.2e}")
