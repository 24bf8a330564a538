"""Norm names are matched between Transformer Engine and local-spec checkpoints, both ways."""

from __future__ import annotations

from types import SimpleNamespace

from atropos_megatron.weights.dist_checkpoint import _match_keys

LOCAL = "decoder.layers.input_layernorm.weight"
TE = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
LOCAL_MLP = "decoder.layers.pre_mlp_layernorm.weight"
TE_MLP = "decoder.layers.mlp.linear_fc1.layer_norm_weight"


def _sharded(*keys):
    return {"model0": {f"entry{i}": SimpleNamespace(key=key) for i, key in enumerate(keys)}}


def test_local_model_reads_a_transformer_engine_checkpoint():
    sharded = _sharded(LOCAL, LOCAL_MLP, "decoder.layers.self_attention.linear_qkv.weight")
    _match_keys(sharded, frozenset({TE, TE_MLP, "decoder.layers.self_attention.linear_qkv.weight"}))
    assert [v.key for v in sharded["model0"].values()] == [
        TE,
        TE_MLP,
        "decoder.layers.self_attention.linear_qkv.weight",
    ]


def test_transformer_engine_model_reads_a_local_checkpoint():
    sharded = _sharded(TE, TE_MLP)
    _match_keys(sharded, frozenset({LOCAL, LOCAL_MLP}))
    assert [v.key for v in sharded["model0"].values()] == [LOCAL, LOCAL_MLP]


def test_keys_present_in_the_checkpoint_are_left_alone():
    sharded = _sharded(LOCAL, "decoder.final_layernorm.weight")
    _match_keys(sharded, frozenset({LOCAL, TE}))
    assert [v.key for v in sharded["model0"].values()] == [LOCAL, "decoder.final_layernorm.weight"]
