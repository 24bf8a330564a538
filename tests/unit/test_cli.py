"""The console script: `config` prints a config that reloads identically; errors exit 2 naming the field."""

from __future__ import annotations

import json

from atropos_megatron.cli import main
from atropos_megatron.config import load_config


def test_config_prints_resolved_yaml_that_reloads(tmp_path, capsys):
    assert main(["config", "--config", "examples/configs/debug_tiny.yaml", "optimizer.lr=5e-4"]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    expected = load_config("examples/configs/debug_tiny.yaml", ["optimizer.lr=5e-4"])
    assert load_config(resolved) == expected


def test_config_error_exits_2_with_the_field(capsys):
    assert main(["config", "grpo.clip_lo=0.1"]) == 2
    assert "grpo.clip_lo: unknown key (did you mean 'clip_low'?)" in capsys.readouterr().err


def test_info_reports_versions_and_launcher(capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["info"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["megatron_core"] == "0.16.1"
    assert facts["distributed_env"]["launcher"] == "single"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_dry_run_with_lora_reports_adapters_and_needs_a_base(capsys):
    assert main(["train", "model.lora.rank=8", "--dry-run"]) == 2
    assert "model.lora needs a base" in capsys.readouterr().err
    config = "examples/configs/llama3.1-70b_4+4nodes.yaml"
    assert main(["train", "--config", config, "model.lora.rank=64", "grpo.kl_coef=0.01", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "LoRA (1.17%; only they train)" in out and "frozen base with the LoRA adapters off" in out


def test_lora_models_use_the_local_spec_even_where_transformer_engine_is_present(monkeypatch, capsys):
    """TE fuses the norms into the linears LoRA wraps: a LoRA model is built on the local spec (SDPA)."""
    from atropos_megatron.trainer import megatron_patches

    monkeypatch.setattr(megatron_patches, "te_available", lambda: True)
    config = "examples/configs/llama3.1-70b_4+4nodes.yaml"
    assert main(["train", "--config", config, "--dry-run"]) == 0
    assert "attention: Transformer Engine (fused)" in capsys.readouterr().out
    assert main(["train", "--config", config, "model.lora.rank=64", "--dry-run"]) == 0
    assert "attention: PyTorch SDPA (local spec)" in capsys.readouterr().out
