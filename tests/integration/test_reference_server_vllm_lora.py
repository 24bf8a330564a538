"""vLLM 0.33's runtime LoRA routes on ``serve --protocol vllm`` (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``).

One server process (module scope, the variable set in its environment, ``--enable-lora``,
``--api-key``) takes PEFT adapters made by ``peft`` itself through ``POST /v1/load_lora_adapter`` and
serves them by ``model: "<lora_name>"`` on ``/inference/v1/generate`` (teacher-forced, fp32, against
``peft.PeftModel``) and the ``/v1`` completion routes; its replies are vLLM's: the plain-text success
sentence, and ``ErrorResponse`` bodies with vLLM's status, type and text
(``entrypoints/openai/models/serving.py``). The routes' absence without the variable, the reply of a
server without ``--enable-lora`` and the variable's parsing run in process (``TestClient``).
"""

from __future__ import annotations

import types

import httpx
import pytest
import torch

from tests.hf_models import random_peft_model, save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [5, 17, 42, 99, 7, 3]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5  # fp32
LOAD, UNLOAD, GENERATE = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/inference/v1/generate"
CHAT_TEMPLATE = (
    "{% for message in messages %}w3 {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w4{% endif %}"
)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")


def make_adapter(directory, *, seed, r, alpha, targets):
    """A PEFT LoRA adapter for the tiny Qwen2 with random non-zero A and B (PEFT zero-inits B)."""
    base = tiny_hf_model("qwen2", seed=0)
    random_peft_model(
        base, seed=seed, scale=0.2, r=r, lora_alpha=alpha, target_modules=targets
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_server_vllm_lora")
    save_tiny_checkpoint("qwen2", root / "a")
    tiny_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(root / "tok")
    (root / "empty").mkdir()
    return types.SimpleNamespace(
        a=root / "a",
        tok=root / "tok",
        root=root,
        full=make_adapter(root / "full", seed=3, r=4, alpha=8, targets=ALL_LINEAR),
        qv=make_adapter(root / "qv", seed=4, r=2, alpha=16, targets=["q_proj", "v_proj"]),
        big=make_adapter(root / "big", seed=6, r=16, alpha=16, targets=["q_proj", "v_proj"]),
    )


@pytest.fixture(scope="module")
def server(dirs):
    with ReferenceServer(
        dirs.a, tokenizer_path=dirs.tok, served_model_name="tiny", protocol="vllm", enable_scale_out=True,
        api_key=KEY, enable_lora=True, max_lora_rank=8, lora_target_modules=["all"],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    ) as srv:  # fmt: skip
        yield srv


def post(url, path, body, headers=AUTH):
    return httpx.post(url + path, json=body, headers=headers, timeout=60.0)


def peft_model(adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_hf_model("qwen2", seed=0), adapter_dir).eval()


def reference(model, tokens):
    """log p(tokens[j] | tokens[:j]) for j >= 1, fp32, from one whole-sequence forward pass."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    return [lp[j - 1, tokens[j]].item() for j in range(1, len(tokens))]


def served_diff(url, model, reference_model, **body):
    """A greedy 4-token ``/inference/v1/generate`` with prompt and output log-probs (``model`` names the
    adapter, None the base); max |served - ``reference_model``| over both, teacher-forced."""
    sampling = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "logprobs": 0, "prompt_logprobs": 0}
    request = {
        "token_ids": PROMPT,
        "sampling_params": sampling,
        **({"model": model} if model else {}),
        **body,
    }
    r = post(url, GENERATE, request)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["model"] == (model or "tiny")
    (choice,) = reply["choices"]
    prompt = [
        entry[str(t)]["logprob"] for entry, t in zip(reply["prompt_logprobs"][1:], PROMPT[1:], strict=True)
    ]
    served = prompt + [entry["logprob"] for entry in choice["logprobs"]["content"]]
    expected = reference(reference_model, PROMPT + choice["token_ids"])
    return max(abs(a - b) for a, b in zip(served, expected, strict=True))


def error(status, message, err_type):
    """vLLM's ErrorResponse body for a refusal of OpenAIServingModels (``param`` null)."""
    return status, {"error": {"message": message, "type": err_type, "param": None, "code": status}}


def answer(response):
    return response.status_code, response.json()


def success(response, name, verb):
    """vLLM's 200: its sentence as the body, no Content-Type (``Response(content=str)``)."""
    assert (response.status_code, response.text) == (
        200,
        f"Success: LoRA adapter '{name}' {verb} successfully.",
    )
    assert "content-type" not in response.headers


def openai_logprobs(url, path, body):
    """The greedy 3-token log-probs of a ``/v1`` completion or chat answer."""
    extra = {"max_tokens": 3, "temperature": 0, "logprobs": True if "chat" in path else 0}
    r = post(url, path, {**body, **extra})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    entries = logprobs["content"] if "chat" in path else None
    if entries is not None:
        return [int(e["token"].removeprefix("w")) for e in entries], [e["logprob"] for e in entries]
    return [int(t.removeprefix("w")) for t in logprobs["tokens"]], logprobs["token_logprobs"]


def test_load_select_replace_unload_against_peft(server, dirs, report):
    url = server.url
    success(post(url, LOAD, {"lora_name": "ad", "lora_path": dirs.full}), "ad", "added")
    adapter, base = peft_model(dirs.full), tiny_hf_model("qwen2", seed=0)
    diff = served_diff(url, "ad", adapter)
    base_diff = served_diff(url, None, base)
    base_named = served_diff(url, "tiny", base)  # the served name is the base model
    shift = max(abs(a - b) for a, b in zip(reference(adapter, PROMPT), reference(base, PROMPT), strict=True))
    assert max(diff, base_diff, base_named) < TOL and shift > 0.05, (diff, base_diff, base_named, shift)
    report(f"model=ad vs PeftModel: max|dlogprob|={diff:.2e}; base: {max(base_diff, base_named):.2e} "
           f"(adapter shift {shift:.2f})")  # fmt: skip

    cards = {card["id"]: card for card in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]}
    assert (
        set(cards) == {"tiny", "ad"} and cards["ad"]["root"] == dirs.full and cards["ad"]["parent"] == "tiny"
    )

    # /v1 completions and chat select by model == the adapter's name (vLLM's rule), else the base
    chat_prompt = tiny_tokenizer().encode("w3 w9 w4")  # CHAT_TEMPLATE's rendering of one user turn
    diffs = []
    for path, body, prompt in (
        ("/v1/completions", {"prompt": PROMPT}, PROMPT),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w9"}]}, chat_prompt),
    ):
        for model, judge in (("ad", adapter), ("tiny", base)):
            ids, served = openai_logprobs(url, path, {**body, "model": model})
            expected = reference(judge, prompt + ids)[len(prompt) - 1 :]
            diffs.append(max(abs(a - b) for a, b in zip(served, expected, strict=True)))
    assert max(diffs) < TOL, diffs
    report(f"/v1 completions + chat, model=ad or tiny: max|dlogprob|={max(diffs):.2e}")

    # load_inplace replaces the adapter of that name
    already = "The lora adapter 'ad' has already been loaded. If you want to load the adapter in place, set " \
              "'load_inplace' to True."  # fmt: skip
    assert answer(post(url, LOAD, {"lora_name": "ad", "lora_path": dirs.qv})) == error(
        400, already, "InvalidUserInput"
    )
    success(post(url, LOAD, {"lora_name": "ad", "lora_path": dirs.qv, "load_inplace": True}), "ad", "added")
    qv = peft_model(dirs.qv)
    inplace = served_diff(url, "ad", qv)
    r = post(url, LOAD, {"lora_name": "ad", "lora_path": dirs.big, "load_inplace": True})  # rank 16 > 8
    assert r.status_code == 500
    kept = served_diff(url, "ad", qv)  # a failed replacement keeps the loaded adapter
    assert max(inplace, kept) < TOL, (inplace, kept)
    report(f"model=ad after load_inplace (qv) vs PeftModel: max|dlogprob|={inplace:.2e}")

    success(post(url, UNLOAD, {"lora_name": "ad", "lora_int_id": 7}), "ad", "removed")
    r = post(url, GENERATE, {"token_ids": PROMPT, "sampling_params": {"max_tokens": 1}, "model": "ad"})
    unknown = "The model `ad` does not exist (this server serves `tiny`)."  # vllm_api.model_not_found
    assert answer(r) == (
        404,
        {"error": {"message": unknown, "type": "NotFoundError", "param": "model", "code": 404}},
    )
    assert answer(post(url, UNLOAD, {"lora_name": "ad"})) == error(
        404, "The lora adapter 'ad' cannot be found.", "NotFoundError"
    )
    assert [c["id"] for c in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["tiny"]


def test_vllm_error_replies(server, dirs):
    url = server.url
    invalid = "InvalidUserInput"
    cases = [
        (LOAD, {"lora_name": "", "lora_path": dirs.full},
         error(400, "Both 'lora_name' and 'lora_path' must be provided.", invalid)),
        (LOAD, {"lora_name": "x", "lora_path": ""},
         error(400, "Both 'lora_name' and 'lora_path' must be provided.", invalid)),
        (LOAD, {"lora_name": "tiny", "lora_path": dirs.full},
         error(400, "The lora adapter 'tiny' conflicts with a served base model.", invalid)),
        # LoRAAdapterNotFoundError's text; vLLM masks the path (it lies under /tmp) in every error body
        (LOAD, {"lora_name": "gone", "lora_path": str(dirs.root / "missing")},
         error(404, "Loading lora gone failed: No adapter found for <path>", "NotFoundError")),
        (LOAD, {"lora_name": "gone", "lora_path": str(dirs.root / "empty")},
         error(404, "Loading lora gone failed: No adapter found for <path>", "NotFoundError")),
        (UNLOAD, {"lora_name": "never"}, error(404, "The lora adapter 'never' cannot be found.", "NotFoundError")),
        (UNLOAD, {"lora_name": ""},
         error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", invalid)),
    ]  # fmt: skip
    for path, body, expected in cases:
        assert answer(post(url, path, body)) == expected, body

    r = post(url, LOAD, {"lora_name": "big", "lora_path": dirs.big})  # rank 16 > --max-lora-rank 8
    status, body = answer(r)
    assert status == 500 and body["error"]["type"] == "InternalServerError" and body["error"]["code"] == 500
    assert body["error"]["message"].startswith("Call to add_lora method failed: ")
    # the request schema: a missing field, a non-JSON content type (vLLM's 400 "Bad Request")
    status, body = answer(post(url, LOAD, {"lora_name": "x"}))
    assert (status, body["error"]["type"], body["error"]["param"]) == (400, "Bad Request", "body.lora_path")
    r = httpx.post(url + LOAD, content=b'{"lora_name": "x", "lora_path": "y"}', headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["type"] == "Bad Request"
    # under /v1: --api-key guards both routes
    for path in (LOAD, UNLOAD):
        r = post(url, path, {"lora_name": "x", "lora_path": dirs.full}, headers={})
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    assert [c["id"] for c in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["tiny"]


def test_routes_need_the_variable_and_lora_in_process(dirs):
    """Without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` the routes do not exist (404); with it but without
    ``--enable-lora`` a load is vLLM's 500 (its engine refuses ``add_lora``) after the request checks."""
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.engine import EngineOptions, load_engine
    from atropos_megatron.inference.http_server import create_app

    options = EngineOptions(model_path=str(dirs.a), served_model_name="tiny", return_original_logprob=True)
    engine = load_engine(str(dirs.a), device="cpu", dtype="fp32", options=options)
    body = {"lora_name": "ad", "lora_path": dirs.full}
    try:
        with TestClient(create_app(engine, protocol="vllm", enable_scale_out=True)) as client:
            for path in (LOAD, UNLOAD):
                assert client.post(path, json=body).status_code == 404
        with TestClient(create_app(engine, protocol="vllm", runtime_lora_updating=True)) as client:
            r = client.post(LOAD, json=body)
            assert answer(r) == error(
                500, "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA.",
                "InternalServerError",
            )  # fmt: skip
            r = client.post(LOAD, json={**body, "lora_name": "tiny"})  # the checks come first
            assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidUserInput"
            r = client.post(UNLOAD, json=body)
            assert answer(r) == error(404, "The lora adapter 'ad' cannot be found.", "NotFoundError")
        with pytest.raises(ValueError, match="--protocol vllm"):
            create_app(engine, runtime_lora_updating=True)
    finally:
        engine.close()


def test_the_variable_is_read_as_vllm_reads_it():
    from atropos_megatron.inference.vllm_http import RUNTIME_LORA_ENV, runtime_lora_updating

    for value in ("1", "true", "True", " TRUE "):
        assert runtime_lora_updating({RUNTIME_LORA_ENV: value}), value
    for value in ("0", "false", "yes", "on", "", "2"):
        assert not runtime_lora_updating({RUNTIME_LORA_ENV: value}), value
    assert not runtime_lora_updating({})
