"""atroposlib 0.4.0's own ``VLLMServer`` through the bridge's proxy onto a server with stock ``vllm serve``'s
token route: the path environments on ``server_type: vllm`` take in production (docs/vllm.md §9).

The peers are real: the reference server in vLLM mode with ``--enable-scale-out`` (vLLM 0.33's
``/inference/v1/generate``; it has no Atropos ``/generate`` of its own) and ``--logprobs-mode
processed_logprobs`` (as the launcher starts vLLM), the bridge's ``InferenceProxy`` translating, and
atroposlib's client calling ``tokens_and_logprobs_completion`` and ``get_logprobs``. Served log-probs
are checked against transformers' teacher-forced log-softmax of the same model in fp32: after
temperature for samples (processed), unscaled for the prompt (vLLM's prompt log-probs are raw).
"""

from __future__ import annotations

import asyncio
import types

import httpx
import pytest
import torch

from atropos_megatron.bridge.inference_proxy import InferenceProxy
from tests.hf_models import save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer

TOL = 1e-5
"""fp32 noise between the server's incremental decoding and one teacher-forced pass: ~1e-7 measured."""
PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_generate_proxy")
    save_tiny_checkpoint("qwen2", root / "model")
    tiny_tokenizer().save_pretrained(root / "tok")
    return types.SimpleNamespace(model=root / "model", tok=root / "tok")


@pytest.fixture(scope="module")
def proxy(dirs):
    with ReferenceServer(dirs.model, tokenizer_path=dirs.tok, served_model_name="tiny", protocol="vllm",
                         enable_scale_out=True, logprobs_mode="processed_logprobs") as server:  # fmt: skip
        proxy = InferenceProxy(
            server.url, lambda: None, host="127.0.0.1", port=0, timeout_s=60, engine="vllm"
        ).start()
        try:
            yield types.SimpleNamespace(url=proxy.url, server=server, proxy=proxy)
        finally:
            proxy.stop()


def vllm_client(url, dirs):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(base_url=url + "/v1", api_key="unused", model_name="tiny", tokenizer_name=str(dirs.tok),
                             server_type="vllm", health_check=False, timeout=60)  # fmt: skip
    return VLLMServer(config)


@torch.no_grad()
def teacher_forced_logprobs(model, tokens, temperature=1.0):
    """log_softmax(logits / temperature) per position; row i predicts tokens[i + 1]."""
    return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float() / temperature, dim=-1)


def test_atroposlib_samples_token_ids_and_processed_logprobs_through_the_proxy(proxy, dirs, report):
    model = tiny_hf_model("qwen2", seed=0)
    client = vllm_client(proxy.url, dirs)
    prompt, outputs, logprobs, finishes = asyncio.run(
        client.tokens_and_logprobs_completion(input_ids=list(PROMPT), n=3, max_tokens=5, temperature=0.7)
    )
    assert prompt == PROMPT and len(outputs) == 3 and finishes == ["length"] * 3
    worst = 0.0
    for output, served in zip(outputs, logprobs, strict=True):
        table = teacher_forced_logprobs(model, PROMPT + output, temperature=0.7)
        expected = [table[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(output)]
        worst = max(worst, *(abs(a - b) for a, b in zip(served, expected, strict=True)))
    assert worst < TOL
    report(f"atroposlib VLLMServer -> proxy -> /inference/v1/generate, n=3 T=0.7: max|dlogprob|={worst:.2e}")
    assert proxy.proxy.counts["translated"] >= 1
    assert httpx.get(proxy.url + "/health").status_code == 200  # atroposlib's health check passes through


def test_atroposlib_prompt_logprobs_through_the_proxy(proxy, dirs, report):
    client = vllm_client(proxy.url, dirs)
    result = asyncio.run(client.get_logprobs(input_ids=list(PROMPT), top_k=2))
    table = teacher_forced_logprobs(tiny_hf_model("qwen2", seed=0), PROMPT)
    assert result["prompt_tokens"] == PROMPT
    ids, lps = result["prompt_topk_token_ids"], result["prompt_topk_logprobs"]
    assert ids[0] == [] and len(ids) == len(PROMPT)  # vLLM: no log-prob for the first prompt token
    worst = 0.0
    for position in range(1, len(PROMPT)):
        row = table[position - 1]
        assert ids[position][0] == PROMPT[position]  # the prompt's own token first, then the top 2
        assert set(ids[position][1:]) <= set(row.topk(2).indices.tolist())
        worst = max(
            worst, *(abs(lp - row[t].item()) for t, lp in zip(ids[position], lps[position], strict=True))
        )
    assert worst < TOL
    report(f"atroposlib get_logprobs(top_k=2) through the proxy: max|dlogprob|={worst:.2e}")


def test_requests_the_translator_refuses_and_server_errors_reach_the_client_by_name(proxy):
    with httpx.Client(base_url=proxy.url, timeout=60) as client:
        refused = client.post("/generate", json={"prompt": "text", "max_tokens": 2})
        assert refused.status_code == 400 and "prompt_token_ids" in refused.json()["error"]["message"]
        unknown = client.post("/generate", json={"prompt": {"prompt_token_ids": PROMPT}, "max_new_tokens": 2})
        assert unknown.status_code == 400 and "max_new_tokens" in unknown.json()["error"]["message"]
        # vLLM's own 400 (here a top_k vLLM refuses) passes through with its status and body.
        server_error = client.post("/generate", json={"prompt": {"prompt_token_ids": PROMPT}, "top_k": -5})
        assert server_error.status_code == 400 and "top_k" in server_error.json()["error"]["message"]
    assert httpx.post(proxy.server.url + "/generate", json={}).status_code == 404  # stock vllm serve has none
