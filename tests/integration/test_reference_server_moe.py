"""MoE models on the reference server: per-expert checkpoint names through every weight-update route.

One server per architecture (``qwen3_moe``, ``mixtral``) starts on a tiny model A (seed 0); updates
switch it to B (seed 1) and back. Updates carry the names a checkpoint and SGLang use (one tensor per
expert and projection) while transformers holds each layer's experts fused, so every tensor must land
in exactly its slice. The buckets split the experts of layer 0 across two requests, even the gate and
up projections of one expert, and the served log-probs after the first bucket must be those of the
half-updated model. That reference is built by transformers' own loader (the mixed per-expert state
written as a checkpoint and read by ``from_pretrained``), independently of the server's mapping.
Log-probs are compared in fp32 with the HF model's in this process.
"""

from __future__ import annotations

import re
import shutil
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from atropos_megatron import sglang_wire
from tests.atropos_api import free_port
from tests.hf_models import hf_state, save_tiny_checkpoint, tiny_tokenizer
from tests.reference_server import ReferenceServer, served_logprobs

ADMIN_KEY = "admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROBE = [5, 17, 42, 99, 3, 249, 128, 64, 7, 31, 200, 11, 150, 77, 23, 180]
TOL = 1e-6
DECODE_TOL = 1e-5  # decode steps reuse the KV cache; the reference is one full forward pass
EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
GATE_LEAF = {"qwen3_moe": "gate_proj", "mixtral": "w1"}


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    """A server on A; B's per-expert state; the checkpoint directories."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    models = {
        "A": save_tiny_checkpoint(arch, root / "a", seed=0),
        "B": save_tiny_checkpoint(arch, root / "b", seed=1),
    }
    tiny_tokenizer().save_pretrained(root / "tok")  # AutoTokenizer would pick the family's own class
    previous = torch.multiprocessing.get_sharing_strategy()
    sglang_wire.use_file_system_sharing()  # how SGLang clients send CPU tensors to another process
    try:
        with ReferenceServer(
            root / "a",
            tokenizer_path=root / "tok",
            served_model_name="tiny",
            admin_api_key=ADMIN_KEY,
            weight_version="A",
        ) as server:
            yield types.SimpleNamespace(arch=arch, root=root, server=server, models=models)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


def post(moe, path: str, body: dict) -> httpx.Response:
    return httpx.post(moe.server.url + path, json=body, headers=ADMIN, timeout=60)


@torch.no_grad()
def hf_logprobs(model) -> list[float]:
    tokens = torch.tensor([PROBE])
    logprobs = torch.log_softmax(model(tokens).logits.float(), dim=-1)[0, :-1]
    return logprobs.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def assert_serves(moe, model, version: str, report=None, what: str = "") -> float:
    got, served_version = served_logprobs(moe.server.url, PROBE)
    diff = max_diff(got, hf_logprobs(model))
    if report is not None:
        report(f"{moe.arch} {what or version}: max|dlogprob|={diff:.2e}")
    assert served_version == version
    assert diff < TOL, f"{moe.arch}: served log-probs {diff:.2e} away from {what or version}"
    return diff


def split_buckets(arch: str, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Two buckets that split layer 0's experts: experts 0-1 and expert 2's gate first, the rest after."""
    first, second = [], []
    for name in state:
        match = EXPERT.fullmatch(name)
        if match is None:
            first.append(name)  # attention, norms, routers, embeddings
            continue
        layer, expert, leaf = int(match[1]), int(match[2]), match[3]
        early = layer == 0 and (expert < 2 or (expert == 2 and leaf == GATE_LEAF[arch]))
        (first if early else second).append(name)
    return first, second


def half_updated_model(moe, names: list[str]):
    """A with ``names`` taken from B, loaded by transformers from a per-expert checkpoint."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    b = hf_state(moe.models["B"])
    state = {**hf_state(moe.models["A"]), **{n: b[n] for n in names}}
    directory = moe.root / "half"
    directory.mkdir(exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(moe.root / "a" / "config.json", directory / "config.json")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def restore_a(moe) -> None:
    response = post(
        moe, "/update_weights_from_disk", {"model_path": str(moe.root / "a"), "weight_version": "A"}
    )
    assert response.json()["success"], response.text
    assert_serves(moe, moe.models["A"], "A")


def push_tensors(moe, state, names, load_format, version=None) -> None:
    named = [(n, state[n]) for n in names]
    body = {
        "serialized_named_tensors": sglang_wire.encode_tensor_update(named, load_format=load_format),
        "load_format": load_format,
        "flush_cache": False,
        "weight_version": version,
    }
    assert post(moe, "/begin_weight_update", {}).json()["success"]
    response = post(moe, "/update_weights_from_tensor", body)
    assert response.status_code == 200 and response.json()["success"], response.text
    assert post(moe, "/end_weight_update", {}).json()["success"]


# ------------------------------------------------------------------------------------------------


def test_state_names_resolve_to_the_fused_slices_transformers_writes(moe):
    """Every checkpoint name maps to a view equal to what ``save_pretrained`` writes, and nothing else."""
    from atropos_megatron.inference.checkpoint_targets import CheckpointTargets

    model = moe.models["A"]
    targets, state = CheckpointTargets(model), hf_state(model)
    names = {name for param, _ in model.named_parameters() for name in targets.checkpoint_names(param)}
    assert names == set(state)
    for name, tensor in state.items():
        assert torch.equal(targets.get(name), tensor), name
    in_memory_only = set(dict(model.named_parameters())) - set(state)  # fused experts, Mixtral's router
    assert in_memory_only and all(targets.get(n) is None for n in in_memory_only)


def test_tensor_route_updates_exactly_the_slices_sent(moe, report):
    state = hf_state(moe.models["B"])
    first, second = split_buckets(moe.arch, state)
    push_tensors(moe, state, first, sglang_wire.FLATTENED_BUCKET)
    half = half_updated_model(moe, first)
    for other in ("A", "B"):  # the half-updated state is told apart from both by the probe
        assert max_diff(hf_logprobs(half), hf_logprobs(moe.models[other])) > 1e-3
    assert_serves(moe, half, "A", report, "A + first bucket of B")
    push_tensors(moe, state, second, None, version="B")
    assert_serves(moe, moe.models["B"], "B", report)
    restore_a(moe)


def test_disk_route_loads_per_expert_checkpoints(moe, report):
    response = post(
        moe, "/update_weights_from_disk", {"model_path": str(moe.root / "b"), "weight_version": "B"}
    )
    assert response.status_code == 200 and response.json()["success"], response.text
    assert_serves(moe, moe.models["B"], "B", report)
    restore_a(moe)


def test_distributed_route_in_two_buckets(moe, report):
    from atropos_megatron.weights.sync_group import destroy_group, init_custom_process_group

    state = hf_state(moe.models["B"])
    port, name = free_port(), f"sync-{moe.arch}"
    init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": name, "backend": "gloo"}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, moe, "/init_weights_update_group", init)
        group = init_custom_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0, group_name=name
        )
        assert pending.result().json()["success"]
        try:
            assert post(moe, "/begin_weight_update", {}).json()["success"]
            for names, load_format in zip(
                split_buckets(moe.arch, state), (None, "flattened_bucket"), strict=True
            ):
                named = [(n, state[n]) for n in names]
                body = {"names": names, "dtypes": ["float32"] * len(names),
                        "shapes": [list(t.shape) for _, t in named], "group_name": name,
                        "load_format": load_format, "flush_cache": False, "weight_version": "B"}  # fmt: skip
                pending = pool.submit(post, moe, "/update_weights_from_distributed", body)
                if load_format is None:
                    for _, tensor in named:
                        torch.distributed.broadcast(tensor, src=0, group=group)
                else:
                    torch.distributed.broadcast(sglang_wire.flatten_tensors(named)[0], src=0, group=group)
                assert pending.result().json()["success"], pending.result().text
            assert post(moe, "/end_weight_update", {}).json()["success"]
        finally:
            assert post(moe, "/destroy_weights_update_group", {"group_name": name}).json()["success"]
            destroy_group(group)
    assert_serves(moe, moe.models["B"], "B", report)
    restore_a(moe)


def test_bad_expert_names_and_shapes_are_refused_whole(moe):
    state = hf_state(moe.models["B"])
    valid, good = next(iter(state)), next(n for n in state if EXPERT.fullmatch(n))
    config = moe.models["A"].config
    count = getattr(config, "num_experts", None) or config.num_local_experts
    unknown = re.sub(r"experts\.\d+\.", f"experts.{count}.", good)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    cases = (
        (unknown, state[good], f"experts 0..{count - 1}"),
        (good, state[good].t(), f"!= model's {list(state[good].shape)}"),
        (fused, torch.zeros(1), "in-memory transformers name"),
    )
    for name, tensor, reason in cases:
        named = [(valid, state[valid]), (name, tensor.contiguous())]
        body = {"serialized_named_tensors": sglang_wire.encode_tensor_update(named, load_format=None),
                "flush_cache": False}  # fmt: skip
        assert post(moe, "/begin_weight_update", {}).json()["success"]
        response = post(moe, "/update_weights_from_tensor", body)
        assert post(moe, "/end_weight_update", {}).json()["success"]
        assert response.status_code == 400 and not response.json()["success"]
        message = response.json()["message"]
        assert name in message and reason in message, message
    assert_serves(moe, moe.models["A"], "A")  # the valid tensor beside each bad one was not applied either


def test_greedy_decode_and_completions_match_transformers(moe, report):
    """Decoding with the KV cache and the OpenAI route serve the MoE model as transformers runs it."""
    model, prompt = moe.models["A"], PROBE[:6]
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    sampling = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    body = {"input_ids": prompt, "sampling_params": sampling, "return_logprob": True}
    out = httpx.post(moe.server.url + "/generate", json=body, timeout=60).json()
    assert out["output_ids"] == greedy
    with torch.no_grad():
        logits = model(torch.tensor([prompt + greedy])).logits[0, len(prompt) - 1 : -1].float()
    expected = (
        torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(greedy)[:, None]).squeeze(-1).tolist()
    )
    diff = max_diff([e[0] for e in out["meta_info"]["output_token_logprobs"]], expected)
    report(f"{moe.arch} greedy decode: max|dlogprob|={diff:.2e}")
    assert diff < DECODE_TOL
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1, "n": 2}
    choices = httpx.post(moe.server.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["logprobs"]["tokens"] for c in choices] == [[f"w{t}" for t in greedy[:4]]] * 2
