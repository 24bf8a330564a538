"""The pieces of `atropos-megatron run` that need no processes: the environment's command line, the
argument split, and the launcher's two fixes for atroposlib 0.4.0 (checked against atroposlib itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from atropos_megatron.config import load_config
from atropos_megatron.demo.local import RunSpec, _group_size_flag, environment_command, merge_flags
from atropos_megatron.demo.run_env import split_env_flags

REPO = Path(__file__).resolve().parents[2]


def test_merge_flags_lets_the_users_flag_replace_the_runs_own_in_either_spelling():
    ours = ["--env.use_wandb", "false", "--openai.base_url", "http://a/v1", "--slurm", "false"]
    assert merge_flags(ours, ["--env.use_wandb", "true"]) == [
        "--openai.base_url", "http://a/v1", "--slurm", "false", "--env.use_wandb", "true",
    ]  # fmt: skip
    assert merge_flags(ours, ["--openai.base_url=http://b/v1"]) == [
        "--env.use_wandb", "false", "--slurm", "false", "--openai.base_url=http://b/v1",
    ]  # fmt: skip
    assert merge_flags(ours, []) == ours


def test_split_env_flags_cuts_at_the_first_double_dash():
    assert split_env_flags(["env.py", "--steps", "3", "lr=1", "--", "--env.group_size", "4", "--", "x"]) == (
        ["env.py", "--steps", "3", "lr=1"],
        ["--env.group_size", "4", "--", "x"],
    )
    assert split_env_flags(["env.py"]) == (["env.py"], [])


def test_group_size_flag_reads_the_last_one_given():
    assert _group_size_flag(["--env.group_size", "8", "--env.group_size=4"]) == 4
    assert _group_size_flag(["--env.seed", "1"]) is None


def test_environment_command_connects_the_script_and_passes_the_users_flags_last(tmp_path):
    spec = RunSpec(
        env_script=tmp_path / "my_env.py",
        config_path=tmp_path / "c.yaml",
        env_flags=["--env.group_size", "4", "--openai.health_check", "true"],
    )
    urls = {
        "api": "http://127.0.0.1:1",
        "inference": "http://127.0.0.1:2",
        "lora_proxy": "http://127.0.0.1:3",
    }
    cfg = load_config(None, ["steps=5"])
    command = environment_command(spec, cfg, urls, urls["api"], tmp_path / "model", tmp_path / "tok")
    assert command[:5] == [
        sys.executable,
        "-m",
        "atropos_megatron.demo.env_launcher",
        str(spec.env_script),
        "serve",
    ]
    flags = command[5:]
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert pairs["--env.rollout_server_url"] == "http://127.0.0.1:1"
    assert pairs["--openai.base_url"] == "http://127.0.0.1:2/v1"
    assert pairs["--openai.server_type"] == "sglang"
    assert pairs["--env.tokenizer_name"] == pairs["--openai.tokenizer_name"] == str(tmp_path / "tok")
    assert pairs["--env.use_wandb"] == "false"
    assert pairs["--env.total_steps"] == "110"
    assert flags[-4:] == ["--env.group_size", "4", "--openai.health_check", "true"]
    assert flags.count("--openai.health_check") == 1
    # LoRA adapters synced as SGLang adapters: the environment generates through the bridge's proxy.
    adapter = load_config(None, ["steps=5", "model.lora.rank=4", "weights.lora_sync=adapter"])
    command = environment_command(spec, adapter, urls, urls["api"], tmp_path / "model", tmp_path / "tok")
    assert command[command.index("--openai.base_url") + 1] == "http://127.0.0.1:3/v1"


def test_routed_experts_capture_puts_the_environment_behind_the_proxy_and_asks_the_server(tmp_path):
    from atropos_megatron.demo.local import _build_roles, _resolve_config

    spec = RunSpec(env_script=tmp_path / "env.py", config_path=None)
    urls = {
        "api": "http://127.0.0.1:1",
        "inference": "http://127.0.0.1:2",
        "lora_proxy": "http://127.0.0.1:3",
    }
    for capture in (True, False):
        overrides = ["weights.capture_routed_experts=true"] if capture else []
        cfg = _resolve_config(spec, tmp_path / "run", urls, "127.0.0.1:4", 5, overrides)
        assert cfg.weights.lora_proxy_ports == ([3] if capture else [])  # the required proxy, only then
        command = environment_command(spec, cfg, urls, urls["api"], tmp_path / "m", tmp_path / "t")
        assert (
            command[command.index("--openai.base_url") + 1]
            == f"{urls['lora_proxy' if capture else 'inference']}/v1"
        )
        roles = _build_roles(cfg, tmp_path / "c.yaml", tmp_path / "m", tmp_path / "t", urls, 4, None, command)
        serve = next(role for role in roles if role.name == "inference").command
        assert ("--enable-return-routed-experts" in serve) == capture


def test_engine_vllm_sets_what_vllm_takes_and_starts_the_server_and_environment_in_vllm_mode(tmp_path):
    """``--engine vllm``: the demo's config passes ``WeightsConfig._check_vllm``, the server speaks vLLM's
    protocol with a gloo weight-transfer engine, the environment uses atroposlib's ``VLLMServer``."""
    from atropos_megatron.demo.local import (
        RunError,
        _build_roles,
        _resolve_config,
        engine_description,
        engine_overrides,
    )

    assert engine_overrides("sglang") == []
    with pytest.raises(RunError, match="--engine must be one of sglang, vllm"):
        engine_overrides("trt")
    spec = RunSpec(env_script=tmp_path / "env.py", config_path=REPO / "examples/configs/demo_cpu.yaml")
    urls = {
        "api": "http://127.0.0.1:1",
        "inference": "http://127.0.0.1:2",
        "lora_proxy": "http://127.0.0.1:3",
    }
    for engine in ("sglang", "vllm"):
        cfg = _resolve_config(spec, tmp_path / "run", urls, "127.0.0.1:4", 5, engine_overrides(engine))
        weights = cfg.weights
        assert weights.inference_engine == engine and engine_description(cfg).startswith(engine)
        if engine == "vllm":
            assert (weights.transport, weights.distributed_backend, weights.pause_mode) == (
                "distributed", "gloo", "in_place",
            )  # fmt: skip
        else:  # the demo config's own
            assert (weights.transport, weights.pause_mode) == ("grpc", "retract")
        command = environment_command(spec, cfg, urls, urls["api"], tmp_path / "m", tmp_path / "t")
        assert command[command.index("--openai.server_type") + 1] == engine
        # vLLM: through the bridge's proxy, which answers atroposlib's /generate on vLLM's token route
        generates_at = urls["lora_proxy"] if engine == "vllm" else urls["inference"]
        assert command[command.index("--openai.base_url") + 1] == f"{generates_at}/v1"
        assert weights.lora_proxy_ports == ([3] if engine == "vllm" else [])
        roles = _build_roles(cfg, tmp_path / "c.yaml", tmp_path / "m", tmp_path / "t", urls, 4, None, command)
        serve = next(role for role in roles if role.name == "inference").command
        if engine == "vllm":
            assert serve[serve.index("--protocol") + 1] == "vllm"
            assert serve[serve.index("--weight-transfer-config") + 1] == '{"backend": "gloo"}'
            assert "--enable-scale-out" in serve
            assert serve[serve.index("--logprobs-mode") + 1] == "processed_logprobs"
        else:
            assert "--protocol" not in serve and "--weight-transfer-config" not in serve
    # The user's overrides come after the engine's: a pause mode vLLM has is taken, retract is refused.
    abort = _resolve_config(
        spec,
        tmp_path / "run",
        urls,
        "127.0.0.1:4",
        5,
        [*engine_overrides("vllm"), "weights.pause_mode=abort"],
    )
    assert abort.weights.pause_mode == "abort"
    with pytest.raises(RunError, match="weights.pause_mode"):
        _resolve_config(
            spec,
            tmp_path / "run",
            urls,
            "127.0.0.1:4",
            5,
            [*engine_overrides("vllm"), "weights.pause_mode=retract"],
        )


def test_demo_and_run_take_the_engine_option():
    from atropos_megatron.demo.run import build_parser as demo_parser
    from atropos_megatron.demo.run_env import build_parser as run_parser

    assert demo_parser().parse_args([]).engine == "sglang"
    assert demo_parser().parse_args(["--engine", "vllm", "optimizer.lr=1e-3"]).engine == "vllm"
    assert run_parser().parse_intermixed_args(["env.py", "--engine", "vllm"]).engine == "vllm"
    with pytest.raises(SystemExit):
        demo_parser().parse_args(["--engine", "trt"])


# ------------------------------------------------------------------------------------------------
# The environment launcher's fixes, against atroposlib 0.4.0 itself
# ------------------------------------------------------------------------------------------------


def test_a_single_server_config_with_a_url_reaches_that_url():
    """Unpatched, atroposlib ignores base_url of a single APIServerConfig (localhost:9004-9007)."""
    code = r"""
from atroposlib.envs.server_handling.server_baseline import APIServerConfig
from atroposlib.envs.server_handling.server_manager import ServerManager
config = APIServerConfig(server_type="openai", base_url="http://127.0.0.1:5/v1", model_name="m", api_key="x", health_check=False)
before = [s.config.base_url for s in ServerManager(config).servers]
from atropos_megatron.demo.env_launcher import use_configured_server_urls
use_configured_server_urls(); use_configured_server_urls()  # idempotent
after = [s.config.base_url for s in ServerManager(config).servers]
print(before[0], len(before), after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first_before, count_before, after = out.stdout.split(maxsplit=2)
    assert "localhost:9004" in first_before and count_before == "4"
    assert after.strip() == "['http://127.0.0.1:5/v1']"


def test_tokenize_for_trainer_gets_token_lists_under_transformers_5(tmp_path):
    from atropos_megatron.demo.assets import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": "hello"},
    ]
    code = r"""
import json, sys
from transformers import AutoTokenizer
from atropos_megatron.demo.env_launcher import tokenize_for_trainer_with_token_lists
tokenize_for_trainer_with_token_lists()
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
out = tokenize_for_trainer(AutoTokenizer.from_pretrained(sys.argv[1]), json.loads(sys.argv[2]))
print(json.dumps({"tokens": list(out["tokens"]), "masks": [int(m) for m in out["masks"]]}))
"""
    tokenizer.save_pretrained(tmp_path / "tok")
    import json

    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tok"), json.dumps(chat)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert result["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    unmasked = [t for t, m in zip(result["tokens"], result["masks"], strict=True) if m != -100]
    assert tokenizer.decode(unmasked, skip_special_tokens=True) == "hello"


def test_the_launcher_runs_a_script_as_main_with_its_directory_importable(tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 41\n")
    script = tmp_path / "env.py"
    script.write_text(
        "import sys, helper_mod\nif __name__ == '__main__':\n    print(helper_mod.VALUE + 1, sys.argv[1:])\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "atropos_megatron.demo.env_launcher", str(script), "serve", "--x", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42 ['serve', '--x', '1']"


@pytest.mark.parametrize(
    ("argv", "says"), [([], "env_launcher path/to/my_env.py"), (["/no/such/env.py"], "not found")]
)
def test_the_launcher_refuses_a_missing_script(argv, says):
    out = subprocess.run(
        [sys.executable, "-m", "atropos_megatron.demo.env_launcher", *argv], capture_output=True, text=True
    )
    assert out.returncode == 2 if not argv else out.returncode != 0
    assert says in out.stdout + out.stderr


def test_run_takes_options_and_overrides_in_any_order():
    from atropos_megatron.demo.run_env import build_parser

    own, env = split_env_flags(
        ["my_env.py", "--steps", "5", "data.batch_size=8", "--no-progress", "lr=1", "--", "-x"]
    )
    args = build_parser().parse_intermixed_args(own)
    assert (args.env_script, args.steps, args.no_progress) == ("my_env.py", 5, True)
    assert args.overrides == ["data.batch_size=8", "lr=1"] and env == ["-x"]
