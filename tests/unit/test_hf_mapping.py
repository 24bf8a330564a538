"""HF config -> ModelConfig, and the HF <-> Megatron tensor mapping, on tiny local models."""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.config import ModelConfig
from atropos_megatron.trainer.model import padded_vocab_size
from atropos_megatron.weights.hf_architectures import (
    model_config_from_hf,
    read_hf_config,
    resolve_architecture,
)
from atropos_megatron.weights.hf_mapping import hf_to_megatron, megatron_targets, megatron_to_hf
from tests.hf_models import MOE_VARIANTS, VARIANTS, hf_state, tiny_hf_config, tiny_hf_model


def test_each_architecture_reads_into_the_matching_model_config():
    llama = model_config_from_hf(tiny_hf_config("llama").to_dict())
    assert (llama.rotary_base, llama.rope_scaling_factor, llama.tie_word_embeddings) == (500000.0, 8.0, False)
    assert (llama.num_query_groups, llama.head_dim, llama.norm_epsilon) == (2, 16, 1e-5)
    qwen2 = model_config_from_hf(tiny_hf_config("qwen2").to_dict())
    assert qwen2.add_qkv_bias and qwen2.tie_word_embeddings and qwen2.rope_scaling_factor is None
    qwen3 = model_config_from_hf(tiny_hf_config("qwen3").to_dict())
    assert qwen3.qk_layernorm and qwen3.head_dim == 32 and not qwen3.add_qkv_bias
    assert model_config_from_hf(tiny_hf_config("mistral").to_dict(), dtype="bf16").dtype == "bf16"


def test_older_config_style_with_top_level_rope_keys(tmp_path):
    old_style = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 250, "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(__import__("json").dumps(old_style))
    cfg = model_config_from_hf(read_hf_config(tmp_path))
    assert (cfg.rotary_base, cfg.rope_scaling_factor, cfg.num_query_groups) == (500000.0, 32.0, 4)


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("mistral", dict(sliding_window=4096), "sliding_window=4096"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=128, max_position_embeddings=4096), "sliding"),
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        ("llama", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "yarn"),
        (
            "llama",
            dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=2.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                    rope_theta=1e4,
                )
            ),
            "low_freq_factor",
        ),  # fmt: skip
    ],
)
def test_features_we_cannot_reproduce_are_refused_by_name(model_type, overrides, message):
    hf = tiny_hf_config(model_type).to_dict()
    hf.update(overrides)
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(hf)


def test_moe_architectures_read_their_expert_fields():
    qwen3_moe = model_config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    moe = qwen3_moe.moe
    assert (moe.num_experts, moe.router_topk, moe.ffn_hidden_size, moe.normalize_topk) == (4, 2, 32, False)
    assert (moe.dense_layers, qwen3_moe.moe_layers, qwen3_moe.ffn_hidden_size) == ([1], [0, 2, 3], 96)
    assert qwen3_moe.qk_layernorm and moe.hf_layout == "qwen3_moe" and moe.router_aux_loss_coef == 0.001
    # decoder_sparse_step=2: HF makes layers 1 and 3 sparse ((i + 1) % 2 == 0), plus mlp_only_layers.
    stepped = model_config_from_hf(
        tiny_hf_config("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[3]).to_dict()
    )
    assert stepped.moe_layers == [1]
    mixtral = model_config_from_hf(tiny_hf_config("mixtral").to_dict())
    assert (mixtral.moe.num_experts, mixtral.expert_ffn_hidden_size, mixtral.moe.normalize_topk) == (
        4,
        96,
        True,
    )
    assert mixtral.moe_layers == [0, 1] and mixtral.moe.hf_layout == "mixtral" and not mixtral.qk_layernorm


@pytest.mark.parametrize(
    ("hf", "message"),
    [
        ({"model_type": "qwen2_moe"}, "shared experts"),
        ({"model_type": "deepseek_v3"}, "latent attention"),
        ({**tiny_hf_config("mixtral").to_dict(), "router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({**tiny_hf_config("llama").to_dict(), "num_local_experts": 8}, "mixture of experts in a dense"),
    ],
)
def test_moe_features_we_cannot_reproduce_are_refused_by_name(hf, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(hf)


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"):
        model_config_from_hf({"model_type": "gpt2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)


def test_qkv_is_interleaved_per_query_group_and_fc1_is_gate_then_up():
    """Hand-made: 4 heads in 2 groups, head_dim 1, hidden 1."""
    cfg = model_config_from_hf(
        tiny_hf_config("qwen2", num_hidden_layers=1, hidden_size=4, num_attention_heads=4).to_dict()
    )
    assert cfg.head_dim == 1
    tensors = {
        "model.layers.0.self_attn.q_proj.bias": torch.tensor([0.0, 1.0, 2.0, 3.0]),
        "model.layers.0.self_attn.k_proj.bias": torch.tensor([10.0, 11.0]),
        "model.layers.0.self_attn.v_proj.bias": torch.tensor([20.0, 21.0]),
        "model.layers.0.mlp.gate_proj.weight": torch.tensor([[1.0], [2.0]]),
        "model.layers.0.mlp.up_proj.weight": torch.tensor([[3.0], [4.0]]),
    }
    out = dict(hf_to_megatron(tensors.items(), cfg, padded_vocab=256))
    assert out["decoder.layers.0.self_attention.linear_qkv.bias"].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert out["decoder.layers.0.mlp.linear_fc1.weight"].squeeze(1).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("model_type", [*VARIANTS, *MOE_VARIANTS])
def test_hf_to_megatron_to_hf_is_bit_exact(model_type):
    model = tiny_hf_model(model_type)
    cfg = model_config_from_hf(model.config.to_dict())
    state = hf_state(model)
    padded = padded_vocab_size(cfg.vocab_size, 128, 2)
    mcore = dict(hf_to_megatron(state.items(), cfg, padded_vocab=padded))
    assert mcore["embedding.word_embeddings.weight"].shape[0] == padded == 256
    assert torch.all(mcore["embedding.word_embeddings.weight"][250:] == 0)
    assert ("output_layer.weight" in mcore) != cfg.tie_word_embeddings
    back = dict(megatron_to_hf(mcore.items(), cfg))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_missing_and_unexpected_tensors_are_named():
    model = tiny_hf_model("llama")
    cfg = model_config_from_hf(model.config.to_dict())
    state = hf_state(model)
    without_v = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.self_attn\.v_proj\.weight"):
        list(hf_to_megatron(without_v.items(), cfg, padded_vocab=256))
    extra = {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}  # a Qwen3 tensor in a Llama
    with pytest.raises(ValueError, match="q_norm"):
        list(hf_to_megatron(extra.items(), cfg, padded_vocab=256))
    with pytest.raises(ValueError, match="model.layers.7"):
        list(hf_to_megatron([("model.layers.7.mlp.down_proj.weight", torch.ones(1))], cfg, padded_vocab=256))
    with pytest.raises(ValueError, match="vocab_size=250"):
        list(hf_to_megatron([("model.embed_tokens.weight", torch.ones(300, 64))], cfg, padded_vocab=256))


def test_experts_map_per_expert_with_gate_then_up_and_the_router_renamed():
    model = tiny_hf_model("mixtral")
    cfg = model_config_from_hf(model.config.to_dict())
    state = hf_state(model)
    mcore = dict(hf_to_megatron(state.items(), cfg, padded_vocab=256))
    hf_expert, mcore_expert = (
        "model.layers.1.block_sparse_moe.experts.3",
        "decoder.layers.1.mlp.experts.local_experts.3",
    )
    fc1 = mcore[f"{mcore_expert}.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([state[f"{hf_expert}.w1.weight"], state[f"{hf_expert}.w3.weight"]]))
    assert torch.equal(mcore[f"{mcore_expert}.linear_fc2.weight"], state[f"{hf_expert}.w2.weight"])
    assert torch.equal(
        mcore["decoder.layers.1.mlp.router.weight"], state["model.layers.1.block_sparse_moe.gate.weight"]
    )
    assert megatron_targets("model.layers.1.block_sparse_moe.experts.3.w3.weight", cfg) == (
        f"{mcore_expert}.linear_fc1.weight",
    )


def test_moe_tensors_out_of_place_are_named():
    model = tiny_hf_model("qwen3_moe")
    cfg = model_config_from_hf(model.config.to_dict())
    state = hf_state(model)
    dense_in_moe_layer = {**state, "model.layers.0.mlp.down_proj.weight": torch.ones(64, 96)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj"):
        list(hf_to_megatron(dense_in_moe_layer.items(), cfg, padded_vocab=256))
    expert_in_dense_layer = {**state, "model.layers.1.mlp.experts.0.down_proj.weight": torch.ones(64, 32)}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.0"):
        list(hf_to_megatron(expert_in_dense_layer.items(), cfg, padded_vocab=256))
    ninth_expert = {**state, "model.layers.0.mlp.experts.8.down_proj.weight": torch.ones(64, 32)}
    with pytest.raises(ValueError, match=r"experts\.8"):
        list(hf_to_megatron(ninth_expert.items(), cfg, padded_vocab=256))
    without_up = {k: v for k, v in state.items() if k != "model.layers.2.mlp.experts.1.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\.mlp\.experts\.1\.up_proj"):
        list(hf_to_megatron(without_up.items(), cfg, padded_vocab=256))


def test_model_hf_path_takes_the_architecture_from_config_json(tmp_path):
    tiny_hf_config("qwen3").save_pretrained(tmp_path)
    configured = ModelConfig(hf_path=str(tmp_path), dtype="bf16", num_layers=7)
    resolved = resolve_architecture(configured)
    assert (resolved.num_layers, resolved.head_dim, resolved.qk_layernorm, resolved.dtype) == (
        2,
        32,
        True,
        "bf16",
    )
    assert resolve_architecture(ModelConfig()) == ModelConfig()


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (dict(expert_parallel_size=3), "expert_parallel_size=3 does not divide model.moe.num_experts=4"),
        (dict(tensor_parallel_size=2), "needs parallel.sequence_parallel=true"),
        (dict(tensor_parallel_size=3), "does not divide model.moe.ffn_hidden_size=32"),
    ],
)
def test_moe_layouts_that_do_not_fit_are_named(sizes, message):
    from atropos_megatron.config import ParallelConfig
    from atropos_megatron.trainer.model import check_model_layout

    cfg = model_config_from_hf(tiny_hf_config("qwen3_moe").to_dict())
    with pytest.raises(ValueError, match=message):
        check_model_layout(cfg, ParallelConfig(**sizes))
    dense = model_config_from_hf(tiny_hf_config("qwen3").to_dict())
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        check_model_layout(dense, ParallelConfig(expert_parallel_size=2))
