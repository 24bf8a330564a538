"""A trained Megatron model's weights reach a real inference server by every transport, and it serves them.

Two gloo ranks hold a TP=2 Megatron model loaded from a tiny HF checkpoint (and, in a second case, a
Qwen3-MoE at EP=2: each rank holds half the experts, pushed under per-expert HF names). Per transport: one SGD
step on a vocab-parallel cross-entropy (so the weights really move), then ``WeightPusher.push`` exports
them (TP gather, HF names, buckets) through a real bridge into the reference SGLang-protocol server
(a separate process). The server's log-probs of a probe sequence must then equal the trainer's own,
computed from the TP-sharded logits, in fp32 to 1e-5, under the pushed ``weight_version``.

The same with the server in vLLM mode (``serve --protocol vllm``, vLLM 0.33's RL routes, the gloo
stand-in for its NCCL transfer engine) and ``weights.inference_engine: vllm``: two ``distributed``
pushes (the group made, then reused), each checked through vLLM's token route ``/inference/v1/generate``
(``--enable-scale-out``): the raw log-probs of its greedy completion must be the trainer's, to 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_ranks
from tests.hf_models import save_tiny_checkpoint
from tests.reference_server import ReferenceServer, served_logprobs, served_vllm_logprobs

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
"""fp32 noise of log-probs around -5.5 computed by two attention kernels (the trainer's SDPA per
sequence, transformers' own): a few 1e-6 at most."""
PROBE = [3, 77, 14, 200, 9, 128, 45, 61, 249, 5, 33, 180]
TRANSPORTS = ("grpc", "disk", "distributed")


def _sync_body(rank, world_size, hf_dir, server_url, disk_dir, sizes, engine="sglang"):
    import torch
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from atropos_megatron.config import BridgeConfig, ParallelConfig, WeightsConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint
    from atropos_megatron.weights.transfer import WeightPusher
    from tests.reference_server import served_vllm_logprobs

    parallel.init_distributed(ParallelConfig(), seed=0)
    layout = ParallelConfig(**sizes)
    coords = parallel.setup_model_parallel(layout, seed=1)
    cfg = model_config_from_hf(read_hf_config(hf_dir))
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    (model,) = build_model(cfg, layout)
    load_hf_weights(
        [model],
        SafetensorsCheckpoint(hf_dir),
        cfg,
        padded_vocab=padded,
        tp_rank=coords.tp_rank,
        tp_size=coords.tp,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.tensor([PROBE])

    def train_step(seed: int) -> None:
        # The same batch on every rank: under EP (no DDP here) the replicated weights stay equal.
        batch = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
        logits = model(batch[:, :-1], torch.arange(15).expand(2, 15), attention_mask=None)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def trainer_logprobs(sequence=tokens) -> torch.Tensor:
        """The log-prob of each token of ``sequence`` [1, S] after the first (collective over TP)."""
        at = torch.arange(sequence.shape[1]).expand_as(sequence)
        shard = model(sequence, at, attention_mask=None).float()  # [1, S, padded / TP]
        shards = [torch.empty_like(shard) for _ in range(coords.tp)]
        dist.all_gather(shards, shard, group=parallel.tensor_parallel_group())
        logits = torch.cat(shards, dim=-1)[0, :-1, : cfg.vocab_size]
        return torch.log_softmax(logits, dim=-1).gather(-1, sequence[0, 1:, None]).squeeze(-1)

    vllm = engine == "vllm"

    def served_and_expected() -> tuple[list[float] | None, torch.Tensor, str | None]:
        """The server's log-probs (on rank 0), the trainer's of the same tokens, the served weight_version.
        vLLM: of its greedy completion of PROBE, whose tokens every rank needs (collective)."""
        if not vllm:
            served, version = served_logprobs(server_url, PROBE) if rank == 0 else (None, None)
            return served, trainer_logprobs(tokens), version
        reply = [served_vllm_logprobs(server_url, PROBE) if rank == 0 else None]
        dist.broadcast_object_list(reply, src=0)
        completion, served, version = reply[0]
        return served, trainer_logprobs(torch.tensor([PROBE + completion]))[len(PROBE) - 1 :], version

    engine_fields = dict(inference_engine="vllm", pause_mode="in_place") if vllm else {}
    pushes = [f"distributed {i}" for i in (1, 2)] if vllm else list(TRANSPORTS)  # vLLM: the group reused
    bridge = client = None
    if rank == 0:
        from atropos_megatron.bridge.client import BridgeClient
        from atropos_megatron.bridge.server import build_service, create_server

        bridge_cfg = BridgeConfig(mode="agent")
        weights = WeightsConfig(
            inference_servers=[server_url],
            health_interval_s=0,
            transport=pushes[0].split()[0],
            **engine_fields,
        )
        service = build_service(bridge_cfg, weights)
        bridge, port = create_server(bridge_cfg, service, "127.0.0.1:0")
        client = BridgeClient(f"127.0.0.1:{port}", timeout_s=60)
    results, pushers = {}, {}
    try:
        for step, push in enumerate(pushes, start=1):
            train_step(seed=step)
            transport = push.split()[0]
            weights = WeightsConfig(
                transport=transport, inference_servers=[server_url], disk_dir=disk_dir, bucket_bytes=64 * 1024,
                **engine_fields,
            )  # fmt: skip
            pusher = pushers.setdefault(transport, WeightPusher(weights, cfg, client))
            response = pusher.push([model], weight_version=str(step))
            served, expected, version = served_and_expected()
            if rank == 0:
                results[push] = (
                    version,
                    (torch.tensor(served) - expected).abs().max().item(),
                    [s.updated for s in response.servers],
                    response.buckets,
                    served,
                )
            dist.barrier()
    finally:
        for pusher in pushers.values():
            pusher.close()
        if rank == 0:
            client.close()
            bridge.stop(0).wait()
            service.weights.stop()
    return results


@pytest.mark.parametrize(
    ("model_type", "sizes"),
    [("qwen2", dict(tensor_parallel_size=2)), ("qwen3_moe", dict(expert_parallel_size=2))],
    ids=["qwen2 TP=2", "qwen3_moe EP=2"],
)
def test_trained_weights_reach_the_server_by_every_transport(tmp_path: Path, report, model_type, sizes):
    hf_dir = tmp_path / "hf"
    save_tiny_checkpoint(model_type, hf_dir)
    with ReferenceServer(hf_dir, weight_version="0") as server:
        before, _ = served_logprobs(server.url, PROBE)
        (results, _) = run_ranks(
            _sync_body, 2, str(hf_dir), server.url, str(tmp_path / "pushed"), sizes, timeout_s=240
        )
    for step, transport in enumerate(TRANSPORTS, start=1):
        version, diff, updated, buckets, served = results[transport]
        report(f"{model_type} {transport}: {buckets} buckets, max |served - trainer logprob| = {diff:.2e}")
        assert version == str(step) and updated == [True]
        assert buckets > 1 or transport == "disk"  # disk: the servers read a directory, no buckets
        assert diff < TOLERANCE, f"{transport}: the server does not serve the trained weights ({diff:.2e})"
    moved = max(abs(a - b) for a, b in zip(before, results["grpc"][4], strict=True))
    assert moved > 1e-3, "the optimizer step did not change what the server serves: the test proves nothing"


def test_trained_weights_reach_a_vllm_server_by_distributed(tmp_path: Path, report):
    hf_dir = tmp_path / "hf"
    save_tiny_checkpoint("qwen2", hf_dir)
    with ReferenceServer(
        hf_dir,
        protocol="vllm",
        weight_transfer_config='{"backend": "gloo"}',
        weight_version="0",
        enable_scale_out=True,
    ) as server:
        before = served_vllm_logprobs(server.url, PROBE)
        (results, _) = run_ranks(
            _sync_body, 2, str(hf_dir), server.url, str(tmp_path / "pushed"),
            dict(tensor_parallel_size=2), "vllm", timeout_s=240,
        )  # fmt: skip
    for step in (1, 2):  # the second push reuses the group the first made
        version, diff, updated, buckets, served = results[f"distributed {step}"]
        report(f"qwen2 TP=2 vLLM push {step}: {buckets} buckets, max |served - trainer logprob| = {diff:.2e}")
        assert version == str(step) and updated == [True] and buckets > 1
        assert diff < TOLERANCE, f"push {step}: the server does not serve the trained weights ({diff:.2e})"
    assert results["distributed 1"][4] != before[1], (
        "the served log-probs did not move: the test proves nothing"
    )
