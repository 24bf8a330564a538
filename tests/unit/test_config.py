"""Typed config: defaults validate, YAML + overrides merge, and every kind of mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from atropos_megatron.config import ConfigError, TrainConfig, config_to_yaml, load_config, save_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.parallel.model_parallel_size == 1


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 3.0e-6\nsteps: 7\n")
    cfg = load_config(path, ["steps=9", "weights.inference_servers=[http://127.0.0.1:30000]"])
    assert cfg.optimizer.lr == 3e-6
    assert cfg.steps == 9
    assert cfg.weights.inference_servers == ["http://127.0.0.1:30000"]


def test_environment_interpolation_keeps_secrets_out_of_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_BRIDGE_TOKEN", "s3cret")
    path = tmp_path / "run.yaml"
    path.write_text("bridge:\n  auth_token: ${oc.env:TEST_BRIDGE_TOKEN}\n")
    assert load_config(path).bridge.auth_token == "s3cret"


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["optimizer.lrr=1e-6"], "optimizer.lrr", "did you mean 'lr'"),
        (["modle.num_layers=2"], "modle", "did you mean 'model'"),
        (["optimizer.nonsense=1"], "optimizer.nonsense", "known keys: name, lr"),
        (["optimizer.lr=fast"], "optimizer.lr", "could not be converted"),
        (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel", "not a valid bool"),
        (["grpo.clip_low=1.5"], "grpo.clip_low", "[0, 1)"),
        (["grpo.loss_aggregation=sum"], "grpo.loss_aggregation", "'token-mean'"),
        (["grpo.dual_clip=0.5"], "grpo.dual_clip", "> 1"),
        (["grpo.kl_clamp=0"], "grpo.kl_clamp", "> 0 (or null)"),
        (["grpo.loss_norm_length=0"], "grpo.loss_norm_length", "null for data.max_token_len"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "tensor_parallel_size > 1"),
        (["parallel.virtual_pipeline_parallel_size=2"], "parallel.virtual_pipeline_parallel_size", ">= 2"),
        (["parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size", "key/value heads"),
        (["model.hidden_size=66"], "model.hidden_size", "num_attention_heads"),
        (["model.num_query_groups=3"], "model.num_query_groups", "divide"),
        (["data.max_token_len=8192"], "data.max_token_len", "max_position_embeddings"),
        (["data.micro_batch_tokens=16"], "data.micro_batch_tokens", "one full sequence"),
        (["bridge.address=localhost"], "bridge.address", "host:port"),
        (["bridge.tls_cert=/tmp/cert.pem"], "bridge.tls_key", "together"),
        (["weights.transport=disk"], "weights.disk_dir", "transport=disk"),
        (["weights.transport=nfs"], "weights.transport", "'grpc'"),
        (["optimizer.min_lr=1"], "optimizer.min_lr", "[0, lr="),
        (["steps=0"], "steps", "> 0"),
        (["steps"], "steps", "key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert hint in message, message


def test_kl_clamp_defaults_to_verls_and_null_disables_it():
    assert load_config().grpo.kl_clamp == 10.0
    assert load_config(None, ["grpo.kl_clamp=null"]).grpo.kl_clamp is None
    assert load_config(None, ["grpo.loss_norm_length=1024"]).grpo.loss_norm_length == 1024


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_dump_reloads_to_the_same_config(tmp_path):
    cfg = load_config(None, ["grpo.clip_high=0.28", "parallel.tensor_parallel_size=2", "optimizer.lr=2e-6"])
    path = save_config(cfg, tmp_path / "sub" / "resolved.yaml")
    assert load_config(path) == cfg
    assert "clip_high: 0.28" in config_to_yaml(cfg)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path):
    load_config(path)


def test_there_are_example_configs():
    assert EXAMPLES, "examples/configs/*.yaml is empty"
