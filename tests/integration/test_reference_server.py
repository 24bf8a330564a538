"""The reference SGLang-protocol server against transformers, atroposlib's client, and SGLang payloads.

One server process (module-scoped) serves a tiny Qwen2 "A" (seed 0). Weight-update tests switch it to
a second model "B" (seed 1) through each route, check that the served logprobs are B's, and switch
back. Logprobs are compared with log_softmax computed in-process on the same tokens (fp32).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import pickle
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler

import httpx
import pytest
import torch

from tests.atropos_api import free_port
from tests.hf_models import hf_state, save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer

CHAT_TEMPLATE = (
    "{% for message in messages %}w3 {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w4{% endif %}"
)
USER_KEY, ADMIN_KEY = "user-key", "admin-key"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [5, 17, 42, 99, 7, 3]
TOL = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_server")
    save_tiny_checkpoint("qwen2", root / "a", chat_template=CHAT_TEMPLATE)
    save_tiny_checkpoint("qwen2", root / "b", seed=1)
    # A separate tokenizer directory: AutoTokenizer maps model_type qwen2 to a BPE class that cannot
    # read the word-level test tokenizer, so it is loaded without a config.json next to it.
    tiny_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(root / "tok")
    return types.SimpleNamespace(a=root / "a", b=root / "b", tok=root / "tok")


@pytest.fixture(scope="module")
def models():
    return {"A": tiny_hf_model("qwen2", seed=0), "B": tiny_hf_model("qwen2", seed=1)}


@pytest.fixture(scope="module")
def server(dirs):
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")  # how SGLang clients send CPU tensors
    try:
        with ReferenceServer(
            dirs.a,
            tokenizer_path=dirs.tok,
            served_model_name="tiny",
            api_key=USER_KEY,
            admin_api_key=ADMIN_KEY,
            weight_version="A",
        ) as srv:
            yield srv
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def post(server, path, body, headers=ADMIN, timeout=60.0):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def generate(server, body):
    response = post(server, "/generate", body, headers=USER)
    assert response.status_code == 200, response.text
    return response.json()


def reference_logprobs(model, prompt, output, temperature=1.0):
    """log_softmax(logits / T) of each output token given prompt + earlier outputs (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    lp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)], lp


def max_diff(a, b):
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def served_logprobs(server, max_new_tokens=6):
    out = generate(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
            "return_logprob": True,
        },
    )
    return out["output_ids"], [e[0] for e in out["meta_info"]["output_token_logprobs"]], out["meta_info"]


def restore_a(server, dirs):
    response = post(server, "/update_weights_from_disk", {"model_path": str(dirs.a), "weight_version": "A"})
    assert response.json()["success"], response.text


def assert_serves(server, models, name, report=None):
    ids, lps, meta = served_logprobs(server)
    expected, _ = reference_logprobs(models[name], PROMPT, ids)
    greedy = models[name].generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)
    assert ids == greedy[0, len(PROMPT) :].tolist()
    diff = max_diff(lps, expected)
    assert diff < TOL
    if report:
        report(f"serves {name}: max|dlogprob|={diff:.2e}")
    return meta


# ----- generation


def test_greedy_matches_transformers_and_logprobs_match(server, models, report):
    out = generate(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 3,
        },
    )
    model = models["A"]
    greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[
        0, len(PROMPT) :
    ].tolist()
    assert out["output_ids"] == greedy
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == 8
    assert meta["cached_tokens"] == 0 and meta["weight_version"] == "A"
    expected, lp = reference_logprobs(model, PROMPT, out["output_ids"])
    assert [e[1] for e in meta["output_token_logprobs"]] == greedy
    assert all(e[2] is None for e in meta["output_token_logprobs"])  # no return_text_in_logprobs
    out_diff = max_diff([e[0] for e in meta["output_token_logprobs"]], expected)
    inputs = meta["input_token_logprobs"]
    assert inputs[0] == [None, PROMPT[0], None]
    in_expected = [lp[j - 1, PROMPT[j]].item() for j in range(1, len(PROMPT))]
    in_diff = max_diff([e[0] for e in inputs[1:]], in_expected)
    assert out_diff < TOL and in_diff < TOL
    top = meta["output_top_logprobs"][0]
    assert len(top) == 3 and top[0][1] == greedy[0]
    report(f"output max|dlogprob|={out_diff:.2e}, input max|dlogprob|={in_diff:.2e}")


def test_sampled_logprobs_are_temperature_scaled(server, models, report):
    out = generate(
        server,
        {
            "input_ids": PROMPT,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.7, "n": 3, "sampling_seed": 1},
            "return_logprob": True,
        },
    )
    assert isinstance(out, list) and len(out) == 3
    worst = 0.0
    for sample in out:
        expected, _ = reference_logprobs(models["A"], PROMPT, sample["output_ids"], temperature=0.7)
        worst = max(worst, max_diff([e[0] for e in sample["meta_info"]["output_token_logprobs"]], expected))
    assert worst < TOL
    report(f"n=3, T=0.7: max|dlogprob|={worst:.2e}")


def test_finish_reasons_stop_token_and_stop_string(server):
    ids, _, _ = served_logprobs(server, max_new_tokens=6)
    out = generate(
        server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "stop_token_ids": [ids[2]]}}
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[2]}
    assert out["output_ids"][-1] == ids[2] and len(out["output_ids"]) == ids.index(ids[2]) + 1
    stop = f"w{ids[1]}"
    out = generate(server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "stop": stop}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"]
    batched = generate(server, {"input_ids": [PROMPT, PROMPT[:3]], "sampling_params": {"max_new_tokens": 2}})
    assert isinstance(batched, list) and len(batched) == 2


def test_bad_requests_are_400(server):
    cases = [
        {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "bogus": 1}},
        {"input_ids": [1, 10_000]},
        {"input_ids": PROMPT, "stream": True},
        {"input_ids": PROMPT, "sampling_params": {"temperature": -1}},
    ]
    for body in cases:
        response = post(server, "/generate", body, headers=USER)
        assert response.status_code == 400, body
        assert response.json()["error"]["message"]
    assert post(server, "/generate", {"input_ids": PROMPT}, headers={}).status_code == 401


def test_openai_completion_and_chat_shapes(server, models):
    r = post(
        server,
        "/v1/completions",
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 2, "n": 2},
        headers=USER,
    ).json()
    assert r["object"] == "text_completion" and r["metadata"] == {"weight_version": "A"}
    assert len(r["choices"]) == 2 and r["choices"][1]["index"] == 1
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    logprobs = choice["logprobs"]
    assert logprobs["text_offset"] == [-1, -1, -1] and len(logprobs["tokens"]) == 3
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert r["usage"] == {
        "prompt_tokens": len(PROMPT),
        "total_tokens": len(PROMPT) + 6,
        "completion_tokens": 6,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
    }
    echo = post(
        server, "/v1/completions", {"model": "tiny", "prompt": "w5", "echo": True, "logprobs": 1}, USER
    )
    assert echo.status_code == 400
    chat = post(
        server,
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "w9"}], "max_tokens": 2, "logprobs": True,
         "top_logprobs": 2, "temperature": 0},
        headers=USER,
    ).json()  # fmt: skip
    assert chat["object"] == "chat.completion" and chat["metadata"]["weight_version"] == "A"
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    prompt = tiny_tokenizer().encode("w3 w9 w4")  # the chat template's rendering
    greedy = models["A"].generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False)[0, len(prompt) :]
    assert [c["token"] for c in content] == [f"w{t}" for t in greedy.tolist()]
    models_list = httpx.get(server.url + "/v1/models", headers=USER).json()
    assert models_list["data"][0]["id"] == "tiny"


def test_atroposlib_sglang_client(server, dirs, models, report):
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.sglang_server import SGLangServer

    config = APIServerConfig(
        base_url=server.url + "/v1",
        api_key=USER_KEY,
        model_name="tiny",
        tokenizer_name=str(dirs.tok),
        server_type="sglang",
        health_check=False,
        timeout=60,
    )
    client = SGLangServer(config)

    async def run():
        # The health probe SGLangServer sends every second.
        await client.openai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        prompt, outputs, logprobs, finishes = await client.tokens_and_logprobs_completion(
            prompt="w5 w17 w42", n=3, max_tokens=4, temperature=1.0
        )
        chat = await client.chat_completion(messages=[{"role": "user", "content": "w8"}], n=2, max_tokens=3)
        return prompt, outputs, logprobs, finishes, chat

    prompt, outputs, logprobs, finishes, chat = asyncio.run(run())
    assert prompt == [5, 17, 42] and len(outputs) == 3
    assert all(f["type"] == "length" for f in finishes)
    worst = max(
        max_diff(lp, reference_logprobs(models["A"], prompt, out)[0])
        for out, lp in zip(outputs, logprobs, strict=True)
    )
    assert worst < TOL
    assert len(chat.choices) == 2 and not config.n_kwarg_is_ignored
    report(f"atroposlib tokens_and_logprobs n=3: max|dlogprob|={worst:.2e}")


# ----- weight updates


def sglang_style_payload(named, load_format):
    """What SGLang clients (slime, NeMo-RL) send: ForkingPickler + base64, SimpleNamespace metadata."""
    if load_format == "flattened_bucket":
        flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named])
        meta, offset = [], 0
        for name, t in named:
            size = t.numel() * t.element_size()
            meta.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=offset,
                                              end_idx=offset + size, numel=t.numel()))  # fmt: skip
            offset += size
        obj = {"flattened_tensor": flat, "metadata": meta}
    else:
        obj = list(named)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("load_format", ["flattened_bucket", None, "direct"])
def test_update_from_tensor_in_a_session(server, dirs, models, load_format, report):
    state = hf_state(models["B"])
    half = len(state) // 2
    names = list(state)
    body = {"load_format": load_format, "flush_cache": False}
    no_session = post(server, "/update_weights_from_tensor", {**body, "serialized_named_tensors": ["x"]})
    assert no_session.status_code == 400 and "begin_weight_update" in no_session.json()["message"]
    assert post(server, "/begin_weight_update", {}).json()["success"]
    for chunk, version in ((names[:half], None), (names[half:], "B")):  # two buckets, like a real sync
        named = [(n, state[n].clone()) for n in chunk]
        payload = sglang_style_payload(named, load_format)
        r = post(server, "/update_weights_from_tensor",
                 {**body, "serialized_named_tensors": [payload], "weight_version": version})  # fmt: skip
        assert r.status_code == 200 and r.json() == {
            "success": True,
            "message": "Succeeded to update model weights.",
        }
    assert post(server, "/end_weight_update", {}).json()["success"]
    meta = assert_serves(server, models, "B", report)
    assert meta["weight_version"] == "B"
    restore_a(server, dirs)
    assert_serves(server, models, "A")


def test_update_from_disk_keeps_old_weights_on_failure(server, dirs, models, tmp_path, report):
    bad = post(server, "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert bad.status_code == 400 and not bad.json()["success"]
    unknown = post(server, "/update_weights_from_disk", {"model_path": str(dirs.b), "bogus": 1})
    assert unknown.status_code == 400
    assert_serves(server, models, "A")
    r = post(server, "/update_weights_from_disk", {"model_path": str(dirs.b), "weight_version": "B"})
    assert r.status_code == 200 and r.json()["success"]
    assert httpx.get(server.url + "/model_info", headers=USER).json()["weight_version"] == "B"
    assert_serves(server, models, "B", report)
    restore_a(server, dirs)


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_update_from_distributed_with_test_process_as_rank_0(server, dirs, models, load_format, report):
    from atropos_megatron import sglang_wire
    from atropos_megatron.weights.sync_group import destroy_group, init_custom_process_group

    port, name = free_port(), f"sync-{load_format}"
    init_body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                 "group_name": name, "backend": "gloo"}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/init_weights_update_group", init_body)
        group = init_custom_process_group(
            backend="gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            world_size=2,
            rank=0,
            group_name=name,
            timeout_s=30,
        )
        assert pending.result().json()["success"]
        try:
            state = hf_state(models["B"])
            named = [
                (n, t.to(torch.bfloat16) if "mlp" in n else t) for n, t in state.items()
            ]  # cast on receive
            body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                    "shapes": [list(t.shape) for _, t in named], "group_name": name, "load_format": load_format,
                    "flush_cache": False, "weight_version": "B"}  # fmt: skip
            assert post(server, "/begin_weight_update", {}).json()["success"]
            pending = pool.submit(post, server, "/update_weights_from_distributed", body)
            if load_format == "flattened_bucket":
                torch.distributed.broadcast(sglang_wire.flatten_tensors(named)[0], src=0, group=group)
            else:
                for _, tensor in named:
                    torch.distributed.broadcast(tensor.contiguous(), src=0, group=group)
            assert pending.result().json()["success"], pending.result().text
            assert post(server, "/end_weight_update", {}).json()["success"]
        finally:
            assert post(server, "/destroy_weights_update_group", {"group_name": name}).json()["success"]
            destroy_group(group)
    # The server holds the bf16-rounded MLP weights now.
    rounded = tiny_hf_model("qwen2", seed=1)
    with torch.no_grad():
        for n, p in rounded.named_parameters():
            if "mlp" in n:
                p.copy_(p.to(torch.bfloat16))
    assert_serves(server, {"B": rounded}, "B", report)
    restore_a(server, dirs)


def test_malicious_pickle_is_refused_and_nothing_runs(server, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = base64.b64encode(pickle.dumps(Exploit())).decode()
    assert post(server, "/begin_weight_update", {}).json()["success"]
    r = post(
        server,
        "/update_weights_from_tensor",
        {"serialized_named_tensors": [payload], "load_format": "direct"},
    )
    plain = base64.b64encode(pickle.dumps([("model.norm.weight", torch.ones(64))])).decode()
    r2 = post(
        server, "/update_weights_from_tensor", {"serialized_named_tensors": [plain], "load_format": "direct"}
    )
    assert post(server, "/end_weight_update", {}).json()["success"]
    assert r.status_code == 400 and "refused unpickling global" in r.json()["message"]
    assert "system" in r.json()["message"]
    assert r2.status_code == 400 and "_rebuild_tensor_v2" in r2.json()["message"]  # torch.save-style tensors
    time.sleep(0.2)
    assert not marker.exists()


def test_admin_routes_need_the_admin_key(server):
    for headers in ({}, USER):
        assert post(server, "/pause_generation", {"mode": "in_place"}, headers=headers).status_code == 401
        assert (
            post(server, "/update_weight_version", {"new_version": "x"}, headers=headers).status_code == 401
        )
        assert httpx.get(server.url + "/flush_cache", headers=headers).status_code == 401
    assert httpx.get(server.url + "/flush_cache", headers=ADMIN).text.startswith("Cache flushed.")
    assert httpx.get(server.url + "/health").status_code == 200


# ----- version consistency under load
#
# These run the real app on an engine in this process, so that a test can hold the model's forward
# pass (DecodeHold): a request is then provably mid-decode when the pause or the update lands,
# whatever the machine's speed. (With a server process, "the decode is still running" could only be
# hoped for after a sleep, and on a busy machine the decodes finished first.)


class DecodeHold:
    """Blocks the engine's next forward pass until ``release`` is set; ``entered`` says it is blocked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._handle = model.register_forward_pre_hook(self._hold)

    def _hold(self, module, args) -> None:
        if not self.release.is_set():
            self.entered.set()
            assert self.release.wait(120), "the test never released the held forward pass"

    def close(self) -> None:
        self.release.set()
        self._handle.remove()


@pytest.fixture
def app(dirs):
    """A fresh engine serving model A (weight_version "A") behind the real app, in this process."""
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.engine import EngineOptions, load_engine
    from atropos_megatron.inference.http_server import create_app

    options = EngineOptions(
        model_path=str(dirs.a), served_model_name="tiny", tokenizer_path=str(dirs.tok), weight_version="A"
    )
    engine = load_engine(str(dirs.a), device="cpu", dtype="fp32", options=options)
    hold = DecodeHold(engine.model)
    try:
        with TestClient(create_app(engine)) as client:
            yield types.SimpleNamespace(client=client, engine=engine, hold=hold)
    finally:
        hold.close()
        engine.close()


def _generate_in_process(client, body) -> dict:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.01)


LONG_BODY = {"input_ids": PROMPT, "return_logprob": True,
             "sampling_params": {"max_new_tokens": 120, "temperature": 1.0, "ignore_eos": True}}  # fmt: skip


def _check_one_version(results, models):
    """Every response's tokens have exactly the logprobs of the model its meta_info names."""
    worst = 0.0
    for out in results:
        meta = out["meta_info"]
        expected, _ = reference_logprobs(models[meta["weight_version"]], PROMPT, out["output_ids"])
        worst = max(worst, max_diff([e[0] for e in meta["output_token_logprobs"]], expected))
    assert worst < TOL
    return worst


def _switch_to_b(client, dirs):
    r = client.post(
        "/update_weights_from_disk",
        json={"model_path": str(dirs.b), "weight_version": "B", "flush_cache": False},
    )
    assert r.json()["success"], r.text


@pytest.mark.parametrize("mode", ["abort", "in_place"])
def test_requests_during_a_paused_update_see_one_version(app, dirs, models, mode, report):
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_generate_in_process, app.client, LONG_BODY) for _ in range(4)]
        assert app.hold.entered.wait(120), "no request reached the model"
        pausing = pool.submit(app.client.post, "/pause_generation", json={"mode": mode})
        _wait_until(lambda: app.engine.paused, "the pause")  # lands while a forward pass is held
        app.hold.release.set()
        assert pausing.result(timeout=120).json()["status"] == "ok"
        _switch_to_b(app.client, dirs)
        late = pool.submit(
            _generate_in_process, app.client, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}}
        )
        assert app.client.post("/continue_generation", json={}).json()["status"] == "ok"
        results = [f.result(timeout=120) for f in futures]
        assert (
            late.result(timeout=120)["meta_info"]["weight_version"] == "B"
        )  # held while paused, not refused
    kinds = [r["meta_info"]["finish_reason"]["type"] for r in results]
    versions = [r["meta_info"]["weight_version"] for r in results]
    if mode == "abort":
        assert set(kinds) <= {"abort", "length"} and "abort" in kinds
        aborted = [r for r in results if r["meta_info"]["finish_reason"]["type"] == "abort"]
        assert all(r["meta_info"]["weight_version"] == "A" for r in aborted)
    else:  # the frozen batch restarts from its prompt on B: nobody sees two versions
        assert kinds == ["length"] * 4 and all(len(r["output_ids"]) == 120 for r in results)
        assert versions == ["B"] * 4
    worst = _check_one_version(results, models)
    report(f"{mode}: finish={kinds} versions={versions} max|dlogprob|={worst:.2e}")


def test_update_without_pause_waits_for_running_requests(app, dirs, models, report):
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(_generate_in_process, app.client, LONG_BODY)
        assert app.hold.entered.wait(120), "the request never reached the model"
        updating = pool.submit(_switch_to_b, app.client, dirs)  # must wait for the running batch
        _wait_until(lambda: app.engine.update_waiting, "the update request")
        app.hold.release.set()
        result = running.result(timeout=120)
        updating.result(timeout=120)
    assert result["meta_info"]["finish_reason"]["type"] == "length" and len(result["output_ids"]) == 120
    assert result["meta_info"]["weight_version"] == "A"  # decoded to the end on A, then the update ran
    worst = _check_one_version([result], models)
    assert _generate_in_process(app.client, LONG_BODY)["meta_info"]["weight_version"] == "B"
    report(f"update waited for a running request (A to the end), then B; max|dlogprob|={worst:.2e}")


# ----- in-process app checks (no subprocess): protocol generations


@pytest.fixture(scope="module")
def engine(dirs):
    from atropos_megatron.inference.engine import EngineOptions, load_engine

    options = EngineOptions(model_path=str(dirs.a), served_model_name="tiny", tokenizer_path=str(dirs.tok))
    eng = load_engine(str(dirs.a), device="cpu", dtype="fp32", options=options)
    yield eng
    eng.close()


def test_sessions_are_absent_before_0_5_21(engine):
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.http_server import create_app

    with TestClient(create_app(engine, sglang_version="0.5.17")) as client:
        assert client.post("/begin_weight_update", json={}).status_code == 404
        assert client.post("/end_weight_update", json={}).status_code == 404
        assert client.get("/server_info").json()["version"] == "0.5.17"
        state = hf_state(tiny_hf_model("qwen2", seed=0))
        payload = sglang_style_payload(
            [("model.norm.weight", state["model.norm.weight"])], "flattened_bucket"
        )
        r = client.post("/update_weights_from_tensor",
                        json={"serialized_named_tensors": [payload], "load_format": "flattened_bucket"})  # fmt: skip
        assert r.status_code == 200 and r.json()["success"]  # no session needed
    with TestClient(create_app(engine, sglang_version="0.5.23")) as client:
        assert client.post("/end_weight_update", json={}).json()["success"] is False  # none open
        assert client.post("/begin_weight_update", json={}).json()["success"]
        assert client.post("/end_weight_update", json={}).json()["success"]


def test_health_generate_is_503_while_paused(engine):
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.http_server import create_app

    with TestClient(create_app(engine)) as client:
        assert client.get("/health_generate").status_code == 200
        client.post("/pause_generation", json={"mode": "retract"})
        assert client.get("/health_generate").status_code == 503
        client.post("/continue_generation", json={})
        assert client.get("/health_generate").status_code == 200
        assert client.post("/pause_generation", json={"mode": "sideways"}).status_code == 400


def test_concurrent_updates_run_one_at_a_time(engine):
    """Two updates submitted together never interleave (the ticket lock), in arrival order."""
    order: list[str] = []
    lock_check = threading.Lock()

    def update(tag):
        def body():
            assert lock_check.acquire(blocking=False), "two updates ran at once"
            order.append(tag)
            time.sleep(0.05)
            lock_check.release()

        return body

    tickets = [engine.take_ticket() for _ in range(3)]

    def run(i):
        with engine.ordered(tickets[i]):
            engine.run_quiescent(update(str(i)))

    threads = [threading.Thread(target=run, args=(i,)) for i in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["0", "1", "2"]
