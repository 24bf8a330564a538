"""SGLang 0.5.23's routed-experts output on the reference server (``--enable-return-routed-experts``).

For ``qwen3_moe`` (one dense layer) and ``mixtral``, every sample's ``meta_info.routed_experts`` (base64
of int32 ``[prompt + completion - 1, num_hidden_layers, top_k]``) must equal the top-k of the router
logits of an independent HF forward pass over the sample's whole sequence (transformers'
``output_router_logits``), prompt and completion rows alike, with 0 in dense layers. The samples decode
together with a KV cache and finish at different steps (per-prompt ``max_new_tokens``, ``n=2``), so the
rows come from the prefill and from each decode step that fed one of the sample's tokens. Also:
``routed_experts_start_len`` and SGLang's errors for it, ``max_new_tokens=0`` (prompt - 1 rows),
``/v1/completions``' response-level ``sglext``, and a server without the flag (no field, no error).
"""

from __future__ import annotations

import base64
import types

import httpx
import numpy as np
import pytest
import torch

from tests.hf_models import save_tiny_checkpoint
from tests.reference_server import ReferenceServer

PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9]]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = save_tiny_checkpoint(request.param, directory, seed=0)
    with ReferenceServer(directory, served_model_name="tiny", enable_return_routed_experts=True) as server:
        yield types.SimpleNamespace(arch=request.param, dir=directory, model=model.eval(), server=server)


def generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=120)


def decode(text: str, model) -> np.ndarray:
    flat = np.frombuffer(base64.b64decode(text), dtype="<i4")
    return flat.reshape(-1, model.config.num_hidden_layers, model.config.num_experts_per_tok)


def moe_layers(config) -> list[int]:
    """The layers with a router, from the config alone (Qwen3-MoE: all but ``mlp_only_layers``)."""
    dense = set(getattr(config, "mlp_only_layers", []) or [])
    return [i for i in range(config.num_hidden_layers) if i not in dense]


@torch.no_grad()
def hf_routing(model, tokens: list[int], *, with_margin: bool = False):
    """int32 ``[len(tokens) - 1, L, k]``: HF's top-k of each layer's router logits for every fed token
    (and, ``with_margin``, the smallest gap between a chosen and an unchosen expert's probability: how
    far from a tie, so how robust an exact comparison is to float noise)."""
    config = model.config
    k = config.num_experts_per_tok
    out = model(torch.tensor([tokens[:-1]]), output_router_logits=True)
    expected = np.zeros((len(tokens) - 1, config.num_hidden_layers, k), np.int32)
    layers = moe_layers(config)
    assert len(out.router_logits) == len(layers)
    margin = float("inf")
    for layer, logits in zip(layers, out.router_logits, strict=True):
        probs = torch.softmax(logits.float(), dim=-1)
        expected[:, layer] = torch.topk(probs, k, dim=-1).indices.numpy()
        ranked = probs.sort(dim=-1, descending=True).values
        margin = min(margin, float((ranked[:, k - 1] - ranked[:, k]).min()))
    return (expected, margin) if with_margin else expected


def test_each_samples_routing_is_hfs_router_top_k_over_its_whole_sequence(moe, report):
    body = {
        "input_ids": PROMPTS,
        "sampling_params": [
            {"max_new_tokens": 6, "temperature": 1.0, "n": 2, "sampling_seed": 1},
            {"max_new_tokens": 3, "temperature": 1.0, "n": 2, "sampling_seed": 2},
        ],
        "return_logprob": True,
        "return_routed_experts": True,
    }
    samples = generate(moe.server.url, body).json()
    assert len(samples) == 4  # prompt-major, n per prompt
    rows, margin = 0, float("inf")
    for index, sample in enumerate(samples):
        prompt = PROMPTS[index // 2]
        assert sample["output_ids"] == [t for _, t, _ in sample["meta_info"]["output_token_logprobs"]]
        tokens = prompt + sample["output_ids"]
        got = decode(sample["meta_info"]["routed_experts"], moe.model)
        assert got.shape[0] == len(tokens) - 1
        expected, gap = hf_routing(moe.model, tokens, with_margin=True)
        np.testing.assert_array_equal(got, expected)
        rows, margin = rows + got.shape[0], min(margin, gap)
    dense = sorted(set(range(moe.model.config.num_hidden_layers)) - set(moe_layers(moe.model.config)))
    assert moe.arch != "qwen3_moe" or dense == [1]  # the test covers a dense layer (all 0 there)
    report(
        f"{moe.arch}: {rows} routing rows of 4 samples equal HF's router top-k (dense layers {dense}); "
        f"smallest top-k probability margin {margin:.1e} (served log-probs are within 1e-6 of HF's)"
    )


def test_start_len_zero_tokens_and_the_openai_route(moe):
    url = moe.server.url
    prompt = PROMPTS[0]
    greedy = {"max_new_tokens": 3, "temperature": 0.0}
    full = generate(
        url, {"input_ids": prompt, "sampling_params": greedy, "return_routed_experts": True}
    ).json()
    tail = generate(
        url,
        {
            "input_ids": prompt,
            "sampling_params": greedy,
            "return_routed_experts": True,
            "routed_experts_start_len": 2,
        },
    ).json()
    whole = decode(full["meta_info"]["routed_experts"], moe.model)
    np.testing.assert_array_equal(decode(tail["meta_info"]["routed_experts"], moe.model), whole[2:])

    nothing = generate(
        url, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0}, "return_routed_experts": True}
    )
    np.testing.assert_array_equal(decode(nothing.json()["meta_info"]["routed_experts"], moe.model), whole[:4])
    plain = generate(url, {"input_ids": prompt, "sampling_params": greedy}).json()
    assert "routed_experts" not in plain["meta_info"]

    for start, message in [
        (
            6,
            "recv_req.routed_experts_start_len=6 is higher than the number of input tokens "
            "len(req.origin_input_ids)=5.",
        ),
        (-1, "recv_req.routed_experts_start_len=-1 is lower than 0."),
    ]:
        bad = generate(
            url, {"input_ids": prompt, "return_routed_experts": True, "routed_experts_start_len": start}
        )
        assert bad.status_code == 400 and message in bad.json()["error"]["message"]

    completion = httpx.post(
        url + "/v1/completions",
        json={
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 3,
            "temperature": 0,
            "n": 2,
            "return_routed_experts": True,
        },
        timeout=120,
    ).json()
    np.testing.assert_array_equal(
        decode(completion["sglext"]["routed_experts"], moe.model), whole
    )  # choice 0's
    assert (
        "sglext"
        not in httpx.post(
            url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=120
        ).json()
    )


def test_without_the_server_flag_a_request_that_asks_gets_no_field(tmp_path):
    save_tiny_checkpoint("qwen3_moe", tmp_path, seed=0)
    with ReferenceServer(tmp_path) as server:
        sample = generate(
            server.url,
            {
                "input_ids": PROMPTS[0],
                "sampling_params": {"max_new_tokens": 2},
                "return_routed_experts": True,
            },
        ).json()
    assert sample["output_ids"] and "routed_experts" not in sample["meta_info"]


def test_a_dense_model_cannot_report_routed_experts():
    from atropos_megatron.inference.routed_experts import RoutedExpertsError, routing_spec
    from tests.hf_models import tiny_hf_model

    with pytest.raises(RoutedExpertsError, match="mixture-of-experts model .*'qwen2'"):
        routing_spec(tiny_hf_model("qwen2"))
