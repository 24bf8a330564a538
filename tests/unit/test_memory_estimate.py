"""The --dry-run arithmetic: parameter counts match real Megatron models exactly, per pipeline rank;
memory estimates follow their documented formula on a hand-computed case and scale as they should."""

from __future__ import annotations

import dataclasses

import pytest

from atropos_megatron.config import (
    DataConfig,
    GRPOConfig,
    LoraConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)
from atropos_megatron.trainer.memory import (
    CUDA_OVERHEAD_BYTES,
    GIB,
    estimate_memory,
    in_flight_chunk_passes,
    layer_activation_bytes,
    lora_params_per_pipeline_rank,
    micro_batch_shape,
    moe_dispatch_bytes,
    moe_mlp_activation_bytes,
    parameter_counts,
    params_per_pipeline_rank,
    router_score_tensors,
    total_parameters,
)
from tests.harness import run_ranks

# Two small models that between them exercise every optional parameter: GQA + QKV bias + RMSNorm +
# SwiGLU (Qwen2-like), and LayerNorm (norm biases) + GeLU + qk_layernorm + a head_dim that is not
# hidden / heads + tied embeddings (with PP=2 Megatron keeps a copy on the last stage).
MODELS = {
    "qwen2-like": dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=200,
        add_qkv_bias=True,
    ),
    "layernorm-gelu-tied": dict(
        num_layers=4,
        hidden_size=48,
        ffn_hidden_size=80,
        num_attention_heads=4,
        head_dim=24,
        vocab_size=300,
        normalization="LayerNorm",
        activation="gelu",
        qk_layernorm=True,
        tie_word_embeddings=True,
    ),
}
LAYOUTS = {
    "TP=1": dict(),
    "TP=2": dict(tensor_parallel_size=2),
    "PP=2": dict(pipeline_parallel_size=2),
    "PP=2xVPP=2": dict(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2),
}
LORA = LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def _count_megatron_params(rank, world_size):
    """``{(model, layout): (pp_rank, [numel per chunk])}`` of the models Megatron builds on this rank."""
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.lora import apply_lora, trainable_parameters
    from atropos_megatron.trainer.model import build_model

    parallel.init_distributed(ParallelConfig(), seed=0)
    counts = {}
    for layout_name, layout_kwargs in LAYOUTS.items():
        layout = ParallelConfig(**layout_kwargs)
        placement = parallel.setup_model_parallel(layout, seed=0)
        for model_name, model_kwargs in MODELS.items():
            model = ModelConfig(**model_kwargs)
            chunks = build_model(model, layout, initialize=False)
            numels = [sum(p.numel() for p in chunk.parameters()) for chunk in chunks]
            apply_lora(chunks, LORA, model)
            adapters = sum(p.numel() for _, p in trainable_parameters(chunks))
            counts[model_name, layout_name] = (placement.pp_rank, numels, adapters)
    return counts


@pytest.mark.distributed
def test_parameter_counts_match_megatron_models_on_every_rank():
    per_rank = run_ranks(_count_megatron_params, 2, timeout_s=90)
    checked = 0
    for (model_name, layout_name), _ in per_rank[0].items():
        model = ModelConfig(**MODELS[model_name])
        expected = parameter_counts(model, ParallelConfig(**LAYOUTS[layout_name]))
        lora = lora_params_per_pipeline_rank(
            dataclasses.replace(model, lora=LORA), ParallelConfig(**LAYOUTS[layout_name])
        )
        for rank_counts in per_rank:
            pp_rank, numels, adapters = rank_counts[model_name, layout_name]
            mine = [stage.total for stage in expected if stage.pp_rank == pp_rank]
            assert mine == numels, (model_name, layout_name, pp_rank)
            assert lora[pp_rank] == adapters, (model_name, layout_name, pp_rank, "LoRA")
            checked += 1
        if layout_name == "TP=1":
            assert total_parameters(model) == per_rank[0][model_name, layout_name][1][0]
    assert checked == 2 * len(MODELS) * len(LAYOUTS)


# Two small MoE models: Qwen3-MoE-like (qk norm, GQA, experts narrower than the dense MLP, one dense
# layer, so pipeline stages and VPP chunks differ) and Mixtral-like (every layer MoE, experts as wide
# as ffn_hidden_size, LayerNorm + tied embeddings for the optional parameters).
MOE_MODELS = {
    "qwen3moe-like": dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=24,
        qk_layernorm=True,
        vocab_size=200,
        moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=32, dense_layers=[1]),
    ),
    "mixtral-like": dict(
        num_layers=4,
        hidden_size=48,
        ffn_hidden_size=80,
        num_attention_heads=4,
        vocab_size=300,
        normalization="LayerNorm",
        tie_word_embeddings=True,
        moe=MoEConfig(num_experts=8, router_topk=2),
    ),
}
MOE_LAYOUTS = {  # on 4 ranks
    "EP=1 DP=4": dict(),
    "EP=4": dict(expert_parallel_size=4),
    "TP=2 EP=2": dict(tensor_parallel_size=2, expert_parallel_size=2, sequence_parallel=True),
    "PP=2 EP=2": dict(pipeline_parallel_size=2, expert_parallel_size=2),
    "PP=2xVPP=2 EP=2": dict(
        pipeline_parallel_size=2, virtual_pipeline_parallel_size=2, expert_parallel_size=2
    ),
    "TP=2 PP=2 allgather": dict(
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        sequence_parallel=True,
        moe_token_dispatcher="allgather",
    ),
}


def _count_megatron_moe_params(rank, world_size):
    """``{(model, layout): (pp_rank, [numel per chunk], [expert numel per chunk])}`` on this rank."""
    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model

    parallel.init_distributed(ParallelConfig(), seed=0)
    counts = {}
    for layout_name, layout_kwargs in MOE_LAYOUTS.items():
        layout = ParallelConfig(**layout_kwargs)
        placement = parallel.setup_model_parallel(layout, seed=0)
        for model_name, model_kwargs in MOE_MODELS.items():
            chunks = build_model(ModelConfig(**model_kwargs), layout, initialize=False)
            numels = [sum(p.numel() for p in chunk.parameters()) for chunk in chunks]
            experts = [
                sum(p.numel() for name, p in chunk.named_parameters() if ".mlp.experts." in name)
                for chunk in chunks
            ]
            counts[model_name, layout_name] = (placement.pp_rank, numels, experts)
    return counts


@pytest.mark.distributed
def test_moe_parameter_counts_match_megatron_models_on_every_rank(report):
    per_rank = run_ranks(_count_megatron_moe_params, 4, timeout_s=300)
    checked = 0
    for model_name, model_kwargs in MOE_MODELS.items():
        model = ModelConfig(**model_kwargs)
        for layout_name, layout_kwargs in MOE_LAYOUTS.items():
            expected = parameter_counts(model, ParallelConfig(**layout_kwargs))
            for rank_counts in per_rank:
                pp_rank, numels, experts = rank_counts[model_name, layout_name]
                mine = [stage for stage in expected if stage.pp_rank == pp_rank]
                assert [stage.total for stage in mine] == numels, (model_name, layout_name, pp_rank)
                assert [stage.expert_params for stage in mine] == experts, (model_name, layout_name, pp_rank)
                checked += 1
        assert total_parameters(model) == sum(per_rank[0][model_name, "EP=1 DP=4"][1])
    assert checked == 4 * len(MOE_MODELS) * len(MOE_LAYOUTS)
    report(f"MoE parameter counts equal Megatron's on {checked} (model, layout, rank) cases")


SAVED_LAYOUTS = {  # on 2 ranks; every rank feeds the same tokens
    "TP=1 DP=2": dict(),
    "TP=2 SP": dict(tensor_parallel_size=2, sequence_parallel=True),
    "EP=2": dict(expert_parallel_size=2),
}
SAVED_BATCH, SAVED_SEQ = 2, 32


def _mlp_saved_bytes(rank, world_size):
    """``{layout: bytes}``: what one training forward of ``MOE_MODELS["qwen3moe-like"]`` saves for
    backward inside its MoE MLPs (:func:`_saved_inside_moe_mlps`), per layout."""
    import torch

    from atropos_megatron.trainer import parallel
    from atropos_megatron.trainer.model import build_model

    parallel.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 200, (SAVED_BATCH, SAVED_SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SAVED_SEQ).expand(SAVED_BATCH, SAVED_SEQ)
    model = dataclasses.replace(ModelConfig(**MOE_MODELS["qwen3moe-like"]), max_position_embeddings=SAVED_SEQ)
    measured = {}
    for name, layout_kwargs in SAVED_LAYOUTS.items():
        layout = ParallelConfig(**layout_kwargs)
        parallel.setup_model_parallel(layout, seed=0)
        (chunk,) = build_model(model, layout, moe_aux_loss_coef=0.01)
        measured[name] = _saved_inside_moe_mlps(chunk, model, tokens, positions)
    return measured


def _saved_inside_moe_mlps(chunk, model, tokens, positions) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while an MoE layer's MLP (router,
    dispatch, experts, combine) runs its training forward."""
    import torch

    chunk.train()
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    saved, inside = {}, []

    def enter(*_):
        inside.append(True)

    def leave(*_):  # a forward hook's return value would replace the output: return None
        inside.pop()

    for layer in chunk.decoder.layers:
        if layer.layer_number - 1 in model.moe_layers:
            layer.mlp.register_forward_pre_hook(enter)
            layer.mlp.register_forward_hook(leave)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if inside and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(tokens, positions, attention_mask=None)
    return sum(saved.values())


@pytest.mark.distributed
def test_moe_activation_estimate_matches_what_megatron_layers_save(report):
    per_rank = run_ranks(_mlp_saved_bytes, 2, timeout_s=300)
    model = ModelConfig(**MOE_MODELS["qwen3moe-like"])
    tokens = SAVED_BATCH * SAVED_SEQ
    ratios = {}
    for name, layout_kwargs in SAVED_LAYOUTS.items():
        layout = ParallelConfig(**layout_kwargs)
        local = tokens // (layout.tensor_parallel_size if layout.sequence_parallel else 1)
        per_rank_estimate = len(model.moe_layers) * (
            moe_mlp_activation_bytes(model, layout, tokens=tokens, router_score_tensors=2)  # + aux loss
            + local * model.hidden_size * 4  # the router's input, counted with the norms by the estimate
        )
        # Summed over ranks: with EP the routing decides which rank gets a copy, not how many there are.
        ratios[name] = sum(measured[name] for measured in per_rank) / (2 * per_rank_estimate)
    report("MoE MLP saved bytes / estimate: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    for name, ratio in ratios.items():
        assert 0.95 < ratio < 1.05, (name, ratio)


def test_tied_embedding_is_counted_once_with_one_stage_and_twice_with_two():
    untied = ModelConfig(**{**MODELS["layernorm-gelu-tied"], "tie_word_embeddings": False})
    tied = dataclasses.replace(untied, tie_word_embeddings=True)
    embedding = 384 * 48  # vocab 300 padded to 384 rows, hidden 48
    assert total_parameters(untied) - total_parameters(tied) == embedding
    pp2 = ParallelConfig(pipeline_parallel_size=2)
    assert params_per_pipeline_rank(tied, pp2) == params_per_pipeline_rank(untied, pp2)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _small_run(world_size=2, **sections) -> tuple[TrainConfig, int]:
    defaults = dict(
        model=ModelConfig(
            num_layers=2,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            vocab_size=128,
            dtype="bf16",
            max_position_embeddings=128,
        ),
        data=DataConfig(batch_size=4, max_token_len=128, micro_batch_tokens=256),
    )
    return TrainConfig(**{**defaults, **sections}), world_size


def test_small_bf16_case_matches_the_hand_computed_bytes():
    estimate = estimate_memory(*_small_run(grpo=GRPOConfig(fused_linear="never")))
    # Parameters, one layer: 2 RMSNorms (2 x 64) + QKV (3*64 x 64) + proj (64 x 64)
    # + fc1 (2*128 x 64) + fc2 (64 x 128) = 128 + 12288 + 4096 + 16384 + 8192 = 41088.
    # Model: 2 layers + embedding (128 x 64) + final norm (64) + output layer (128 x 64).
    params = 2 * 41088 + 8192 + 64 + 8192
    assert params == 98624
    assert estimate.total_params == params
    assert estimate.data_parallel_size == 2
    (stage,) = estimate.stages
    assert stage.params == params
    assert stage.weights_bytes == params * 2  # bf16
    assert stage.grads_bytes == params * 4  # fp32 grad buffer
    assert stage.optimizer_bytes == params * 12 // 2  # main params + 2 Adam moments, sharded over DP=2
    assert stage.reference_bytes == 0
    # Activations, T = 256 tokens packed in 2 rows of s = 128 (max_token_len), bf16 (2 bytes):
    # residual-stream saves 4*T*h = 65536, Q/K/V/proj input 4*T*heads*head_dim = 65536,
    # SwiGLU 4*T*f = 131072 elements -> 262144 * 2 bytes; scores heads*T*s = 131072 at 4 + 2 bytes.
    per_layer = 262144 * 2 + 131072 * 6
    workspace = 131072 * (2 + 4)  # one layer's transient score buffers
    head = 2 * 256 * 64 * 2  # final norm + output layer inputs
    assert stage.activations_bytes == 2 * per_layer + workspace + head
    assert stage.logits_bytes == 256 * 128 * (2 + 4)  # bf16 logits + fp32 copy/gradient
    assert stage.overhead_bytes == CUDA_OVERHEAD_BYTES
    assert (
        estimate.peak_bytes
        == stage.total_bytes
        == sum(
            (
                params * (2 + 4 + 6),
                2 * per_layer + workspace + head,
                256 * 128 * 6,
                CUDA_OVERHEAD_BYTES,
            )
        )
    )


def test_rows_attend_over_max_token_len_not_the_whole_micro_batch():
    # batching packs rows of at most max_token_len (and pads one sequence per row): either way a
    # 256-token micro-batch is 2 rows of 128, and the scores cost heads*T*128, not heads*T*256.
    packed_data = DataConfig(batch_size=4, max_token_len=128, micro_batch_tokens=256)
    padded_data = DataConfig(batch_size=4, max_token_len=128, micro_batch_tokens=256, packing=False)
    assert micro_batch_shape(packed_data) == micro_batch_shape(padded_data) == (2, 128)
    assert micro_batch_shape(DataConfig(max_token_len=100, micro_batch_tokens=100)) == (1, 104)  # x8
    packed = estimate_memory(*_small_run(data=packed_data)).stages[0]
    padded = estimate_memory(*_small_run(data=padded_data)).stages[0]
    assert packed == padded


def test_fused_attention_drops_the_quadratic_score_terms():
    cfg, world = _small_run()
    unfused = estimate_memory(cfg, world).stages[0]
    fused = estimate_memory(cfg, world, fused_attention=True).stages[0]
    # Unfused minus fused, per layer: the scores (131072 x 6 bytes) and repeated K/V vs. Q, K, V
    # unrepeated + output (MHA here: the same 4 tensors); plus the one-layer workspace.
    assert unfused.activations_bytes - fused.activations_bytes == 2 * 131072 * 6 + 131072 * 6


def test_distributed_optimizer_divides_optimizer_state_by_data_parallel_size():
    one = estimate_memory(*_small_run(world_size=1)).stages[0]
    eight = estimate_memory(*_small_run(world_size=8)).stages[0]
    assert one.optimizer_bytes == one.params * 12
    assert eight.optimizer_bytes == one.params * 12 / 8
    assert eight.weights_bytes == one.weights_bytes and eight.grads_bytes == one.grads_bytes
    replicated = estimate_memory(
        *_small_run(world_size=8, optimizer=OptimizerConfig(use_distributed_optimizer=False))
    )
    assert replicated.stages[0].optimizer_bytes == one.params * 12


def test_optimizer_state_depends_on_dtype_and_optimizer():
    fp32 = ModelConfig(**{**dataclasses.asdict(_small_run()[0].model), "dtype": "fp32"})
    params = estimate_memory(*_small_run(world_size=1)).stages[0].params
    assert estimate_memory(*_small_run(world_size=1, model=fp32)).stages[0].optimizer_bytes == params * 8
    sgd = OptimizerConfig(name="sgd", use_distributed_optimizer=False)
    # SGD without momentum (trainer/optimizer.py): only the fp32 main copy of the bf16 weights.
    assert estimate_memory(*_small_run(world_size=1, optimizer=sgd)).stages[0].optimizer_bytes == params * 4


def test_reference_weights_only_with_a_kl_penalty():
    without = estimate_memory(*_small_run()).stages[0]
    with_kl = estimate_memory(*_small_run(grpo=GRPOConfig(kl_coef=0.05))).stages[0]
    assert without.reference_bytes == 0
    assert with_kl.reference_bytes == with_kl.weights_bytes
    assert with_kl.total_bytes - without.total_bytes == with_kl.weights_bytes


def test_the_fused_linear_loss_holds_one_chunk_of_logits():
    whole = estimate_memory(*_small_run(grpo=GRPOConfig(fused_linear="never"))).stages[0]
    fused = estimate_memory(*_small_run(grpo=GRPOConfig(fused_linear="always"))).stages[0]
    # 256 tokens x hidden 64 / vocab 128 = a 128-token chunk: half the micro-batch's logits.
    assert whole.logits_bytes == 256 * 128 * 6 and fused.logits_bytes == 128 * 128 * 6
    assert fused.total_bytes == whole.total_bytes - 128 * 128 * 6
    # auto: a micro-batch's fp32 logits here are 128 KiB, far below 256 MiB: whole logits.
    assert estimate_memory(*_small_run()).stages[0].logits_bytes == whole.logits_bytes


def test_auto_fuses_where_the_logits_are_large():
    from atropos_megatron.kernels.fused_linear_grpo import use_fused_linear

    assert use_fused_linear("auto", 16384, 152064 // 4)  # 2.3 GiB of fp32 logits
    assert not use_fused_linear("auto", 2048, 8192)  # 64 MiB
    assert use_fused_linear("always", 1, 1) and not use_fused_linear("never", 10**6, 10**6)


def test_lora_trains_only_adapters_and_needs_no_reference_copy():
    full = estimate_memory(*_small_run(grpo=GRPOConfig(kl_coef=0.05))).stages[0]
    cfg, world = _small_run(grpo=GRPOConfig(kl_coef=0.05))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LORA))
    estimate = estimate_memory(cfg, world)
    lora = estimate.stages[0]
    adapters = lora_params_per_pipeline_rank(cfg.model, cfg.parallel)[0]
    assert 0 < adapters == lora.trained_params == lora.params - full.params
    assert lora.reference_bytes == 0
    assert lora.grads_bytes == adapters * 4  # the fp32 gradient buffer holds adapters only
    assert lora.optimizer_bytes < full.optimizer_bytes * adapters / full.params * 1.01
    assert lora.total_bytes < full.total_bytes
    assert "LoRA" in estimate.format_table()
    dropout = dataclasses.replace(cfg.model, lora=dataclasses.replace(LORA, dropout=0.1))
    with_dropout = estimate_memory(dataclasses.replace(cfg, model=dropout), world).stages[0]
    assert with_dropout.activations_bytes > lora.activations_bytes  # dropped copies of the inputs


def test_world_size_not_divisible_by_the_model_parallel_size_is_an_error():
    cfg, _ = _small_run(parallel=ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        estimate_memory(cfg, 6)
    assert estimate_memory(cfg, 8).data_parallel_size == 2


def test_first_pipeline_stage_holds_the_most_micro_batches():
    pp4 = ParallelConfig(pipeline_parallel_size=4)
    assert [in_flight_chunk_passes(pp4, rank, 16) for rank in range(4)] == [4, 3, 2, 1]
    assert [in_flight_chunk_passes(pp4, rank, 2) for rank in range(4)] == [2, 2, 2, 1]
    # Interleaved, rank 0: 2*(pp-1) + (vpp-1)*pp + 1 = 6 + 4 + 1 = 11 passes of half a stage each,
    # i.e. pp * (1 + (pp-1)/(pp*vpp)) = 5.5 stages' worth (Megatron-LM's interleaving penalty).
    vpp2 = ParallelConfig(pipeline_parallel_size=4, virtual_pipeline_parallel_size=2)
    assert in_flight_chunk_passes(vpp2, 0, 16) == 11
    cfg, _ = _small_run(
        model=dataclasses.replace(_small_run()[0].model, num_layers=4),
        parallel=pp4,
        data=DataConfig(batch_size=64, max_token_len=128, micro_batch_tokens=256),
    )
    estimate = estimate_memory(cfg, 4)
    assert estimate.chunk_passes_in_flight == (4, 3, 2, 1)
    activations = [stage.activations_bytes for stage in estimate.stages]
    assert activations[0] > activations[1] > activations[2]
    assert estimate.stages[-1].logits_bytes > 0 and estimate.stages[0].logits_bytes == 0


def _qwen25_7b() -> ModelConfig:
    return ModelConfig(
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        add_qkv_bias=True,
        dtype="bf16",
    )


def test_qwen25_7b_on_eight_gpus_is_sane_and_fits_80_gib(report):
    cfg = TrainConfig(model=_qwen25_7b(), parallel=ParallelConfig(tensor_parallel_size=4))
    fused = estimate_memory(cfg, 8, fused_attention=True)
    assert fused.total_params == 7_615_616_512  # the published Qwen2.5-7B size (7.61 B)
    assert fused.data_parallel_size == 2
    (stage,) = fused.stages
    assert 1.8e9 < stage.params < 2.0e9  # about a quarter, norms replicated
    assert 20 * GIB < stage.total_bytes < 80 * GIB
    assert fused.fits(80) and fused.fits(141)
    table = fused.format_table((80, 141))
    assert "fits in 80 GiB" in table and "fits in 141 GiB" in table
    # The local spec materialises 7 heads x 8192^2 scores per layer for a packed 8192-token row;
    # rows of 2048 tokens bring it back under 80 GiB.
    unfused = estimate_memory(cfg, 8)
    short_rows = dataclasses.replace(cfg, data=DataConfig(micro_batch_tokens=2048, max_token_len=2048))
    assert unfused.peak_bytes > fused.peak_bytes
    assert estimate_memory(short_rows, 8).fits(80)
    report(
        f"Qwen2.5-7B TP=4 DP=2, 8192-token rows: {fused.peak_bytes / GIB:.1f} GiB per GPU with fused "
        f"attention, {unfused.peak_bytes / GIB:.1f} GiB unfused"
    )


def test_format_table_says_when_a_run_does_not_fit():
    cfg = TrainConfig(model=_qwen25_7b(), optimizer=OptimizerConfig(use_distributed_optimizer=False))
    estimate = estimate_memory(cfg, 1)
    assert not estimate.fits(80)
    table = estimate.format_table((80,))
    assert "does NOT fit in 80 GiB" in table
    assert table.count("\n") == 4  # summary, title, header, one stage, one verdict


def test_the_spool_estimate_counts_every_batch_a_checkpoint_has_not_committed():
    from atropos_megatron.config import load_config
    from atropos_megatron.trainer.dry_run import SPOOL_BYTES_PER_TOKEN, spool_estimate

    cfg = load_config(
        None,
        ["steps=50", "data.batch_size=4", "data.max_token_len=1024", "checkpoint.save_interval_steps=10",
         "bridge.prefetch_batches=2"],
    )  # fmt: skip
    per_batch = 4 * 1024 * SPOOL_BYTES_PER_TOKEN  # 84 KiB
    assert (
        f"up to 13 batches x {per_batch / 1024:.1f} KiB = {13 * per_batch / 2**20:.1f} MiB"
        in spool_estimate(cfg)
    )
    unbounded = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, save_interval_steps=0)
    )
    assert "up to 53 batches" in spool_estimate(unbounded) and "all 50 steps" in spool_estimate(unbounded)


def test_recompute_lowers_the_activation_estimate_as_documented():
    none = estimate_memory(*_small_run()).stages[0]
    selective = estimate_memory(*_small_run(parallel=ParallelConfig(recompute="selective"))).stages[0]
    full = estimate_memory(*_small_run(parallel=ParallelConfig(recompute="full"))).stages[0]
    scores = 131072 * 6  # one layer's heads*T*s scores at 4 + 2 bytes (see the hand-computed case)
    assert none.activations_bytes - selective.activations_bytes == 2 * scores  # two layers keep none
    # full, groups of 1 layer: each layer's input (T*h bf16) per pass + one layer recomputed at a time
    per_layer = 262144 * 2 + 131072 * 6
    workspace, head = 131072 * (2 + 4), 2 * 256 * 64 * 2
    assert full.activations_bytes == 2 * 256 * 64 * 2 + per_layer + workspace + head
    # With two layers, holding one recomputed layer whole (scores included) costs more than selective.
    assert selective.activations_bytes < full.activations_bytes < none.activations_bytes


# ------------------------------------------------------------------------------------------------
# Mixture of experts
# ------------------------------------------------------------------------------------------------


def _small_moe_run(world_size=2, dispatcher="alltoall", ep=2, **sections) -> tuple[TrainConfig, int]:
    model = dataclasses.replace(
        _small_run()[0].model, moe=MoEConfig(num_experts=4, router_topk=1, ffn_hidden_size=32)
    )
    parallel = ParallelConfig(expert_parallel_size=ep, moe_token_dispatcher=dispatcher)
    return _small_run(world_size, **{"model": model, "parallel": parallel, **sections})


def test_small_moe_case_matches_the_hand_computed_bytes():
    estimate = estimate_memory(*_small_moe_run(grpo=GRPOConfig(fused_linear="never")))
    # One expert: fc1 (2*32 x 64) + fc2 (64 x 32) = 6144. One layer on an EP=2 rank: 2 RMSNorms (128)
    # + QKV (12288) + proj (4096) + router (4 x 64 = 256) + 2 of the 4 experts (12288) = 29056.
    layer, experts = 128 + 12288 + 4096 + 256 + 2 * 6144, 2 * 2 * 6144
    params = 2 * layer + 8192 + 64 + 8192  # + embedding, final norm, output layer
    assert params == 74560
    total = params + 2 * 2 * 6144  # every expert: EP=1
    assert estimate.total_params == total == 99136
    assert estimate.active_params == total - 2 * 3 * 6144  # top-1: 3 of the 4 experts unused per layer
    assert estimate.data_parallel_size == 2 and estimate.expert_data_parallel_size == 1
    (stage,) = estimate.stages
    assert stage.params == params and stage.expert_params == experts
    assert stage.weights_bytes == params * 2 and stage.grads_bytes == params * 4
    # Dense state sharded over DP=2, experts' over expert DP = 2 / (TP 1 x EP 2 x PP 1) = 1.
    assert stage.optimizer_bytes == (params - experts) * 12 // 2 + experts * 12
    # Activations, T = 256 tokens: attention and norms as in the dense case (262144 bytes + 131072
    # scores x 6 bytes); MoE: 256 copies (top-1) x ((64 + 6 x 32) x 2 bytes + 12 routing bytes) + the
    # router's one fp32 [256, 4] tensor and its routing map (+2 bytes): 256 x 4 x 6.
    per_layer = 262144 + 131072 * 6 + 256 * (256 * 2 + 12) + 256 * 4 * 6
    workspace = 131072 * 6  # the attention scores' buffers outweigh the dispatch (98304 bytes)
    head = 2 * 256 * 64 * 2
    assert stage.activations_bytes == 2 * per_layer + workspace + head


def test_expert_state_shards_over_expert_data_parallel_ranks():
    two, eight = (estimate_memory(*_small_moe_run(world)).stages[0] for world in (2, 8))
    dense = two.params - two.expert_params
    assert estimate_memory(*_small_moe_run(8)).expert_data_parallel_size == 4
    assert eight.optimizer_bytes == dense * 12 // 8 + two.expert_params * 12 // 4
    assert eight.weights_bytes == two.weights_bytes  # EP, not DP, splits the experts
    ep1 = estimate_memory(*_small_moe_run(8, ep=1)).stages[0]
    assert ep1.expert_params == 2 * two.expert_params and ep1.params - ep1.expert_params == dense


def test_allgather_dispatch_gathers_every_token_of_the_tp_ep_group():
    fused = dict(fused_attention=True)  # no attention workspace: the dispatch buffers show
    alltoall = estimate_memory(*_small_moe_run(), **fused).stages[0]
    allgather = estimate_memory(*_small_moe_run(dispatcher="allgather"), **fused).stages[0]
    # alltoall: expert output (256 x 64 x 2) + permuted copies and receive buffer (2 x 256 x 64 x 2);
    # allgather: expert output + 512 gathered rows x (64 x (2 + 2 + 4) + 4 experts x 5) bytes.
    assert moe_dispatch_bytes(
        _small_moe_run()[0].model, ParallelConfig(expert_parallel_size=2), tokens=256
    ) == (3 * 256 * 64 * 2)
    assert allgather.activations_bytes - alltoall.activations_bytes == 512 * (64 * 8 + 20) - 2 * 256 * 64 * 2


def test_router_keeps_one_more_fp32_score_tensor_per_loss():
    model = _small_moe_run()[0].model
    assert router_score_tensors(model, 0.0, 0.0) == 1
    assert router_score_tensors(model, 1e-3, 1e-3) == 3
    unnormalised = dataclasses.replace(model, moe=dataclasses.replace(model.moe, normalize_topk=False))
    assert router_score_tensors(unnormalised, 0.0, 0.0) == 2
    without = estimate_memory(*_small_moe_run()).stages[0]
    # grpo.moe_aux_loss_coef null: the model's router_aux_loss_coef decides.
    aux_model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, router_aux_loss_coef=1e-3))
    with_aux = estimate_memory(*_small_moe_run(model=aux_model)).stages[0]
    assert with_aux.activations_bytes - without.activations_bytes == 2 * 256 * 4 * 4  # 2 layers
    off = estimate_memory(*_small_moe_run(model=aux_model, grpo=GRPOConfig(moe_aux_loss_coef=0.0)))
    assert off.stages[0].activations_bytes == without.activations_bytes


def test_moe_layers_cost_more_activations_than_the_dense_layers_they_replace_when_k_is_large():
    model = _small_moe_run()[0].model
    top4 = dataclasses.replace(model, moe=dataclasses.replace(model.moe, router_topk=4))
    layout = ParallelConfig(expert_parallel_size=2)
    shape = dict(tokens=256, attention_length=128)
    dense = layer_activation_bytes(model, layout, **shape)
    # 4 copies of each token through 32-wide experts (6 x 32 + 64 per copy) vs one 128-wide SwiGLU (4 x 128).
    moe = layer_activation_bytes(top4, layout, **shape, moe=True)
    assert moe - dense == 256 * 4 * ((64 + 6 * 32) * 2 + 12) + 256 * 4 * 6 - 256 * 4 * 128 * 2


def test_moe_layouts_that_do_not_divide_name_the_fields():
    cfg, _ = _small_moe_run(ep=4)
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by tensor_parallel_size x "
                       r"expert_parallel_size x pipeline_parallel_size = 1 x 4 x 1"):  # fmt: skip
        estimate_memory(cfg, 2)
    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide model.moe.num_experts=4"):
        estimate_memory(_small_moe_run(ep=3)[0], 6)
    narrow = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, ffn_hidden_size=33))
    tp2 = ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=2 does not divide model.moe.ffn_hidden_size=33"
    ):
        estimate_memory(dataclasses.replace(cfg, model=narrow, parallel=tp2), 2)


def test_dry_run_prints_total_and_active_parameters_and_the_expert_layout():
    from atropos_megatron.trainer.dry_run import dry_run

    cfg, _ = _small_moe_run()
    report = dry_run(cfg, world_size=4)
    assert "MoE: 2 of 2 layers, 4 experts each (32 wide), top 1 renormalised per token" in report
    assert "layout: world 4 (--world-size) = TP 1 x PP 1 x CP 1 x DP 4" in report
    assert (
        "experts: EP 2 x expert TP 1 x PP 1 x expert DP 2; each GPU holds 2 of 4 experts per MoE layer, "
        "whole; expert gradients and optimizer state over expert DP; alltoall dispatcher"
    ) in report
    assert "pipeline rank 0 chunk 0: 2 layers (2 MoE), 74,560 parameters (24,576 in experts)" in report
    assert (
        "parameters: 99.1K total, 62.3K active per token; data parallel size 4, expert data parallel size 2"
        in report
    )
    with pytest.raises(
        ValueError, match=r"world size 3 \(--world-size\) is not divisible by tensor_parallel_size x "
    ):
        dry_run(cfg, world_size=3)
