"""The same weights give the same logits and gradients under every parallel layout.

One set of 4 gloo ranks computes a TP=1, PP=1 reference (fp32, padded rows), then rebuilds Megatron's
groups for each layout, loads the reference weights into the sharded model, and compares its logits
(gathered over TP, on the last pipeline stage) and its gradients (against the reference gradient's
shard) with the reference. Each layout runs twice: on the padded rows, and on the same sequences
packed in THD form (one row, ``cu_seqlens``, a padding segment), which must compute the same. A Qwen2-like model exercises GQA, the QKV bias, RMSNorm and SwiGLU.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
LAYOUTS = {
    "TP=2": dict(tensor_parallel_size=2),
    "TP=2+SP": dict(tensor_parallel_size=2, sequence_parallel=True),
    "PP=2": dict(pipeline_parallel_size=2),
    "TP=2xPP=2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "PP=2xVPP=2": dict(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2),
}
# The same micro-batches packed (THD: one row, cu_seqlens) against the padded TP=1 reference.
LAYOUTS |= {f"{name} THD": sizes for name, sizes in {"TP=1": {}, **LAYOUTS}.items()}
MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    add_qkv_bias=True,
)
BATCH, SEQ, MICRO_BATCHES = 2, 16, 4
LENGTHS = (SEQ, SEQ - 5)
"""The two sequences of each micro-batch: padded, rows ``[2, SEQ]`` with the second row's tail padding;
packed (THD), one row ``[1, 2 * SEQ]``: both back to back, then the 5 padding tokens as a segment."""


def _micro_batches(packed: bool):
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCHES, BATCH, SEQ + 1), generator=gen)
    mask = torch.stack([torch.arange(SEQ) < length for length in LENGTHS])
    batches = []
    for t in tokens:
        padded = {"tokens": t[:, :-1] * mask, "labels": t[:, 1:], "loss_mask": mask}
        padded["position_ids"] = torch.arange(SEQ).expand(BATCH, SEQ)
        if not packed:
            batches.append(padded)
            continue
        edges = [0, LENGTHS[0], sum(LENGTHS), BATCH * SEQ]
        row = {k: torch.cat([padded[k][i, :n] for i, n in enumerate(LENGTHS)] + [padded[k][1, LENGTHS[1]:]])[None]
               for k in ("tokens", "labels", "loss_mask")}  # fmt: skip
        row["position_ids"] = torch.cat(
            [torch.arange(b - a) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        )[None]
        batches.append({**row, "cu_seqlens": torch.tensor(edges, dtype=torch.int32), "max_seqlen": SEQ})
    return batches


def _as_padded(logits):
    """Packed ``[1, 2 * SEQ, V]`` logits in the padded rows' places ``[2, SEQ, V]`` (real tokens only)."""
    import torch

    out = torch.zeros(BATCH, SEQ, logits.shape[-1])
    out[0] = logits[0, : LENGTHS[0]]
    out[1, : LENGTHS[1]] = logits[0, LENGTHS[0] : sum(LENGTHS)]
    return out


def _run(chunks, *, packed: bool = False):
    """Logits (full vocab, per micro-batch, last stage only; real tokens) and grads by global name."""
    from megatron.core import tensor_parallel

    from atropos_megatron.trainer.step import forward_backward
    from atropos_megatron.weights.megatron_shards import iter_global_params

    logits = []

    def keep_logits(batch, output):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach())
        logits.append(_as_padded(full) if packed else full * batch["loss_mask"][..., None])
        return output.sum() * 0.0, {}

    def cross_entropy(batch, output):  # summed over the real tokens: one value for both forms
        per_token = tensor_parallel.vocab_parallel_cross_entropy(output.float(), batch["labels"])
        return (per_token * batch["loss_mask"]).sum() / 50, {}

    forward_backward(chunks, _micro_batches(packed), loss_fn=keep_logits, forward_only=True)
    forward_backward(chunks, _micro_batches(packed), loss_fn=cross_entropy)
    grads = {name: p.grad.detach().clone() for chunk in chunks for name, p in iter_global_params(chunk)}
    return logits, grads


def _layouts_body(rank, world_size):
    import torch
    import torch.distributed as dist

    from atropos_megatron.config import ModelConfig, ParallelConfig
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.weights.megatron_shards import (
        iter_global_params,
        load_full_state_dict,
        shard_tensor,
    )

    model_cfg = ModelConfig(**MODEL)
    reference_layout = ParallelConfig()
    parallel.init_distributed(reference_layout, seed=1)
    reference = build_model(model_cfg, reference_layout)
    full = {name: p.detach().clone() for name, p in iter_global_params(reference[0])}
    ref_logits, ref_grads = _run(reference)

    measured = {}
    for name, sizes in LAYOUTS.items():
        packed = name.endswith("THD")
        layout = ParallelConfig(**sizes)
        # A different seed: the model only matches the reference if the weights really are loaded.
        coords = parallel.setup_model_parallel(layout, seed=2)
        chunks = build_model(model_cfg, layout)
        load_full_state_dict(chunks, full, tp_rank=coords.tp_rank, tp_size=coords.tp)
        logits, grads = _run(chunks, packed=packed)
        if layout.sequence_parallel:
            # What finalize_model_grads does for sequence-parallel norm weights.
            for chunk in chunks:
                for p in chunk.parameters():
                    if getattr(p, "sequence_parallel", False):
                        dist.all_reduce(p.grad, group=parallel.tensor_parallel_group())
            grads = {n: p.grad.detach().clone() for c in chunks for n, p in iter_global_params(c)}
        logit_diff = None
        if coords.is_last_stage:
            assert len(logits) == MICRO_BATCHES
            logit_diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True))
        grad_diff = 0.0
        for chunk in chunks:
            for pname, param in iter_global_params(chunk):
                expected = shard_tensor(ref_grads[pname], param, tp_rank=coords.tp_rank, tp_size=coords.tp)
                grad_diff = max(grad_diff, (grads[pname] - expected).abs().max().item())
        measured[name] = (logit_diff, grad_diff, len(grads))
    weight_norm = torch.sqrt(sum((t.double() ** 2).sum() for t in full.values())).item()
    return {"measured": measured, "weight_norm": weight_norm}


def test_layouts_match_tp1_reference(report):
    results = run_ranks(_layouts_body, 4, timeout_s=240)
    assert len({r["weight_norm"] for r in results}) == 1, "ranks built different reference weights"
    for name in LAYOUTS:
        logit_diffs = [r["measured"][name][0] for r in results if r["measured"][name][0] is not None]
        grad_diff = max(r["measured"][name][1] for r in results)
        params_seen = sum(r["measured"][name][2] for r in results)
        assert logit_diffs, f"{name}: no rank reported logits"
        report(f"{name}: max|logit diff|={max(logit_diffs):.2e} max|grad diff|={grad_diff:.2e} (fp32)")
        assert max(logit_diffs) < TOLERANCE, name
        assert grad_diff < TOLERANCE, name
        assert params_seen > 0
