"""``serve --protocol vllm --enable-scale-out`` driven as stock ``vllm serve`` 0.33 is: vLLM's token route
``POST /inference/v1/generate`` with raw HTTP (its reply's keys, raw log-probs, ranks, top-k and prompt
log-probs against HF teacher forcing, stop reasons, refusals), no ``/generate``, the 403 and the api-key
guard of the route (in process), and vLLM's RL weight-transfer sequence with the test process as the
trainer (rank 0), read back through the token route."""

from __future__ import annotations

import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.atropos_api import free_port
from tests.hf_models import hf_state, save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer, served_vllm_logprobs

TOL = 1e-5
PROMPT = [5, 17, 42, 99, 7, 3]
ROUTE = "/inference/v1/generate"
# GenerateTokensResponse's and GenerateTokensChoice's fields in model_dump() order (protocol.py, 0.33.0)
RESPONSE_KEYS = ["request_id", "model", "created", "usage", "prompt_logprobs", "prompt_token_id_logprobs",
                 "prompt_token_ids", "mm_placeholders", "metrics", "kv_transfer_params", "ec_transfer_params",
                 "output_mode", "choices"]  # fmt: skip
CHOICE_KEYS = ["index", "finish_reason", "stop_reason", "token_ids", "routed_experts", "sampling_mask",
               "weight_versions", "logprobs"]  # fmt: skip
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"]  # fmt: skip


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
        weight_transfer_config='{"backend": "gloo"}', weight_version="A", enable_scale_out=True,
    ) as srv:  # fmt: skip
        yield srv


def raw_logprobs(model, prompt, output):
    """vLLM's default raw_logprobs: log_softmax of the unscaled logits, teacher-forced."""
    rows = logprob_rows(model, prompt + output)
    return [rows[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


def logprob_rows(model, ids) -> torch.Tensor:
    """``[len(ids), V]``: row ``i`` is the raw distribution of the token after ``ids[: i + 1]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def max_diff(a, b):
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def generate(url, body, **kwargs):
    return httpx.post(url + ROUTE, json=body, timeout=60, **kwargs)


def check_position(row: torch.Tensor, token: int, logprob: float, rank, candidates, k: int) -> float:
    """One position's log-prob, rank and candidates (``[(id, logprob, rank)]``, the token first, then the
    top ``k`` ranked 1..k) against HF's distribution ``row``; returns the largest log-prob difference."""
    assert abs(logprob - row[token].item()) < TOL
    # vLLM's rank: entries with a log-prob >= the token's (bounds absorb float noise between the two models)
    assert (row > row[token] + TOL).sum().item() < rank <= (row >= row[token] - TOL).sum().item()
    top = row.topk(k)
    expected = [(token, row[token].item(), rank)]
    ranked = enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1)
    expected += [(t, v, place) for place, (v, t) in ranked if t != token]
    if token in top.indices.tolist():  # the token keeps first place with its top-k rank
        place = top.indices.tolist().index(token) + 1
        expected[0] = (token, row[token].item(), place)
    assert [c[0] for c in candidates] == [e[0] for e in expected]
    assert [c[2] for c in candidates] == [e[2] for e in expected]
    return max_diff([c[1] for c in candidates], [e[1] for e in expected])


def test_scale_out_generate_matches_hf_and_vllm_shape(server, dirs, report):
    tok = tiny_tokenizer()
    body = {"token_ids": PROMPT, "return_token_ids": True, "not_a_field": 1,  # unknown keys: dropped
            "sampling_params": {"n": 3, "max_tokens": 5, "temperature": 0.7, "seed": 11, "ignore_eos": True,
                                "logprobs": 2, "prompt_logprobs": 3, "bogus": True}}  # fmt: skip
    r = generate(server.url, body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert list(reply) == RESPONSE_KEYS
    assert reply["request_id"].startswith("generate-tokens-") and reply["model"] == "tiny"
    assert isinstance(reply["created"], int) and reply["output_mode"] == "tokens"
    assert list(reply["usage"]) == USAGE_KEYS
    assert [reply["usage"][k] for k in USAGE_KEYS] == [6, 21, 15, None, None]
    assert reply["prompt_token_ids"] == PROMPT
    assert all(reply[k] is None for k in ("prompt_token_id_logprobs", "mm_placeholders", "metrics",
                                          "kv_transfer_params", "ec_transfer_params"))  # fmt: skip
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    model = tiny_hf_model("qwen2", seed=0)
    worst = 0.0
    for choice in choices:
        assert list(choice) == CHOICE_KEYS
        out = choice["token_ids"]
        assert (choice["finish_reason"], choice["stop_reason"], len(out)) == ("length", None, 5)
        assert choice["routed_experts"] is None and choice["sampling_mask"] is None
        assert choice["weight_versions"] == [{"version": "A", "start": 0, "end": 5}]
        rows = logprob_rows(model, PROMPT + out)
        content = choice["logprobs"]["content"]
        assert len(content) == len(out) and list(content[0]) == [
            "token_id",
            "logprob",
            "rank",
            "top_logprobs",
        ]
        for j, entry in enumerate(content):
            assert entry["token_id"] == out[j] and entry["top_logprobs"][0]["token_id"] == out[j]
            assert entry["top_logprobs"][0] == {k: entry[k] for k in ("token_id", "logprob", "rank")}
            tops = [(t["token_id"], t["logprob"], t["rank"]) for t in entry["top_logprobs"]]
            worst = max(worst, check_position(rows[len(PROMPT) - 1 + j], out[j], entry["logprob"],
                                              entry["rank"], tops, 2))  # fmt: skip
    assert len({tuple(c["token_ids"]) for c in choices}) > 1  # n=3 samples, not one copied
    prompt_lp = reply["prompt_logprobs"]
    assert len(prompt_lp) == len(PROMPT) and prompt_lp[0] is None
    rows = logprob_rows(model, PROMPT)
    for j in range(1, len(PROMPT)):
        position = prompt_lp[j]
        assert next(iter(position)) == str(PROMPT[j])
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in position.values())
        assert all(v["decoded_token"] == tok.decode([int(t)]) for t, v in position.items())
        tops = [(int(t), v["logprob"], v["rank"]) for t, v in position.items()]
        worst = max(worst, check_position(rows[j - 1], PROMPT[j], position[str(PROMPT[j])]["logprob"],
                                          position[str(PROMPT[j])]["rank"], tops, 3))  # fmt: skip
    assert worst < TOL
    report(f"/inference/v1/generate n=3 T=0.7, top-2 + prompt top-3: max|dlogprob| vs HF raw = {worst:.2e}")


def test_scale_out_stop_reasons_and_defaults(server):
    greedy = {"temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    r = generate(server.url, {"token_ids": PROMPT, "sampling_params": {**greedy, "max_tokens": 4}},
                 headers={"X-Request-Id": "mine"})  # fmt: skip
    reply = r.json()
    assert reply["request_id"] == "generate-tokens-mine" and reply["prompt_token_ids"] is None
    assert reply["prompt_logprobs"] is None
    (choice,) = reply["choices"]
    tokens = choice["token_ids"]
    assert [list(e) for e in choice["logprobs"]["content"]] == [
        ["token_id", "logprob", "rank", "top_logprobs"]
    ] * 4
    assert all(
        len(e["top_logprobs"]) == 1 for e in choice["logprobs"]["content"]
    )  # logprobs 0: the token only
    # max_tokens omitted: the rest of the context (16384 here); a stop token id ends it, and is its reason
    stop_at = tokens.index(tokens[2]) + 1
    r = generate(server.url, {"token_ids": PROMPT, "request_id": "r1",
                              "sampling_params": {**greedy, "stop_token_ids": [tokens[2]]}})  # fmt: skip
    (choice,) = r.json()["choices"]
    assert r.json()["request_id"] == "generate-tokens-r1"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", tokens[2])
    assert choice["token_ids"] == tokens[:stop_at]  # the stop token is kept in token_ids
    text = tiny_tokenizer().decode(tokens[:2])
    r = generate(
        server.url, {"token_ids": PROMPT, "sampling_params": {**greedy, "stop": [text], "max_tokens": 8}}
    )
    (choice,) = r.json()["choices"]
    assert (choice["finish_reason"], choice["stop_reason"], choice["token_ids"]) == ("stop", text, tokens[:2])
    assert choice["logprobs"] is not None
    short = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 2}}
    (choice,) = generate(server.url, short).json()["choices"]
    assert choice["logprobs"] is None and len(choice["token_ids"]) <= 2  # logprobs omitted: null
    # min_tokens masks EOS for sampling only: raw log-probs are taken before vLLM's logits processors
    body = {"token_ids": PROMPT, "sampling_params": {"temperature": 0.0, "min_tokens": 3, "max_tokens": 3,
                                                     "logprobs": 0}}  # fmt: skip
    (choice,) = generate(server.url, body).json()["choices"]
    served = [e["logprob"] for e in choice["logprobs"]["content"]]
    assert max_diff(served, raw_logprobs(tiny_hf_model("qwen2", seed=0), PROMPT, choice["token_ids"])) < TOL


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"token_ids": PROMPT}, 400, "body.sampling_params", "Field required"),
        ({"token_ids": [], "sampling_params": {}}, 400, "body.token_ids", "at least 1"),
        ({"token_ids": [1, -2], "sampling_params": {}}, 400, "body.token_ids", "negative"),
        ({"token_ids": [1], "sampling_params": {"n": "two"}}, 400, "body.sampling_params", "sampling_params.n"),
        ({"token_ids": [1], "sampling_params": {"temperature": 2.5}}, 400, "temperature", "temperature"),
        ({"token_ids": [1], "sampling_params": {"temperature": 0, "n": 2}}, 400, None, "n=2"),
        ({"token_ids": [1], "sampling_params": {"min_tokens": 17}}, 400, None, "max_tokens (16)"),
        ({"token_ids": [1], "sampling_params": {"presence_penalty": 0.5}}, 400, "presence_penalty", "presence_penalty"),
        ({"token_ids": [1], "sampling_params": {"logit_bias": {"3": 1.0}}}, 400, "logit_bias", "logit_bias"),
        ({"token_ids": [1], "sampling_params": {"logprobs": 21}}, 400, "logprobs", "20"),
        ({"token_ids": [1], "sampling_params": {"prompt_logprobs": -1}}, 400, "prompt_logprobs", "250"),
        ({"token_ids": [1], "sampling_params": {"n": 17}}, 400, None, "max-batch"),
        ({"token_ids": [250], "sampling_params": {}}, 400, "token_ids", "vocabulary"),
        ({"token_ids": [1], "sampling_params": {}, "output_mode": "text"}, 400, "output_mode", "output_mode"),
        ({"token_ids": [1], "sampling_params": {}, "stream": True}, 400, "stream", "stream"),
        ({"token_ids": [1], "sampling_params": {}, "model": "other"}, 404, "model", "other"),
    ],
)  # fmt: skip
def test_scale_out_refusals_name_the_field(server, body, status, param, words):
    r = generate(server.url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert list(error) == ["message", "type", "param", "code"] and error["code"] == status
    assert error["param"] == param and words in error["message"]
    assert error["type"] == ("Bad Request" if param and param.startswith("body") else
                             "NotFoundError" if status == 404 else "BadRequestError")  # fmt: skip


def test_no_atropos_generate_and_rl_routes_out_of_order(server):
    assert httpx.post(server.url + "/generate", json={"prompt": {"prompt_token_ids": [1]}}).status_code == 404
    r = httpx.post(server.url + ROUTE, content=b'{"token_ids": [1]}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"
    assert httpx.get(server.url + ROUTE).status_code == 405
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


def test_scale_out_gate_and_api_key_in_process(dirs):
    """Without ``--enable-scale-out`` every scale-out path is vLLM's 403; ``--api-key`` guards the route
    (before the 403, as vLLM's middleware runs first); the flag needs the vLLM protocol."""
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.engine import EngineOptions, load_engine
    from atropos_megatron.inference.http_server import create_app
    from atropos_megatron.inference.vllm_api import SCALE_OUT_PATHS

    options = EngineOptions(model_path=str(dirs.a), served_model_name="tiny", return_original_logprob=True)
    engine = load_engine(str(dirs.a), device="cpu", dtype="fp32", options=options)
    disabled = {"error": {"message": "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out "
                          "to enable them.", "type": "PermissionDeniedError", "param": None, "code": 403}}  # fmt: skip
    body = {"token_ids": [1, 2], "sampling_params": {"max_tokens": 1}}
    try:
        with TestClient(create_app(engine, protocol="vllm")) as client:
            for path in SCALE_OUT_PATHS:
                r = client.post(path, json=body)
                assert (r.status_code, r.json()) == (403, disabled), path
            assert client.post("/generate", json=body).status_code == 404
        with TestClient(create_app(engine, protocol="vllm", api_key="k")) as client:
            assert client.post(ROUTE, json=body).status_code == 401
            assert client.post(ROUTE, json=body, headers={"Authorization": "Bearer k"}).status_code == 403
        with TestClient(create_app(engine, protocol="vllm", api_key="k", enable_scale_out=True)) as client:
            r = client.post(ROUTE, json=body)
            assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
            r = client.post(ROUTE, json=body, headers={"Authorization": "Bearer k"})
            assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 1
            assert client.get("/health").status_code == 200  # not under /v1 or /inference: public
        with pytest.raises(ValueError, match="--protocol vllm"):
            create_app(engine, enable_scale_out=True)
    finally:
        engine.close()


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
    tokens, logprobs, version = served_vllm_logprobs(server.url, PROMPT, max_tokens=5)
    assert version == "B"
    diff = max_diff(logprobs, raw_logprobs(tiny_hf_model("qwen2", seed=1), PROMPT, tokens))
    assert diff < TOL
    report(f"after vLLM-sequence update, read through /inference/v1/generate: max|dlogprob|={diff:.2e}")
