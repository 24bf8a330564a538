"""Rollout routing replay: MoE layers route each token to the experts a batch names for it.

- Against HF: a routing drawn at random (and for a quarter of the tokens unknown, -1) is forced on
  HF's routers (the trainer's own choice where unknown, weights from HF's own router scores) and
  replayed by Megatron: the logits agree for Qwen3-MoE (softmax, top-k, no renormalisation) and
  Mixtral (renormalised), and differ from the unforced ones (so the replay did something).
- Across layouts: three GRPO steps on batches that carry random routings give EP=1's losses and
  weights at TP=2 with sequence parallelism (each TP rank replays its slice of the positions), PP=2
  with full recomputation (the backward pass re-routes each micro-batch with its own targets) and EP=2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.test_trainer import STEPS, UPDATE_TOLERANCE, _assert_close, _hf_weights
from tests.harness import run_ranks
from tests.hf_models import save_tiny_checkpoint

pytestmark = pytest.mark.distributed

TOLERANCE = 4e-6  # fp32 logits; HF's own fp32 logits are ~2e-6 from fp64 on these models
BATCH, SEQ = 2, 12


def random_routing(
    tokens: int, layers: int, experts: int, topk: int, *, seed: int, unknown: float
) -> np.ndarray:
    """int16 ``[tokens, layers, k]`` of distinct experts per row; a share ``unknown`` of rows -1."""
    rng = np.random.default_rng(seed)
    routing = np.stack([rng.permutation(experts)[:topk] for _ in range(tokens * layers)]).astype(np.int16)
    routing = routing.reshape(tokens, layers, topk)
    routing[rng.random(tokens) < unknown] = -1
    return routing


def _force_hf_routing(model, routed: torch.Tensor) -> None:
    """Replace each HF router's top-k by ``routed[:, :, layer]`` (batch-major tokens) where known."""
    config = model.config
    normalize = getattr(config, "norm_topk_prob", True)
    for layer, block in enumerate(model.model.layers):
        router = getattr(block.mlp, "gate", None)
        if router is None or not hasattr(router, "top_k"):
            continue  # a dense layer
        target = routed[:, :, layer].reshape(-1, router.top_k).long()

        def forward(hidden, router=router, target=target):
            logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            own = torch.topk(probs, router.top_k, dim=-1).indices
            indices = torch.where((target >= 0).all(-1, keepdim=True), target, own)
            weights = probs.gather(1, indices)
            if normalize:
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(logits.dtype), indices

        router.forward = forward


def _hf_body(rank, world_size):
    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.routing_replay import RoutingReplay
    from atropos_megatron.weights.hf_architectures import model_config_from_hf
    from tests.hf_models import MOE_VARIANTS, hf_state, tiny_hf_model
    from tests.layouts import full_logits, load_hf_state

    parallel.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 250, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    measured = {}
    for model_type in MOE_VARIANTS:
        hf_model = tiny_hf_model(model_type)
        cfg = model_config_from_hf(hf_model.config.to_dict(), max_position_embeddings=SEQ)
        routing = random_routing(
            BATCH * SEQ, cfg.num_layers, cfg.moe.num_experts, cfg.moe.router_topk, seed=1, unknown=0.25
        )
        routed = torch.as_tensor(routing).reshape(BATCH, SEQ, cfg.num_layers, cfg.moe.router_topk)
        with torch.no_grad():
            unforced = hf_model(tokens).logits
            _force_hf_routing(hf_model, routed)
            expected = hf_model(tokens).logits
        chunks, _ = load_hf_state(cfg, hf_state(tiny_hf_model(model_type)), {})
        RoutingReplay(
            chunks, num_experts=cfg.moe.num_experts, tp_rank=0, tp_size=1, sequence_parallel=False,
            recompute_full=False,
        )  # fmt: skip
        batch = {
            "tokens": tokens,
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
            "routed_experts": routed,
        }
        got = full_logits(chunks, batch, cfg.vocab_size)
        measured[model_type] = ((got - expected).abs().max().item(), (unforced - expected).abs().max().item())
    return measured


def test_replayed_routing_gives_hf_logits_with_that_routing_forced(report):
    (measured,) = run_ranks(_hf_body, 1, timeout_s=300)
    for model_type, (diff, forcing_moved) in measured.items():
        report(
            f"{model_type}: max |HF forced - Megatron replayed| {diff:.1e} (forcing moved HF by {forcing_moved:.2f})"
        )
        assert diff <= TOLERANCE, (model_type, diff)
        assert forcing_moved > 1e-2, f"{model_type}: the forced routing changed nothing: the test is void"


# ------------------------------------------------------------------------------------------------
# The same GRPO steps at every layout
# ------------------------------------------------------------------------------------------------

LAYOUTS = {
    "tp2 sp": ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2 full recompute": ["parallel.pipeline_parallel_size=2", "parallel.recompute=full"],
    "ep2": ["parallel.expert_parallel_size=2"],
}


def _routed_batch(step: int):
    from tests.rollouts import synthetic_batch

    batch = synthetic_batch(step)
    # The tiny Qwen3-MoE: 4 layers (layer 1 dense: its rows are ignored), 4 experts, top-2.
    batch.routed_experts = random_routing(int(batch.seq_lens.sum()), 4, 4, 2, seed=100 + step, unknown=0.25)
    return batch


def _steps_body(rank, world_size, hf_dir, tmp, layouts):
    from atropos_megatron.config import load_config
    from atropos_megatron.trainer.loop import Trainer

    results = {}
    for name, extra in layouts.items():
        cfg = load_config(
            "examples/configs/debug_tiny.yaml",
            [
                f"model.hf_path={hf_dir}",
                f"logging.run_dir={tmp}/{name}",
                "grpo.kl_coef=0.05",
                "grpo.routing_replay=true",
                "grpo.moe_aux_loss_coef=0",
                "data.micro_batch_tokens=256",
                *extra,
            ],
        )
        trainer = Trainer(cfg)
        trainer.setup()
        metrics = [trainer.train_on(_routed_batch(step)) for step in range(STEPS)]
        keys = ("grpo/loss", "grpo/kl_ref", "optim/grad_norm", "grpo/ratio_max", "grpo/ratio_min")
        losses = [{k: m[k] for k in keys if k in m} for m in metrics]
        replay = [(m["moe/replayed_token_share"], m.get("moe/replay_same_experts")) for m in metrics]
        results[name] = (losses, _hf_weights(trainer), replay)
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "qwen3_moe"
    save_tiny_checkpoint("qwen3_moe", path)
    return str(path)


def test_replayed_grpo_steps_are_the_same_at_every_layout(hf_dir, tmp_path: Path, report):
    (reference,) = run_ranks(_steps_body, 1, hf_dir, str(tmp_path), {"ep1": []}, timeout_s=300)
    reference_losses, reference_weights, replay = reference["ep1"]
    share, same = replay[0]
    assert 0.6 < share < 0.9, share  # a quarter of the tokens carry no routing (and padding none)
    assert same is not None and same < 0.5, same  # random routings rarely match the router's own
    assert reference_losses[0]["grpo/ratio_max"] == reference_losses[0]["grpo/ratio_min"] == 1.0
    results = run_ranks(_steps_body, 2, hf_dir, str(tmp_path), LAYOUTS, timeout_s=600)[0]
    initial = _hf_weights_of(hf_dir)
    for name, (losses, weights, _) in results.items():
        _assert_close(reference_losses, losses, name)
        gap = sum(((weights[k] - reference_weights[k]) ** 2).sum() for k in weights).sqrt()
        update = sum(((reference_weights[k] - initial[k]) ** 2).sum() for k in weights).sqrt()
        report(
            f"{name}: |update - EP=1 update| / |EP=1 update| = {gap / update:.1e}; replayed share {share:.2f}"
        )
        assert gap / update <= UPDATE_TOLERANCE, f"{name}: the weights moved differently from EP=1's"


def _hf_weights_of(hf_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(hf_dir) / "model.safetensors")
