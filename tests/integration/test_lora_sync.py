"""``weights.lora_sync: adapter``: the trainer's LoRA adapters, alone, into a LoRA-enabled server.

Peers: the reference server in SGLang 0.5.23's LoRA mode (``--enable-lora``), the bridge's real gRPC
server and adapter proxy, and ``peft.PeftModel`` as the judge. The trainer side is a real Megatron
model (one rank, in its own process) with rsLoRA adapters set from a PEFT adapter, pushed by the real
``WeightPusher`` over ``grpc`` (one tensor bucket) and ``disk`` (a PEFT directory):

- through the proxy, a request that names no adapter is served by the newest adapter and equals
  PeftModel's log-probs (rsLoRA's sqrt(r) folded into B, as SGLang reads no ``use_rslora``); straight
  to the server the same request gets the base model, which is why the proxy exists;
- a push moves the adapter's bytes only; the adapter before the newest stays loaded (requests in
  transit may name it) and older ones are unloaded;
- the config refuses adapter sync without LoRA or over the ``distributed`` transport.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from atropos_megatron.config import ConfigError, load_config
from tests.harness import run_ranks
from tests.hf_models import random_peft_model, save_tiny_checkpoint, tiny_hf_model
from tests.integration.test_weight_push import ADMIN_KEY, PROBE, Bridge, _weights
from tests.reference_server import ReferenceServer, served_logprobs

RANK, ALPHA = 4, 8.0
TOLERANCE = 1e-5


def _peft_adapter(base_dir, out, *, seed: int):
    """A PEFT rsLoRA adapter on every projection with random non-zero A and B; the PeftModel too."""
    from transformers import AutoModelForCausalLM

    model = random_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        seed=seed,
        r=RANK,
        lora_alpha=ALPHA,
        use_rslora=True,
        target_modules="all-linear",
    )
    model.save_pretrained(out)
    return model


@torch.no_grad()
def _logprobs(model) -> list[float]:
    tokens = torch.tensor([PROBE])
    logprobs = torch.log_softmax(model(tokens).logits.float(), dim=-1)[0, :-1]
    return logprobs.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist()


def _push_body(rank, world_size, base_dir, pushes, weights_fields, bridge_address, token):
    """One rank: build the base, install rsLoRA, and push each PEFT adapter in ``pushes`` as a version."""
    from atropos_megatron.bridge.client import BridgeClient
    from atropos_megatron.config import LoraConfig, ModelConfig, ParallelConfig, WeightsConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.lora import apply_lora
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.hf_architectures import resolve_architecture
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.lora_state import load_adapter_state
    from atropos_megatron.weights.peft_adapter import read_peft_adapter
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from atropos_megatron.weights.transfer import WeightPusher

    parallel.init_distributed(ParallelConfig(), seed=0)
    lora = LoraConfig(rank=RANK, alpha=ALPHA, use_rslora=True)
    model = resolve_architecture(ModelConfig(hf_path=base_dir, lora=lora))
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    chunks = build_model(model, ParallelConfig())
    load_hf_weights(chunks, SafetensorsCheckpoint(base_dir), model, padded_vocab=padded, tp_rank=0, tp_size=1)
    apply_lora(chunks, lora, model)
    results = []
    with BridgeClient(bridge_address, token=token, timeout_s=60) as client:
        for version, (adapter_dir, transport) in enumerate(pushes, start=1):
            load_adapter_state(chunks, read_peft_adapter(adapter_dir).tensors)
            cfg = WeightsConfig(**{**weights_fields, "transport": transport, "lora_sync": "adapter"})
            pusher = WeightPusher(cfg, model, client)
            response = pusher.push(chunks, weight_version=str(version))
            results.append((response.bytes, [(s.updated, s.weight_version) for s in response.servers]))
    return results


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-sync") / "base"
    save_tiny_checkpoint("qwen2", path, seed=0)
    return path


def _wait_until_unloaded(url: str, name: str, deadline_s: float = 30.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        cards = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        if name not in {card["id"] for card in cards}:
            return True
        time.sleep(0.05)  # polling a condition with a deadline, not waiting for time to pass
    return False


def test_adapter_pushes_reach_the_server_and_the_proxy_names_the_newest(base_dir, tmp_path, report):
    from atropos_megatron.bridge.inference_proxy import start_proxies

    _peft_adapter(base_dir, tmp_path / "adapter-1", seed=1)
    _peft_adapter(base_dir, tmp_path / "adapter-2", seed=2)
    newest = _peft_adapter(base_dir, tmp_path / "adapter-3", seed=3)
    server = ReferenceServer(
        base_dir,
        admin_api_key=ADMIN_KEY,
        enable_lora=True,
        max_lora_rank=RANK,
        lora_target_modules=["all"],
    )
    with server:
        weights = _weights([server], tmp_path)
        bridge = Bridge(weights)
        (proxy,) = start_proxies(
            bridge.service.weights.servers, [_free_port()], host="127.0.0.1", timeout_s=30
        )
        try:
            fields = {
                k: getattr(weights, k)
                for k in (
                    "inference_servers",
                    "admin_api_key",
                    "disk_dir",
                    "health_interval_s",
                    "request_timeout_s",
                )
            }
            pushes = [
                (str(tmp_path / "adapter-1"), "grpc"),
                (str(tmp_path / "adapter-2"), "disk"),
                (str(tmp_path / "adapter-3"), "grpc"),
            ]
            results = run_ranks(
                _push_body, 1, str(base_dir), pushes, fields, bridge.address, "bridge-secret", timeout_s=120
            )[0]

            model_bytes = sum(
                t.numel() * t.element_size() for t in tiny_hf_model("qwen2").state_dict().values()
            )
            (grpc_bytes, grpc_servers), (_, disk_servers), (_, last_servers) = results
            assert (
                grpc_servers == [(True, "1")]
                and disk_servers == [(True, "2")]
                and last_servers == [(True, "3")]
            )
            disk_bytes = (tmp_path / "pushed" / "lora_v2" / "adapter_model.safetensors").stat().st_size
            for nbytes in (grpc_bytes, disk_bytes):
                assert 0 < nbytes < model_bytes / 4, (
                    f"an adapter push moved {nbytes} B (model: {model_bytes} B)"
                )
            report(
                f"adapter push: {grpc_bytes / 1e3:.1f} kB (grpc), {disk_bytes / 1e3:.1f} kB file (disk) vs "
                f"{model_bytes / 1e3:.1f} kB of weights"
            )

            through_proxy, version = served_logprobs(proxy.url, PROBE)
            direct, _ = served_logprobs(server.url, PROBE)
            expected = _logprobs(newest)
            diff = max(abs(a - b) for a, b in zip(through_proxy, expected, strict=True))
            base_diff = max(
                abs(a - b) for a, b in zip(direct, _logprobs(tiny_hf_model("qwen2")), strict=True)
            )
            report(
                f"through the proxy vs PeftModel (rsLoRA): max |dlogprob| {diff:.1e}; direct = base {base_diff:.1e}"
            )
            assert version == "3"
            assert diff < TOLERANCE, "the proxy did not get the newest adapter's log-probs"
            assert base_diff < TOLERANCE, "a request naming no adapter should get the base model"
            assert max(abs(a - b) for a, b in zip(direct, expected, strict=True)) > 1e-3  # the test can fail
            assert _wait_until_unloaded(server.url, "policy-v1"), (
                "the adapter two pushes old was not unloaded"
            )
            loaded = {card["id"] for card in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
            assert {"policy-v2", "policy-v3"} <= loaded, loaded
        finally:
            proxy.stop()
            bridge.close()


def test_the_config_refuses_adapter_sync_without_lora_or_over_distributed():
    with pytest.raises(ConfigError, match="weights.lora_sync"):
        load_config(None, ["weights.lora_sync=adapter"])
    with pytest.raises(ConfigError, match="process group"):
        load_config(None, ["weights.lora_sync=adapter", "weights.transport=distributed", "model.lora.rank=4"])


def _free_port() -> int:
    from atropos_megatron.trainer.parallel import free_port

    return free_port()
