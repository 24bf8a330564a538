"""Canonical LoRA on Megatron-Core equals HF PEFT at TP=1, TP=2 and PP=2.

For a tiny Qwen2 (GQA 4 q / 2 kv heads, QKV bias, tied embeddings) and a tiny Llama, PEFT wraps the HF
model with random non-zero A and B; our Megatron model loads the same base through the HF mapping and
the same adapters by PEFT name. On two gloo ranks, per layout and adapter config (all projections with
and without rsLoRA; q_proj, v_proj, down_proj only), fp32:

- freshly installed adapters (B = 0) leave the logits exactly the base's, and every layout starts
  from the same adapters;
- logits equal PEFT's; ``adapters_disabled`` gives the base logits exactly;
- ``adapter_state`` gives back the PEFT tensors exactly (TP gathered);
- one backward: only adapters get gradients, equal to PEFT's; Megatron's DDP sees only adapters.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

LOGIT_RELATIVE_TOLERANCE = 1e-6
"""Of the largest |logit|: fp32 rounding grows with the logits, and the base model alone already differs
from HF by up to 2.0e-6 at these layouts (the adapters add ~1 logit)."""
GRAD_RELATIVE_TOLERANCE = 1e-5
BATCH, SEQ = 2, 12
RANK, ALPHA = 4, 8.0
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOME = ["q_proj", "v_proj", "down_proj"]
VARIANTS = {  # name -> (target modules, use_rslora, layouts)
    "all": (ALL, False, ("TP=1", "TP=2", "PP=2", "TP=2+SP")),
    "all+rslora": (ALL, True, ("TP=1", "TP=2", "PP=2")),
    "q,v,down": (SOME, False, ("TP=2", "PP=2")),
}
LAYOUTS = {
    "TP=1": {},
    "TP=2": dict(tensor_parallel_size=2),
    "PP=2": dict(pipeline_parallel_size=2),
    "TP=2+SP": dict(tensor_parallel_size=2, sequence_parallel=True),
}
MODEL_TYPES = ("qwen2", "llama")


def _peft_reference(model_type, targets, use_rslora, tokens, weights):
    """Base logits, PEFT logits, PEFT adapter tensors and their gradients for the linear loss."""
    import torch
    from peft import get_peft_model_state_dict

    from tests.hf_models import hf_state, random_peft_model, tiny_hf_model

    hf_model = tiny_hf_model(model_type)
    base_state = {name: t.clone() for name, t in hf_state(hf_model).items()}
    with torch.no_grad():
        base_logits = hf_model(tokens).logits
    config = hf_model.config.to_dict()
    peft_model = random_peft_model(
        hf_model,
        seed=7,
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        use_rslora=use_rslora,
    )
    logits = peft_model(tokens).logits
    (logits * weights).sum().backward()
    adapters = {name: t.detach().clone() for name, t in get_peft_model_state_dict(peft_model).items()}
    grads = {
        name.replace(".default.", "."): p.grad.clone()
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }
    assert set(grads) == set(adapters)
    return config, base_state, base_logits, logits.detach(), adapters, grads


def _logits(chunks, batch, vocab_size):
    """Full-vocabulary logits on the last stage (None elsewhere)."""
    from megatron.core import tensor_parallel

    from atropos_megatron.trainer.step import forward_backward

    kept = []

    def keep(batch, output):
        kept.append(tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()))
        return output.sum() * 0.0, {}

    forward_backward(chunks, [batch], loss_fn=keep, forward_only=True)
    return kept[0][..., :vocab_size] if kept else None


def _backward(chunks, batch, weights, padded_vocab):
    """One backward of ``sum(logits * weights)``; each TP rank's loss is its vocabulary shard's part."""
    import torch
    import torch.distributed as dist

    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.step import forward_backward

    layout = parallel.current_layout()
    padded = torch.zeros(*weights.shape[:-1], padded_vocab)
    padded[..., : weights.shape[-1]] = weights
    local = padded.chunk(layout.tp, dim=-1)[layout.tp_rank]

    def linear_loss(batch, output):
        return (output.float() * local).sum(), {}

    forward_backward(chunks, [batch], loss_fn=linear_loss)
    for chunk in chunks:  # what finalize_model_grads does for replicated factors under sequence parallel
        for param in chunk.parameters():
            if getattr(param, "sequence_parallel", False) and param.requires_grad:
                dist.all_reduce(param.grad, group=parallel.tensor_parallel_group())


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _body(rank, world_size):  # every check in one process start (~5 s each)
    import torch

    from atropos_megatron.config import LoraConfig, ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.lora import adapters_disabled, apply_lora, trainable_parameters
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.hf_architectures import model_config_from_hf
    from atropos_megatron.weights.hf_mapping import hf_to_megatron
    from atropos_megatron.weights.lora_layout import is_adapter_name, megatron_to_peft_name
    from atropos_megatron.weights.lora_state import adapter_state, load_adapter_state
    from atropos_megatron.weights.megatron_shards import (
        iter_global_params,
        load_full_state_dict,
        shard_tensor,
    )

    parallel.init_distributed(ParallelConfig(), seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 250, (BATCH, SEQ), generator=gen)
    weights = 0.01 * torch.randn(BATCH, SEQ, 250, generator=gen)
    batch = {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
    measured = {}
    for model_type in MODEL_TYPES:
        for variant, (targets, use_rslora, layouts) in VARIANTS.items():
            hf_config, base_state, base_logits, expected, adapters, peft_grads = _peft_reference(
                model_type, targets, use_rslora, tokens, weights
            )
            cfg = model_config_from_hf(hf_config, max_position_embeddings=SEQ)
            lora = LoraConfig(rank=RANK, alpha=ALPHA, use_rslora=use_rslora, target_modules=targets)
            fresh_adapters = {}
            for layout_name in layouts:
                key = f"{model_type} {variant} {layout_name}"
                coords = parallel.setup_model_parallel(ParallelConfig(**LAYOUTS[layout_name]), seed=1)
                padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, coords.tp)
                chunks = build_model(cfg, ParallelConfig(**LAYOUTS[layout_name]))
                full = dict(hf_to_megatron(base_state.items(), cfg, padded_vocab=padded))
                load_full_state_dict(chunks, full, tp_rank=coords.tp_rank, tp_size=coords.tp)
                last = coords.is_last_stage
                base = _logits(chunks, batch, cfg.vocab_size)

                apply_lora(chunks, lora, cfg, seed=3)
                fresh = adapter_state(chunks)
                for name, tensor in fresh.items():  # same initial adapters at every layout
                    assert torch.equal(fresh_adapters.setdefault(name, tensor), tensor), (
                        f"{key}: init of {name}"
                    )
                assert any(t.abs().sum() > 0 for n, t in fresh.items() if "lora_A" in n)
                assert all(t.abs().sum() == 0 for n, t in fresh.items() if "lora_B" in n)
                fresh_logits = _logits(chunks, batch, cfg.vocab_size)

                load_adapter_state(chunks, adapters)
                got = _logits(chunks, batch, cfg.vocab_size)
                with adapters_disabled(chunks):
                    disabled = _logits(chunks, batch, cfg.vocab_size)
                state = adapter_state(chunks)
                held = {
                    megatron_to_peft_name(n)
                    for c in chunks
                    for n, _ in iter_global_params(c)
                    if is_adapter_name(n)
                }
                assert set(state) == held and held <= set(adapters), key
                assert all(torch.equal(state[n], adapters[n]) for n in held), f"{key}: adapter_state"

                trainable = trainable_parameters(chunks)
                assert trainable and all(".lora." in n for n, _ in trainable), key
                _backward(chunks, batch, weights, padded)
                grad_rel = 0.0
                for chunk in chunks:
                    for name, param in iter_global_params(chunk):
                        if not is_adapter_name(name):
                            assert param.grad is None and not param.requires_grad, f"{key}: {name} trains"
                            continue
                        peft_grad = peft_grads[megatron_to_peft_name(name)]
                        want = shard_tensor(peft_grad, param, tp_rank=coords.tp_rank, tp_size=coords.tp)
                        grad_rel = max(grad_rel, _max_diff(param.grad, want) / want.abs().max().item())
                measured[key] = {"grad_rel": grad_rel}
                if last:
                    measured[key].update(
                        peft=_max_diff(got, expected),
                        fresh=_max_diff(fresh_logits, base),
                        disabled=_max_diff(disabled, base),
                        base_vs_hf=_max_diff(base, base_logits),
                        lora_effect=_max_diff(expected, base_logits),
                        logit_scale=expected.abs().max().item(),
                    )
    measured["checks"] = _dropout_and_ddp_checks(cfg, lora, batch)
    return measured


def _dropout_and_ddp_checks(cfg, lora, batch):
    """At TP=2: dropout acts on the adapters only, in training mode only; Megatron's DDP buckets exactly
    the adapter factors (it collects the parameters that need gradients)."""
    import dataclasses

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.lora import adapters_disabled, apply_lora, trainable_parameters
    from atropos_megatron.trainer.model import build_model

    layout = ParallelConfig(tensor_parallel_size=2)
    parallel.setup_model_parallel(layout, seed=1)
    chunks = build_model(cfg, layout)
    apply_lora(chunks, dataclasses.replace(lora, dropout=0.5), cfg)
    with torch.no_grad():
        for _, param in trainable_parameters(chunks):
            param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    checks = {}
    chunks[0].eval()
    evaluated = [_logits(chunks, batch, cfg.vocab_size) for _ in range(2)]
    chunks[0].train()
    trained = _logits(chunks, batch, cfg.vocab_size)
    with adapters_disabled(chunks):
        base_trained = _logits(chunks, batch, cfg.vocab_size)
        chunks[0].eval()
        base_evaluated = _logits(chunks, batch, cfg.vocab_size)
    checks["eval is deterministic"] = torch.equal(*evaluated)
    checks["dropout in training"] = (trained - evaluated[0]).abs().max().item() > 1e-3
    checks["no dropout on the base"] = torch.equal(base_trained, base_evaluated)
    ddp = DistributedDataParallel(
        config=chunks[0].config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        module=chunks[0],
    )
    bucketed = {id(p) for buffer in ddp.buffers for p in buffer.params}
    adapters = {id(p) for _, p in trainable_parameters(chunks)}
    checks["DDP buckets only adapters"] = bucketed == adapters and len(adapters) > 0
    return checks


def test_lora_equals_peft_at_every_layout(report):
    results = run_ranks(_body, 2, timeout_s=480)
    for checks in [r.pop("checks") for r in results]:
        assert all(checks.values()), checks
    merged: dict[str, dict[str, float]] = {}
    for measured in results:
        for key, values in measured.items():
            for name, value in values.items():
                merged.setdefault(key, {})[name] = max(value, merged.get(key, {}).get(name, 0.0))
    expected_keys = sum(len(layouts) for _, _, layouts in VARIANTS.values()) * len(MODEL_TYPES)
    assert len(merged) == expected_keys
    for key, values in sorted(merged.items()):
        report(
            f"{key}: |Megatron - PEFT| logits {values['peft']:.1e}, adapter grads rel {values['grad_rel']:.1e}, "
            f"B=0 vs base {values['fresh']:.1e}, disabled vs base {values['disabled']:.1e} "
            f"(LoRA moves logits by {values['lora_effect']:.1e}, max |logit| {values['logit_scale']:.1e}; "
            f"base |Megatron - HF| {values['base_vs_hf']:.1e})"
        )
    for key, values in merged.items():
        assert values["lora_effect"] > 0.5, f"{key}: the adapters barely change the logits"
        assert values["peft"] <= LOGIT_RELATIVE_TOLERANCE * values["logit_scale"], f"{key}: {values}"
        assert values["fresh"] == 0.0 and values["disabled"] == 0.0, f"{key}: {values}"
        assert values["grad_rel"] <= GRAD_RELATIVE_TOLERANCE, f"{key}: {values}"
