"""``VLLMClient`` against a real server speaking vLLM 0.33's RL routes (``serve --protocol vllm``).

Its calls, their order and vLLM's errors (HTTP 500 with the worker's message for a call out of order,
an unconfigured transfer engine) as the bridge meets them, and one whole update driven by the client
with this process as the trainer: ``sync_group.init_vllm_sender`` joins the group as vLLM's trainer
helper would (gloo here), broadcasts one tensor at a time, and the server then serves the new weights.
"""

from __future__ import annotations

import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from atropos_megatron.bridge.inference_client import EngineMismatch, GroupJoin, build_client
from atropos_megatron.bridge.sglang_client import SGLangClient
from atropos_megatron.bridge.vllm_client import VLLMClient, VLLMError
from atropos_megatron.weights.sync_group import destroy_group, init_vllm_sender
from tests.atropos_api import free_port
from tests.hf_models import hf_state, save_tiny_checkpoint, tiny_hf_model
from tests.reference_server import ReferenceServer, served_vllm_logprobs

TOLERANCE = 1e-5
PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_client")
    save_tiny_checkpoint("qwen2", root / "a")
    return types.SimpleNamespace(a=root / "a")


@pytest.fixture(scope="module")
def server(dirs):
    with ReferenceServer(
        dirs.a,
        protocol="vllm",
        weight_transfer_config='{"backend": "gloo"}',
        weight_version="A",
        enable_scale_out=True,
    ) as srv:
        yield srv


@pytest.fixture
def client(server):
    client = build_client("vllm", server.url, timeout_s=60)
    yield client
    client.close()


def test_server_info_and_refusals(client):
    assert isinstance(client, VLLMClient)
    info = client.server_info()
    assert (info.engine, info.version, info.tp_size, info.weight_version) == ("vllm", "0.33.0", 1, "A")
    assert info.label == "vllm 0.33.0"
    assert client.refusal("distributed", adapter=False) is None
    assert "grpc transport is not supported with vLLM" in client.refusal("grpc", adapter=False)
    assert "disk transport is not supported with vLLM" in client.refusal("disk", adapter=False)
    assert "from a path only" in client.refusal("grpc", adapter=True)  # adapters: disk only
    assert client.refusal("disk", adapter=True) is None
    with pytest.raises(VLLMError, match="no route that loads serialized tensors"):
        client.update_from_tensor(["payload"])


def test_pause_modes_and_resume(client):
    for mode in ("in_place", "abort"):  # vLLM's keep and abort
        client.pause(mode)
        assert client.is_paused()
        client.resume()
        assert not client.is_paused()
    with pytest.raises(VLLMError, match="no vLLM equivalent"):
        client.pause("retract")


def test_calls_out_of_order_fail_with_vllms_messages(client):
    info = client.server_info()
    with pytest.raises(VLLMError) as error:
        client.update_from_group(["w"], ["float32"], [[1]], group_name="unused")
    assert error.value.status_code == 500 and "start_weight_update must be called" in str(error.value)
    with pytest.raises(VLLMError) as error:
        client.finish_weight_update("X")
    assert error.value.status_code == 500 and "without a matching start_weight_update" in str(error.value)

    client.begin_update(info)
    with pytest.raises(VLLMError) as error:
        client.begin_update(info)
    assert error.value.status_code == 500 and "already active" in str(error.value)
    with pytest.raises(VLLMError) as error:  # the worker validates update_info: 500, and the update ends
        client.update_from_group(["w"], ["float32"], [], group_name="unused")
    assert "`shapes` should be of the same size" in str(error.value)
    client.begin_update(info)  # accepted again: the failed update closed the session
    client.abandon_update(info)  # a broken push closes it without a version ...
    client.begin_update(info)  # ... so that the next push can begin
    client.abandon_update(info)
    assert client.server_info().weight_version == "A"


def test_an_unconfigured_transfer_engine_is_named(dirs):
    with ReferenceServer(dirs.a, protocol="vllm", enable_scale_out=True) as bare:  # no weight-transfer config
        client = VLLMClient(bare.url, timeout_s=60)
        try:
            with pytest.raises(VLLMError) as error:
                client.begin_update(client.server_info())
            assert error.value.status_code == 500 and "Weight transfer not configured" in str(error.value)
        finally:
            client.close()


def test_a_whole_update_through_the_client(client, server, report):
    info = client.server_info()
    port = free_port()
    join = GroupJoin("127.0.0.1", port, rank_offset=1, world_size=2, group_name="-", backend="-")
    named = list(hf_state(tiny_hf_model("qwen2", seed=3)).items())
    with ThreadPoolExecutor(1) as pool:
        client.reset_weight_group("unused")  # no group yet: vLLM answers all the same
        joining = pool.submit(client.init_weight_group, join)
        sender = init_vllm_sender(backend="gloo", master_address="127.0.0.1", master_port=port, world_size=2)
        try:
            joining.result()
            client.pause("in_place")
            client.begin_update(info)
            for half in (named[: len(named) // 2], named[len(named) // 2 :]):  # two buckets
                names, tensors = [n for n, _ in half], [t for _, t in half]
                dtypes, shapes = (
                    [str(t.dtype).removeprefix("torch.") for t in tensors],
                    [list(t.shape) for t in tensors],
                )
                receiving = pool.submit(client.update_from_group, names, dtypes, shapes, group_name="unused")
                for tensor in tensors:
                    sender.broadcast(tensor)
                receiving.result()
            for step in client.finish_update_steps(info, "B", flush_attempts=1):
                step.call()
            client.resume()
        finally:
            destroy_group(sender)
    assert client.server_info().weight_version == "B" and not client.is_paused()
    tokens, logprobs, version = served_vllm_logprobs(server.url, PROMPT)
    model = tiny_hf_model("qwen2", seed=3)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([PROMPT + tokens])).logits[0].float(), dim=-1)
    expected = [full[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(tokens)]
    diff = max(abs(a - b) for a, b in zip(logprobs, expected, strict=True))
    report(f"VLLMClient update: max |served - pushed logprob| = {diff:.2e}")
    assert version == "B" and diff < TOLERANCE
    client.set_weight_version("C")  # /update_weight_version: the tag alone
    assert httpx.get(server.url + "/weight_info").json() == {"weight_version": "C"}


def test_sglang_client_names_a_vllm_server_info():
    """Real vLLM's dev-mode ``/server_info`` (``vllm_config``, ``vllm_env``, ``system_env``) cannot come
    from the reference server, whose vLLM mode keeps SGLang's: served here by httpx's mock transport."""

    def vllm_server_info(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/server_info"
        return httpx.Response(200, json={"vllm_config": "...", "vllm_env": {}, "system_env": {}})

    client = SGLangClient("http://vllm.invalid:8000")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(vllm_server_info))
    with pytest.raises(EngineMismatch, match="answers as vLLM; set weights.inference_engine=vllm"):
        client.server_info()
    client.close()
