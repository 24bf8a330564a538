"""The GPU recipes in examples/configs: each loads, its launch section lays out on its nodes, its
dry run has the documented layout and fits an 80 GiB GPU, its architecture is the published model's,
and its environment command expands into a server list atroposlib accepts. Also the dry run's
fallbacks: the config's architecture when the checkpoint is elsewhere, and where the world size
comes from."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from atropos_megatron.cli import main
from atropos_megatron.config import LaunchConfig, load_config
from atropos_megatron.launch.plan import environment_server_type
from atropos_megatron.launch.topology import check_topology, trainer_world_size
from atropos_megatron.trainer.dry_run import dry_run
from atropos_megatron.trainer.memory import active_parameters, total_parameters
from atropos_megatron.weights.hf_architectures import architecture_mismatches, model_config_from_hf

CONFIGS = Path(__file__).parents[2] / "examples" / "configs"


@dataclass(frozen=True)
class Recipe:
    world: int
    tp: int
    pp: int
    dp: int
    servers: int
    published_params: float
    """The size the model card states."""
    hf_config: dict
    """The published config.json (the keys that define the architecture)."""
    ep: int = 1
    """Expert parallel size (MoE recipes)."""
    published_active_params: float | None = None
    """Parameters per token the model card states (MoE: the "A3B" of Qwen3-30B-A3B)."""
    backend: str = "sglang"
    """launch.inference.backend."""
    server_type: str = "sglang"
    """atroposlib server_type the environment's server list names (vLLM: vllm, at the bridge's proxies)."""


RECIPES = {
    "qwen2.5-7b_1node.yaml": Recipe(
        world=4,
        tp=4,
        pp=1,
        dp=1,
        servers=4,
        published_params=7.62e9,
        hf_config={
            "model_type": "qwen2",
            "hidden_act": "silu",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "max_position_embeddings": 32768,
            "num_attention_heads": 28,
            "num_hidden_layers": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 131072,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "vocab_size": 152064,
        },
    ),
    "qwen3-32b_2+2nodes.yaml": Recipe(
        world=16,
        tp=8,
        pp=2,
        dp=1,
        servers=8,
        published_params=32.8e9,
        hf_config={
            "model_type": "qwen3",
            "attention_bias": False,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 5120,
            "intermediate_size": 25600,
            "max_position_embeddings": 40960,
            "num_attention_heads": 64,
            "num_hidden_layers": 64,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "vocab_size": 151936,
        },
    ),
    "llama3.1-70b_4+4nodes.yaml": Recipe(
        world=32,
        tp=8,
        pp=4,
        dp=1,
        servers=4,
        published_params=70.6e9,
        hf_config={
            "model_type": "llama",
            "attention_bias": False,
            "hidden_act": "silu",
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "num_attention_heads": 64,
            "num_hidden_layers": 80,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "vocab_size": 128256,
        },
    ),
}
RECIPES["qwen2.5-7b_1node_vllm.yaml"] = replace(
    RECIPES["qwen2.5-7b_1node.yaml"], backend="vllm", server_type="vllm"
)
RECIPES["qwen3-32b_2+2nodes_vllm.yaml"] = replace(
    RECIPES["qwen3-32b_2+2nodes.yaml"], backend="vllm", server_type="vllm"
)
# Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json (model cards: 30.5B total / 3.3B activated,
# 235B / 22B); the 235B's differs in width, depth, heads and expert width only.
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_235B_A22B = {
    **QWEN3_30B_A3B,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_attention_heads": 64,
    "num_hidden_layers": 94,
}
RECIPES["qwen3-30b-a3b_1+1nodes.yaml"] = Recipe(
    world=8, tp=2, pp=1, dp=4, ep=4, servers=4, published_params=30.5e9, published_active_params=3.3e9,
    hf_config=QWEN3_30B_A3B,
)  # fmt: skip
RECIPES["qwen3-235b-a22b_8+8nodes.yaml"] = Recipe(
    world=64, tp=4, pp=2, dp=8, ep=8, servers=8, published_params=235e9, published_active_params=22e9,
    hf_config=QWEN3_235B_A22B,
)  # fmt: skip
RECIPES["llama3.1-70b-lora_1+3nodes.yaml"] = Recipe(
    world=8, tp=8, pp=1, dp=1, servers=3, published_params=70.6e9,
    hf_config=RECIPES["llama3.1-70b_4+4nodes.yaml"].hf_config,
)  # fmt: skip

PLACEHOLDERS = {
    "api_url", "inference_url", "inference_urls", "model_path", "run_dir", "seed", "python", "server_type"
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """The dry run must take its world size from the recipe, not from the shell running the tests."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SGLANG_PYTHON", "VLLM_PYTHON"):
        monkeypatch.delenv(name, raising=False)


def test_every_gpu_recipe_is_covered():
    # A config without a launch section has the defaults (which name no job); CPU ones say 0 GPUs.
    launches = {path.name: load_config(path).launch for path in CONFIGS.glob("*.yaml")}
    gpu_recipes = {
        name for name, launch in launches.items() if launch != LaunchConfig() and launch.gpus_per_node > 0
    }
    assert gpu_recipes == set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_lays_out_and_fits_80_gib(name):
    recipe = RECIPES[name]
    cfg = load_config(CONFIGS / name)
    check_topology(cfg.launch)
    assert trainer_world_size(cfg.launch) == recipe.world
    assert cfg.model.dtype == "bf16"
    assert cfg.grpo.kl_coef == 0  # no reference model: every estimate below assumes none
    assert cfg.parallel.sequence_parallel
    assert cfg.data.micro_batch_tokens >= cfg.data.max_token_len
    launch = cfg.launch
    servers = launch.colocated_servers + launch.inference_nodes * (
        launch.inference.servers_per_node or launch.gpus_per_node // launch.inference.gpus_per_server
    )
    assert servers == recipe.servers
    assert launch.inference.backend == recipe.backend

    report = dry_run(cfg)
    lines = report.splitlines()
    # The checkpoint path is a placeholder: the recipe's own architecture fields are used, and said so.
    assert lines[0].startswith(f"note: {cfg.model.hf_path} is not on this machine")
    assert f"layout: world {recipe.world} (launch section: {launch.train_nodes} training node" in report
    assert f"= TP {recipe.tp} x PP {recipe.pp} x CP 1 x DP {recipe.dp}" in report
    assert cfg.parallel.expert_parallel_size == recipe.ep
    if recipe.ep > 1:
        expert_dp = recipe.world // (recipe.tp * recipe.ep * recipe.pp)
        assert (
            f"experts: EP {recipe.ep} x expert TP {recipe.tp} x PP {recipe.pp} x expert DP {expert_dp}"
            in report
        )
        # SGLang 0.5.23 spells expert parallelism --ep-size; it must divide the server's --tp-size.
        extra = launch.inference.extra_args
        assert launch.inference.gpus_per_server % int(extra[extra.index("--ep-size") + 1]) == 0
    assert "fits in 80 GiB" in report and "does NOT fit" not in report
    assert "reference model: not built" in report


@pytest.mark.parametrize("name", RECIPES)
def test_cli_dry_run_of_recipe_exits_0(name, capsys):
    assert main(["train", "--config", str(CONFIGS / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"world {RECIPES[name].world} (launch section" in out
    assert "fits in 80 GiB" in out


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_architecture_is_the_published_model(name, tmp_path):
    recipe = RECIPES[name]
    cfg = load_config(CONFIGS / name)
    explicit = cfg.model
    total = total_parameters(explicit)
    assert total == pytest.approx(recipe.published_params, rel=0.01)
    if recipe.published_active_params is not None:  # the card rounds to two digits
        assert active_parameters(explicit) == pytest.approx(recipe.published_active_params, rel=0.02)
    # What a real run reads from config.json is exactly the model section the dry run falls back to.
    from_hf = model_config_from_hf(recipe.hf_config, dtype="bf16")
    assert architecture_mismatches(from_hf, explicit) == []
    # ... so with the checkpoint's config.json present the report is the same, minus the note.
    (tmp_path / "config.json").write_text(json.dumps(recipe.hf_config))
    with_checkpoint = load_config(CONFIGS / name, [f"model.hf_path={tmp_path}"])
    report = dry_run(with_checkpoint).replace(
        str(tmp_path), cfg.model.hf_path
    )  # a LoRA report names its base
    assert report == "\n".join(dry_run(cfg).splitlines()[1:])


@pytest.mark.parametrize("name", RECIPES)
def test_environment_command_writes_a_server_list_atroposlib_accepts(name, tmp_path):
    server_config = pytest.importorskip("atroposlib.envs.server_handling.server_baseline").APIServerConfig
    yaml = pytest.importorskip("yaml")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    cfg = load_config(CONFIGS / name)
    (environment,) = cfg.launch.environments
    assert set(re.findall(r"\{(\w+)\}", environment.command)) <= PLACEHOLDERS
    urls = ["http://node1:30000", "http://node1:30001", "http://node2:30000"]
    values = {
        "api_url": "http://head:8000",
        "inference_url": urls[0],
        "inference_urls": ",".join(urls),
        "model_path": "/models/m",
        "run_dir": str(tmp_path),
        "seed": "1",
        "python": "echo",  # print the environment's command line instead of starting it
        "server_type": environment_server_type(cfg),
    }
    # As the launcher does: split like a shell, then fill each argument's placeholders.
    command = [arg.format_map(values) for arg in shlex.split(environment.command)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    argv = done.stdout.split()
    assert argv[1:3] == ["serve", "--config"]
    assert argv[argv.index("--slurm") + 1] == "false"
    assert argv[argv.index("--env.rollout_server_url") + 1] == "http://head:8000"
    assert argv[argv.index("--env.tokenizer_name") + 1] == "/models/m"
    completion = int(argv[argv.index("--env.max_token_length") + 1])
    assert completion < cfg.data.max_token_len  # room for the prompt
    assert cfg.data.batch_size % int(argv[argv.index("--env.group_size") + 1]) == 0
    servers = yaml.safe_load(Path(argv[3]).read_text())["openai"]
    parsed = [server_config(**server) for server in servers]
    assert [server.base_url for server in parsed] == [f"{url}/v1" for url in urls]
    assert {server.server_type for server in parsed} == {RECIPES[name].server_type}


# ------------------------------------------------------------------------------------------------
# Where the dry run's world size comes from
# ------------------------------------------------------------------------------------------------


def test_world_size_flag_and_launcher_variables_win_over_the_launch_section(monkeypatch):
    cfg = load_config(CONFIGS / "qwen3-32b_2+2nodes.yaml")
    assert "world 32 (--world-size) = TP 8 x PP 2 x CP 1 x DP 2" in dry_run(cfg, world_size=32)
    monkeypatch.setenv("WORLD_SIZE", "48")
    assert "world 48 (launcher environment WORLD_SIZE) = TP 8 x PP 2 x CP 1 x DP 3" in dry_run(cfg)


def test_a_config_without_a_launch_section_is_one_model_replica():
    cfg = load_config(CONFIGS / "debug_tiny.yaml", ["parallel.tensor_parallel_size=2"])
    report = dry_run(cfg)
    assert "world 2 (one model replica) = TP 2 x PP 1 x CP 1 x DP 1" in report
    assert not report.startswith("note:")


def test_a_launch_section_that_cannot_be_laid_out_is_a_value_error(capsys):
    overrides = ["launch.inference_nodes=0", "launch.inference.colocated_servers=4"]
    cfg = load_config(CONFIGS / "qwen3-32b_2+2nodes.yaml", overrides)
    with pytest.raises(ValueError, match="launch section: .*colocated_servers"):
        dry_run(cfg)
    config = str(CONFIGS / "qwen3-32b_2+2nodes.yaml")
    assert main(["train", "--config", config, *overrides, "--dry-run"]) == 2
    assert "error: launch section:" in capsys.readouterr().err


def test_a_world_size_the_layout_does_not_divide_names_its_source():
    cfg = load_config(CONFIGS / "llama3.1-70b_4+4nodes.yaml", ["launch.trainer_procs_per_node=6"])
    with pytest.raises(ValueError, match=r"world size 24 \(launch section.*\) is not divisible"):
        dry_run(cfg)
