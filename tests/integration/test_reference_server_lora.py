"""The reference server's LoRA routes (SGLang 0.5.23's) against ``peft.PeftModel`` and SGLang's replies.

Adapters are made by ``peft`` itself (``get_peft_model`` with random non-zero A and B, then
``save_pretrained``) on the tiny Qwen2 "A" the server serves. Served log-probs of an adapter are
compared with ``PeftModel.from_pretrained`` on the same base (fp32); base rows of the same batch with
the plain HF model. One server process (module scope) serves the route and selection checks; batching,
waiting and the LoRA-off replies run in-process on the real app (``TestClient``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import shutil
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler

import httpx
import pytest
import torch

from tests.hf_models import random_peft_model, save_tiny_checkpoint, tiny_hf_model, tiny_tokenizer
from tests.reference_server import ReferenceServer, served_logprobs

ADMIN_KEY = "admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPTS = [[5, 17, 42, 99, 7, 3], [8, 9, 10, 11], [200, 31, 64, 2, 77]]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5  # fp32; measured differences are reported (~1e-6: KV-cached decoding vs one whole forward)
PREFILL_TOL = 1e-6  # one prompt's log-probs from one forward pass: the same arithmetic as PeftModel's
pytestmark = pytest.mark.filterwarnings(
    "ignore:Model has `tie_word_embeddings=True`:UserWarning",  # PEFT, for the embed_tokens/lm_head adapter
    "ignore:Setting `save_embedding_layers`:UserWarning",
)
NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
CHAT_TEMPLATE = (
    "{% for message in messages %}w3 {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w4{% endif %}"
)


def make_adapter(directory, *, seed, r, alpha, targets, **config):
    """A PEFT LoRA adapter for the tiny Qwen2 with random non-zero A and B (PEFT zero-inits B)."""
    base = tiny_hf_model("qwen2", seed=0)
    model = random_peft_model(
        base, seed=seed, scale=0.2, r=r, lora_alpha=alpha, target_modules=targets, **config
    )
    model.save_pretrained(directory)
    return str(directory)


def edited_copy(source, target, **changes):
    """A copy of an adapter directory with ``adapter_config.json`` fields changed."""
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return str(target)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_server_lora")
    save_tiny_checkpoint("qwen2", root / "a")
    save_tiny_checkpoint("qwen2", root / "b", seed=1)
    # A tokenizer directory of its own: see test_reference_server.py (no config.json beside it).
    tiny_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(root / "tok")
    full = make_adapter(root / "full", seed=3, r=4, alpha=8, targets=ALL_LINEAR)
    return types.SimpleNamespace(
        a=root / "a",
        b=root / "b",
        tok=root / "tok",
        root=root,
        full=full,
        qv=make_adapter(root / "qv", seed=4, r=2, alpha=16, targets=["q_proj", "v_proj"]),
        rslora=make_adapter(root / "rslora", seed=5, r=4, alpha=8, targets=ALL_LINEAR, use_rslora=True),
        big=make_adapter(root / "big", seed=6, r=16, alpha=16, targets=["q_proj", "v_proj"]),
        embed=make_adapter(
            root / "embed", seed=7, r=2, alpha=4, targets=["embed_tokens", "lm_head", "o_proj"]
        ),
    )


@pytest.fixture(scope="module")
def server(dirs):
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")  # how SGLang clients send CPU tensors
    try:
        with ReferenceServer(
            dirs.a,
            tokenizer_path=dirs.tok,
            served_model_name="tiny",
            admin_api_key=ADMIN_KEY,
            enable_lora=True,
            max_lora_rank=8,
            lora_target_modules=["all"],
        ) as srv:
            yield srv
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def post(url, path, body, headers=ADMIN):
    return httpx.post(url + path, json=body, headers=headers, timeout=60.0)


def peft_model(adapter_dir, base_seed=0):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_hf_model("qwen2", seed=base_seed), adapter_dir).eval()


def reference(model, tokens):
    """log p(tokens[j] | tokens[:j]) for j >= 1, fp32, from a whole-sequence forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[j - 1, tokens[j]].item() for j in range(1, len(tokens))]


def generate(url, prompts, lora_path, max_new_tokens=4):
    """Greedy /generate of a batch with prompt and output log-probs; one result per prompt."""
    body = {"input_ids": prompts, "lora_path": lora_path, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    response = post(url, "/generate", body, headers={})
    assert response.status_code == 200, response.text
    return response.json()


def served_vs_reference(result, prompt, model):
    """Max |served - reference| over the prompt's and the generated tokens' log-probs."""
    meta = result["meta_info"]
    served = [e[0] for e in meta["input_token_logprobs"][1:]] + [e[0] for e in meta["output_token_logprobs"]]
    expected = reference(model, prompt + result["output_ids"])
    assert len(served) == len(expected)
    return max(abs(s - e) for s, e in zip(served, expected, strict=True))


def reply(success, error_message, loaded):
    return {"rid": None, "http_worker_ipc": None, "success": success, "error_message": error_message,
            "loaded_adapters": loaded}  # fmt: skip


def load(url, name, path, **extra):
    return post(url, "/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})


def unload(url, name):
    return post(url, "/unload_lora_adapter", {"lora_name": name})


# ----- loading from disk, selection in /generate, mixed batches


def test_disk_adapters_serve_peft_logprobs_in_one_mixed_batch(server, dirs, report):
    r = load(server.url, "full", dirs.full)
    assert r.status_code == 200 and r.json() == reply(True, "", {"full": dirs.full})
    r = load(server.url, "qv", dirs.qv, pinned=True)
    assert r.status_code == 200 and r.json() == reply(True, "", {"full": dirs.full, "qv": dirs.qv})

    results = generate(server.url, PROMPTS, [None, "full", "qv"])
    models = [tiny_hf_model("qwen2", seed=0), peft_model(dirs.full), peft_model(dirs.qv)]
    diffs = [served_vs_reference(out, p, m) for out, p, m in zip(results, PROMPTS, models, strict=True)]
    assert max(diffs) <= TOL, diffs
    # Not vacuous: the adapters move the log-probs far beyond the tolerance.
    base_lp, adapter_lp = reference(models[0], PROMPTS[1]), reference(models[1], PROMPTS[1])
    shift = max(abs(a - b) for a, b in zip(base_lp, adapter_lp, strict=True))
    assert shift > 0.05
    report(
        f"mixed batch base/full/qv vs HF/PeftModel: max|dlogprob|={max(diffs):.2e} (adapter shift {shift:.2f})"
    )

    single = generate(server.url, PROMPTS[0], "full")  # a string: one prompt (or broadcast over a batch)
    assert served_vs_reference(single, PROMPTS[0], models[1]) <= TOL
    prefill = served_logprobs(server.url, PROMPTS[0], lora_path="full")[0]
    exact = max(abs(a - b) for a, b in zip(prefill, reference(models[1], PROMPTS[0]), strict=True))
    assert exact <= PREFILL_TOL
    report(f"one prompt, prefill only, vs PeftModel: max|dlogprob|={exact:.2e}")

    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert cards[0]["id"] == "tiny" and cards[0]["parent"] is None
    adapters = {card["id"]: card for card in cards[1:]}
    assert set(adapters) == {"full", "qv"}
    assert adapters["full"]["parent"] == "tiny" and adapters["full"]["root"] == dirs.full
    assert adapters["full"]["max_model_len"] is None

    r = unload(server.url, "qv")
    assert r.status_code == 200 and r.json() == reply(True, "", {"full": dirs.full})
    assert unload(server.url, "full").json() == reply(True, "", {})


def test_an_unloaded_disk_adapter_is_reloaded_by_name(server, dirs):
    """SGLang 0.5.23 remembers every name it loaded and reloads it from its path on the next request."""
    assert load(server.url, "full", dirs.full).json()["success"]
    assert unload(server.url, "full").json() == reply(True, "", {})
    result = generate(server.url, PROMPTS[1], "full")
    assert served_vs_reference(result, PROMPTS[1], peft_model(dirs.full)) <= TOL
    assert unload(server.url, "full").json() == reply(True, "", {})  # it was loaded again


def test_unknown_adapter_names_get_sglang_errors(server, dirs):
    assert load(server.url, "full", dirs.full).json()["success"]
    try:
        r = post(server.url, "/generate", {"input_ids": PROMPTS[0], "lora_path": "nope"}, headers={})
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert message.startswith(
            "Got LoRA adapter that has never been loaded: nope\nAll loaded adapters: dict_keys(["
        )
        assert "'full'" in message
        r = post(
            server.url, "/v1/completions", {"model": "tiny:nope", "prompt": PROMPTS[0], "max_tokens": 1}, {}
        )
        assert r.status_code == 400
        body = r.json()
        assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400
        assert body["message"].startswith("Got LoRA adapter that has never been loaded: nope")
        r = post(server.url, "/generate", {"input_ids": [PROMPTS[0]] * 2, "lora_path": ["full"]}, headers={})
        assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    finally:
        unload(server.url, "full")


# ----- the OpenAI routes


def openai_diff(url, path, body, model, prompt):
    """A greedy 3-token /v1 answer with log-probs; max |served - ``model``| over its tokens."""
    r = post(
        url, path, {**body, "max_tokens": 3, "temperature": 0, "logprobs": True if "chat" in path else 0}, {}
    )
    assert r.status_code == 200, (body, r.text)
    logprobs = r.json()["choices"][0]["logprobs"]
    if "chat" in path:
        tokens, served = (
            [e["token"] for e in logprobs["content"]],
            [e["logprob"] for e in logprobs["content"]],
        )
    else:
        tokens, served = logprobs["tokens"], logprobs["token_logprobs"]
    ids = [int(token.removeprefix("w")) for token in tokens]
    expected = reference(model, prompt + ids)[len(prompt) - 1 :]
    return max(abs(a - b) for a, b in zip(served, expected, strict=True))


def test_openai_routes_select_by_model_then_lora_path(server, dirs, report):
    assert load(server.url, "full", dirs.full).json()["success"]
    adapter, base = peft_model(dirs.full), tiny_hf_model("qwen2", seed=0)
    chat_prompt = tiny_tokenizer().encode("w3 w9 w4")  # CHAT_TEMPLATE's rendering of one user turn
    try:
        cases = [
            ({"model": "tiny:full"}, adapter),
            ({"model": "tiny", "lora_path": "full"}, adapter),
            ({"model": "tiny:full", "lora_path": "never-loaded"}, adapter),  # model wins
            ({"model": "tiny"}, base),
        ]
        diffs = [openai_diff(server.url, "/v1/completions", {**b, "prompt": PROMPTS[0]}, m, PROMPTS[0])
                 for b, m in cases]  # fmt: skip
        messages = [{"role": "user", "content": "w9"}]
        diffs += [openai_diff(server.url, "/v1/chat/completions", {**b, "messages": messages}, m, chat_prompt)
                  for b, m in cases]  # fmt: skip
    finally:
        unload(server.url, "full")
    assert max(diffs) <= TOL, diffs
    report(f"/v1 completions + chat, model=tiny:full or lora_path: max|dlogprob|={max(diffs):.2e}")


# ----- loading from tensors


def lora_payload(adapter_dir, load_format):
    """What an SGLang client (verl) sends: a ForkingPickler dict {name: tensor} or a flattened bucket."""
    from safetensors.torch import load_file

    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    if load_format == "flattened_bucket":
        flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors.values()])
        meta, offset = [], 0
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            meta.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=offset,
                                              end_idx=offset + size, numel=t.numel()))  # fmt: skip
            offset += size
        obj = {"flattened_tensor": flat, "metadata": meta}
    else:
        obj = dict(tensors)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    sums = {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in tensors.items()}  # fmt: skip
    return base64.b64encode(buffer.getvalue()).decode(), sums


@pytest.mark.parametrize("load_format", [None, "flattened_bucket"])
def test_load_from_tensors(server, dirs, load_format, report):
    payload, sums = lora_payload(dirs.full, load_format)
    config = json.loads((dirs.root / "full" / "adapter_config.json").read_text())
    body = {"lora_name": "t", "config_dict": config, "serialized_named_tensors": [payload],
            "load_format": load_format, "expected_checksums": sums}  # fmt: skip
    r = post(server.url, "/load_lora_adapter_from_tensors", body)
    assert r.status_code == 200 and r.json() == reply(True, "", {"t": "__tensor__"})
    results = generate(server.url, PROMPTS[:2], ["t", None])
    diff = served_vs_reference(results[0], PROMPTS[0], peft_model(dirs.full))
    assert diff <= TOL and served_vs_reference(results[1], PROMPTS[1], tiny_hf_model("qwen2", seed=0)) <= TOL
    report(f"from tensors ({load_format}): max|dlogprob|={diff:.2e}")
    assert unload(server.url, "t").json() == reply(True, "", {})
    # A tensor adapter cannot be reloaded implicitly (SGLang: its path is "__tensor__").
    r = post(server.url, "/generate", {"input_ids": PROMPTS[0], "lora_path": "t"}, headers={})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("Failed to implicitly load LoRA adapter t: ")

    payload, _ = lora_payload(dirs.full, load_format)
    bad = {**body, "lora_name": "t2", "serialized_named_tensors": [payload],
           "expected_checksums": {**sums, next(iter(sums)): "0" * 64}}  # fmt: skip
    r = post(server.url, "/load_lora_adapter_from_tensors", bad)
    assert r.status_code == 400 and r.json()["success"] is False
    assert r.json()["error_message"].startswith("[LORA-CHECK] rank0 adapter sync MISMATCH of ")


def test_adapter_applies_on_top_of_updated_base_weights(server, dirs, report):
    assert load(server.url, "full", dirs.full).json()["success"]
    try:
        r = post(server.url, "/update_weights_from_disk", {"model_path": str(dirs.b), "weight_version": "B"})
        assert r.json()["success"], r.text
        results = generate(server.url, PROMPTS[:2], ["full", None])
        diff = served_vs_reference(results[0], PROMPTS[0], peft_model(dirs.full, base_seed=1))
        assert diff <= TOL
        assert served_vs_reference(results[1], PROMPTS[1], tiny_hf_model("qwen2", seed=1)) <= TOL
        report(f"adapter on base B after /update_weights_from_disk: max|dlogprob|={diff:.2e}")
    finally:
        assert post(server.url, "/update_weights_from_disk", {"model_path": str(dirs.a)}).json()["success"]
        unload(server.url, "full")


def test_scale_is_alpha_over_r_even_for_rslora(server, dirs, tmp_path):
    """SGLang reads no use_rslora: the served adapter is PEFT's with plain lora_alpha / r."""
    assert load(server.url, "rs", dirs.rslora).json()["success"]
    try:
        result = generate(server.url, PROMPTS[0], "rs")
    finally:
        unload(server.url, "rs")
    plain = edited_copy(dirs.root / "rslora", tmp_path / "plain", use_rslora=False)
    assert served_vs_reference(result, PROMPTS[0], peft_model(plain)) <= TOL
    assert served_vs_reference(result, PROMPTS[0], peft_model(dirs.rslora)) > 1e-3  # PEFT's alpha / sqrt(r)


# ----- load errors: SGLang's status and texts


def test_load_errors_use_sglang_texts(server, dirs, tmp_path):
    assert load(server.url, "full", dirs.full).json()["success"]
    loaded = {"full": dirs.full}
    try:
        r = load(server.url, "full", dirs.qv)
        assert r.status_code == 400
        assert r.json() == reply(
            False, "Failed to load LoRA adapter full because it is already loaded", loaded
        )
        r = load(server.url, "big", dirs.big)  # r=16 > --max-lora-rank 8
        assert r.status_code == 400 and r.json()["loaded_adapters"] == loaded
        assert r.json()["error_message"] == (
            "LoRA adapter big with rank 16 is incompatible with the current LoRA memory pool configuration. "
            "Please ensure that the LoRA adapter's rank is within the configured `--max-lora-rank` and that "
            "the target modules are included in `--lora-target-modules`."
        )
        dora = edited_copy(dirs.root / "qv", tmp_path / "dora", use_dora=True)
        r = load(server.url, "dora", dora)
        assert r.status_code == 400 and r.json() == reply(
            False, "Failed to load dora because LoRA serving currently doesn't support DoRA adapters", loaded
        )
        loha = edited_copy(dirs.root / "qv", tmp_path / "loha", peft_type="LOHA")
        r = load(server.url, "loha", loha)  # SGLang asserts without a message
        assert r.status_code == 400 and r.json() == reply(False, "", loaded)
        r = unload(server.url, "nope")
        assert r.status_code == 400
        assert r.json() == reply(
            False, "LoRA with name nope does not exist. Loaded LoRAs: odict_keys(['full'])", None
        )
        r = load(server.url, "x", str(tmp_path / "missing"))
        assert r.status_code == 400 and "not a directory" in r.json()["error_message"]
        r = post(server.url, "/load_lora_adapter", {"lora_name": "x"})
        assert r.status_code == 400 and r.json() == reply(False, "missing field(s) ['lora_path']", None)
        r = httpx.post(
            server.url + "/load_lora_adapter", json={"lora_name": "y", "lora_path": dirs.qv}, timeout=60
        )
        assert r.status_code == 401  # an admin route, like SGLang's ADMIN_OPTIONAL
    finally:
        unload(server.url, "full")


def test_embedding_and_lm_head_adapters(server, dirs, report):
    """``--lora-target-modules all`` includes embed_tokens and lm_head (PEFT's lora_embedding_A/B)."""
    assert load(server.url, "embed", dirs.embed).json()["success"]
    try:
        result = generate(server.url, PROMPTS[2], "embed")
    finally:
        unload(server.url, "embed")
    diff = served_vs_reference(result, PROMPTS[2], peft_model(dirs.embed))
    assert diff <= TOL
    report(f"embed_tokens + lm_head + o_proj adapter: max|dlogprob|={diff:.2e}")


# ----- in-process: LoRA off, other flags, batching, unload while requests run


@contextlib.contextmanager
def lora_app(dirs, **lora_flags):
    """The real app on a fresh engine serving A; ``lora_flags`` are LoraOptions (none: LoRA off)."""
    from fastapi.testclient import TestClient

    from atropos_megatron.inference.engine import EngineOptions, load_engine
    from atropos_megatron.inference.http_server import create_app
    from atropos_megatron.inference.lora_options import LoraOptions

    options = EngineOptions(model_path=str(dirs.a), served_model_name="tiny", tokenizer_path=str(dirs.tok),
                            lora=LoraOptions(**lora_flags) if lora_flags else None)  # fmt: skip
    engine = load_engine(str(dirs.a), device="cpu", dtype="fp32", options=options)
    try:
        with TestClient(create_app(engine)) as client:
            yield types.SimpleNamespace(client=client, engine=engine)
    finally:
        engine.close()


def test_lora_off_answers_like_sglang(dirs):
    with lora_app(dirs) as app:
        for path, body in (("/load_lora_adapter", {"lora_name": "a", "lora_path": dirs.full}),
                           ("/unload_lora_adapter", {"lora_name": "a"}),
                           ("/load_lora_adapter_from_tensors",
                            {"lora_name": "a", "config_dict": {}, "serialized_named_tensors": ["x"]})):  # fmt: skip
            r = app.client.post(path, json=body)
            assert r.status_code == 400 and r.json() == reply(False, NOT_ENABLED, None), path
        r = app.client.post("/generate", json={"input_ids": [PROMPTS[0]] * 2, "lora_path": [None, "a"]})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "LoRA adapter 'a' was requested, but LoRA is not enabled. Please launch the server with "
            "--enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint."
        )
        assert (
            app.client.post("/generate", json={"input_ids": PROMPTS[0], "lora_path": None}).status_code == 200
        )
        r = app.client.post(
            "/v1/completions", json={"model": "tiny:a", "prompt": PROMPTS[0], "max_tokens": 1}
        )
        assert r.status_code == 400 and r.json()["message"].startswith("LoRA adapter 'a' was requested")
        assert [card["id"] for card in app.client.get("/v1/models").json()["data"]] == ["tiny"]


def test_adapters_must_fit_the_servers_target_modules_and_pins(dirs):
    with lora_app(dirs, max_lora_rank=8, target_modules=("q_proj", "v_proj"), max_loras_per_batch=2) as app:
        r = app.client.post("/load_lora_adapter", json={"lora_name": "full", "lora_path": dirs.full})
        assert r.status_code == 400 and r.json()["error_message"].startswith(
            "LoRA adapter full with rank 4 is incompatible with the current LoRA memory pool configuration."
        )
        pin = {"lora_path": dirs.qv, "pinned": True}
        r = app.client.post("/load_lora_adapter", json={"lora_name": "qv", **pin})
        assert r.status_code == 200 and r.json() == reply(True, "", {"qv": dirs.qv})
        r = app.client.post("/load_lora_adapter", json={"lora_name": "p", **pin})  # 2 slots: 1 pinned at most
        assert r.status_code == 400 and r.json()["error_message"].startswith(
            "Failed to load LoRA adapter p as a pinned adapter. It is not allowed to pin all slots"
        )


class ForwardLog:
    """Records the batch size of every forward pass of the served model; can hold the first one."""

    def __init__(self, model, hold: bool = False) -> None:
        self.sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()
        self._handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, _module, _args, kwargs):
        self.sizes.append(int(kwargs["input_ids"].shape[0]))
        self.entered.set()
        assert self.release.wait(120), "the test never released the held forward pass"

    def close(self) -> None:
        self.release.set()
        self._handle.remove()


@pytest.mark.parametrize("max_loras", [8, 2])
def test_max_loras_per_batch_counts_distinct_adapters(dirs, max_loras, report):
    with lora_app(dirs, max_lora_rank=8, target_modules=("all",), max_loras_per_batch=max_loras) as app:
        for name in ("full", "qv"):
            assert app.client.post(
                "/load_lora_adapter", json={"lora_name": name, "lora_path": getattr(dirs, name)}
            ).json()["success"]
        log = ForwardLog(app.engine.model)
        try:
            body = {"input_ids": PROMPTS, "lora_path": [None, "full", "qv"], "return_logprob": True,
                    "logprob_start_len": 0,
                    "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}}  # fmt: skip
            results = app.client.post("/generate", json=body).json()
        finally:
            log.close()
    # One batch of three rows; with 2 slots (base counts as one) base+full first, then qv alone.
    expected_sizes = [3, 3] if max_loras == 8 else [2, 2, 1, 1]
    assert log.sizes == expected_sizes
    models = [tiny_hf_model("qwen2", seed=0), peft_model(dirs.full), peft_model(dirs.qv)]
    diff = max(served_vs_reference(o, p, m) for o, p, m in zip(results, PROMPTS, models, strict=True))
    assert diff <= TOL
    report(f"max_loras_per_batch={max_loras}: forward batch sizes {log.sizes}, max|dlogprob|={diff:.2e}")


def test_unload_waits_for_the_requests_that_hold_the_adapter(dirs):
    """SGLang's two phases: the name goes at once, the adapter stays until its requests finished."""
    with lora_app(dirs, max_lora_rank=8, target_modules=("all",)) as app:
        assert app.client.post(
            "/load_lora_adapter", json={"lora_name": "full", "lora_path": dirs.full}
        ).json()["success"]
        log = ForwardLog(app.engine.model, hold=True)
        registry = app.client.app.state.lora.registry
        body = {"input_ids": PROMPTS[0], "lora_path": "full", "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}  # fmt: skip
        try:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(app.client.post, "/generate", json=body)
                assert log.entered.wait(120), "the request never reached the model"
                unloading = pool.submit(app.client.post, "/unload_lora_adapter", json={"lora_name": "full"})
                _wait_until(lambda: not registry.is_loaded("full"), "the unload")
                assert not unloading.done()  # held by the running request
                log.release.set()
                result, unloaded = running.result(timeout=120).json(), unloading.result(timeout=120)
        finally:
            log.close()
        assert unloaded.status_code == 200 and unloaded.json() == reply(True, "", {})
        assert result["meta_info"]["finish_reason"]["type"] == "length"
        assert (
            served_vs_reference(result, PROMPTS[0], peft_model(dirs.full)) <= TOL
        )  # finished on the adapter


def _wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.01)


def test_serve_flags_are_checked_like_sglang(dirs, capsys, caplog):
    from atropos_megatron.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-loras-per-batch" in capsys.readouterr().out
    assert main(["serve", "--model", str(dirs.a), "--enable-lora", "--max-lora-rank", "8"]) == 2
    assert "you need to specify both --max-lora-rank and --lora-target-modules" in caplog.text
    assert main(["serve", "--model", str(dirs.a), "--enable-lora", "--max-lora-rank", "8",
                 "--lora-target-modules", "all", "q_proj"]) == 2  # fmt: skip
    assert "it should be the only module specified" in caplog.text
    # SGLang's names, but a module this model does not have (an MLA projection): refused at start-up.
    assert main(["serve", "--model", str(dirs.a), "--tokenizer-path", str(dirs.tok), "--enable-lora",
                 "--max-lora-rank", "8", "--lora-target-modules", "q_a_proj"]) == 2  # fmt: skip
    assert "this model has no such module" in caplog.text
