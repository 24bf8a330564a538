"""LoRA config, scale and layout: pure checks (the parity with PEFT is tests/distributed/test_lora.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from atropos_megatron.config import LORA_TARGET_MODULES, ConfigError, LoraConfig, ModelConfig, load_config
from atropos_megatron.weights import lora_layout
from atropos_megatron.weights.hf_mapping import fuse_rows
from atropos_megatron.weights.megatron_shards import shard_tensor

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=250,
)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["model.lora.rank=-1"], "model.lora.rank", ">= 0"),
        (["model.lora.alpha=0"], "model.lora.alpha", "> 0"),
        (["model.lora.dropout=1.0"], "model.lora.dropout", "[0, 1)"),
        (["model.lora.dropout=-0.1"], "model.lora.dropout", "[0, 1)"),
        (["model.lora.target_modules=[q_proj,qkv_proj]"], "model.lora.target_modules", "'qkv_proj'"),
        (["model.lora.target_modules=[q_proj,q_proj]"], "model.lora.target_modules", "at most once"),
        (["model.lora.target_modules=[]"], "model.lora.target_modules", "at least one"),
        (["model.lora.ranks=4"], "model.lora.ranks", "did you mean 'rank'"),
    ],
)
def test_bad_lora_config_names_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert field in str(info.value) and words in str(info.value)


def test_lora_is_off_by_default_and_targets_every_projection():
    cfg = load_config(overrides=["model.lora.rank=8", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora == LoraConfig(rank=8, target_modules=["q_proj", "v_proj"])
    default = load_config().model.lora
    assert not default.enabled and default.target_modules == list(LORA_TARGET_MODULES)


def test_scale_is_alpha_over_rank_or_over_its_root_with_rslora():
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoraConfig(rank=16, alpha=16, use_rslora=True).scale == pytest.approx(16 / math.sqrt(16))
    with pytest.raises(ConfigError, match="model.lora.rank"):
        _ = LoraConfig(rank=0).scale


def test_model_config_rebuilt_from_asdict_keeps_its_lora():
    model = dataclasses.replace(MODEL, lora=LoraConfig(rank=4, target_modules=["o_proj"]))
    assert ModelConfig(**dataclasses.asdict(model)) == model


def test_sites_cover_each_projection_once_in_fused_row_order():
    keys = [key for site in lora_layout.SITES for key in site.keys]
    assert sorted(keys) == sorted(LORA_TARGET_MODULES)
    qkv, proj, fc1, fc2 = lora_layout.SITES
    assert qkv.keys == ("q_proj", "k_proj", "v_proj") and fc1.keys == ("gate_proj", "up_proj")
    assert [s.parallel for s in lora_layout.SITES] == ["column", "row", "column", "row"]
    sites = lora_layout.sites_for(["down_proj", "v_proj", "q_proj"])
    assert [(s.linear, keys) for s, keys in sites] == [
        ("self_attention.linear_qkv", ("q_proj", "v_proj")),
        ("mlp.linear_fc2", ("down_proj",)),
    ]


def test_factor_shapes_are_peft_shapes_split_like_the_base_weight():
    qkv, proj, fc1, fc2 = lora_layout.SITES
    shape = lora_layout.factor_shape
    assert shape(qkv, "k_proj", "A", rank=4, model=MODEL, tp=2) == (4, 64)
    assert shape(qkv, "k_proj", "B", rank=4, model=MODEL, tp=2) == (16, 4)  # 2 groups x 16 / 2
    assert shape(proj, "o_proj", "A", rank=4, model=MODEL, tp=2) == (4, 32)
    assert shape(proj, "o_proj", "B", rank=4, model=MODEL, tp=2) == (64, 4)
    assert shape(fc1, "up_proj", "B", rank=4, model=MODEL, tp=1) == (96, 4)
    assert shape(fc2, "down_proj", "A", rank=4, model=MODEL, tp=2) == (4, 48)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(("site_index", "stride"), [(0, 1), (2, 2)])
def test_one_ranks_fused_rows_equal_its_shard_of_the_full_fused_rows(tp, site_index, stride):
    """B's local rows, fused per rank, land exactly where the base weight's TP shard puts them."""
    site = lora_layout.SITES[site_index]
    gen = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(lora_layout.projection_features(key, MODEL)[1], 3, generator=gen) for key in site.keys
    ]
    full = fuse_rows(site.linear, parts, MODEL)
    like_weight = torch.empty(0)  # the partition attributes Megatron gives linear_qkv / linear_fc1
    like_weight.tensor_model_parallel, like_weight.partition_dim, like_weight.partition_stride = (
        True,
        0,
        stride,
    )
    per_rank = lora_layout.rank_model(MODEL, tp)
    for tp_rank in range(tp):
        local = fuse_rows(site.linear, [p.chunk(tp)[tp_rank] for p in parts], per_rank)
        assert torch.equal(local, shard_tensor(full, like_weight, tp_rank=tp_rank, tp_size=tp))


def test_peft_and_megatron_names_map_one_to_one():
    names = [
        lora_layout.peft_adapter_name(1, proj, f)
        for site in lora_layout.SITES
        for proj in site.projections
        for f in lora_layout.FACTORS
    ]
    assert len(set(names)) == 2 * len(LORA_TARGET_MODULES)
    for name in names:
        mcore = lora_layout.peft_to_megatron_name(name)
        assert lora_layout.is_adapter_name(mcore)
        assert lora_layout.megatron_to_peft_name(mcore) == name
    assert (
        lora_layout.peft_to_megatron_name("base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight")
        == "decoder.layers.3.mlp.linear_fc1.lora.gate_proj.lora_B.weight"
    )
    assert not lora_layout.is_adapter_name("decoder.layers.0.self_attention.linear_qkv.weight")
    with pytest.raises(ValueError, match="lora_A.default.weight"):
        lora_layout.peft_to_megatron_name(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        )


def test_lora_is_a_choice_of_the_run_not_of_the_architecture():
    from atropos_megatron.weights.hf_architectures import architecture_mismatches, model_config_from_hf
    from tests.hf_models import tiny_hf_config

    hf = tiny_hf_config("qwen2").to_dict()
    with_lora = model_config_from_hf(hf, lora=LoraConfig(rank=4))
    assert with_lora.lora.rank == 4
    assert architecture_mismatches(with_lora, model_config_from_hf(hf)) == []
