"""The demo's Atropos environment (examples/envs/alphabet_match.py) against its real peers: the Atropos
API (``run-api``) and the reference SGLang-protocol server on the demo's tiny model.

The test plays the trainer by hand (``/register``, then ``/batch``, as the bridge does), starts the
environment's own ``serve`` command, and checks what reaches ``/batch``: whole groups with token ids,
label-style masks, the server's log-probs and scores that match the task's reward.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from atropos_megatron.demo import assets
from tests.reference_server import ReferenceServer, served_logprobs

pytest.importorskip("atroposlib")
atropos_api = pytest.importorskip("tests.atropos_api")

REPO = Path(__file__).resolve().parents[2]
ENV_SCRIPT = REPO / "examples/envs/alphabet_match.py"
GROUP_SIZE = 8
BATCH_SIZE = 2 * GROUP_SIZE
MAX_TOKEN_LEN = 64


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    return assets.build_assets(tmp_path_factory.mktemp("demo_assets"), seed=0)


def _register_trainer(api_url: str) -> None:
    registration = {
        "wandb_group": "test",
        "wandb_project": "test",
        "batch_size": BATCH_SIZE,
        "max_token_len": MAX_TOKEN_LEN,
        "checkpoint_dir": "",
        "save_checkpoint_interval": 0,
        "starting_step": 0,
        "num_steps": 10,
    }
    httpx.post(f"{api_url}/register", json=registration, timeout=10).raise_for_status()
    # Environments may register only after the trainer's first /batch (Atropos quirk).
    assert httpx.get(f"{api_url}/batch", timeout=10).json() == {"batch": None}


def _start_env(api_url: str, server_url: str, tokenizer_dir: Path, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ENV_SCRIPT),
        "serve",
        "--slurm", "false",
        "--env.rollout_server_url", api_url,
        "--env.tokenizer_name", str(tokenizer_dir),
        "--env.group_size", str(GROUP_SIZE),
        "--env.seed", "3",
        "--openai.base_url", f"{server_url}/v1",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def _wait_for_batch(api_url: str, env: subprocess.Popen, log_path: Path, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if env.poll() is not None:
            pytest.fail(f"the environment exited with {env.returncode}:\n{log_path.read_text()[-4000:]}")
        batch = httpx.get(f"{api_url}/batch", timeout=10).json()["batch"]
        if batch:
            return batch
        time.sleep(0.25)
    pytest.fail(f"no batch within {timeout_s} s; environment log:\n{log_path.read_text()[-4000:]}")


def test_env_sends_whole_scored_groups_with_tokens_masks_and_server_logprobs(demo_assets, tmp_path, report):
    tokenizer = assets.build_tokenizer()
    log_path = tmp_path / "env.log"
    with (
        atropos_api.AtroposAPI() as api,
        ReferenceServer(
            demo_assets.model_dir, tokenizer_path=demo_assets.tokenizer_dir, max_batch=64
        ) as server,
    ):
        _register_trainer(api.url)
        env = _start_env(api.url, server.url, demo_assets.tokenizer_dir, log_path)
        try:
            started = time.monotonic()
            batch = _wait_for_batch(api.url, env, log_path, timeout_s=60)
            report(f"first batch {time.monotonic() - started:.1f} s after the environment started")
            # The log-probs the server reports for the same tokens, read back while it still runs.
            first = batch[0]
            served = [served_logprobs(server.url, tokens)[0] for tokens in first["tokens"][:2]]
        finally:
            env.terminate()
            env.wait(timeout=20)

    assert sum(len(g["tokens"]) for g in batch) == BATCH_SIZE
    for group in batch:
        assert len(group["tokens"]) == GROUP_SIZE
        assert group["env_id"] == 0
        assert group["generation_params"] == {"temperature": 1.0}
        for tokens, masks, logprobs, score in zip(
            group["tokens"], group["masks"], group["inference_logprobs"], group["scores"], strict=True
        ):
            prompt_len = next(i for i, m in enumerate(masks) if m != -100)
            prompt = tokenizer.decode(tokens[:prompt_len], skip_special_tokens=True)
            completion = tokens[prompt_len:]
            assert tokens[0] == assets.BOS_ID and prompt_len == 1 + assets.PROMPT_SYMBOLS + 1
            assert assets.prompt_alphabet(prompt) and prompt.endswith(assets.PROMPT_END)
            assert 1 <= len(completion) <= assets.COMPLETION_TOKENS
            assert all(0 <= t < assets.VOCAB_SIZE for t in tokens)
            assert len(masks) == len(logprobs) == len(tokens)
            assert masks == [-100] * prompt_len + completion
            assert logprobs[:prompt_len] == [1.0] * prompt_len
            assert all(lp <= 0 for lp in logprobs[prompt_len:])
            text = tokenizer.decode(completion, skip_special_tokens=True)
            assert 0.0 <= score <= 1.0
            assert score == assets.score_completion(prompt, text)
    # Sampled at temperature 1, the reported log-probs are the model's own: the server recomputes them.
    max_diff = 0.0
    prompt_len = 1 + assets.PROMPT_SYMBOLS + 1
    for logprobs, recomputed in zip(first["inference_logprobs"], served, strict=False):
        for got, want in zip(logprobs[prompt_len:], recomputed[prompt_len - 1 :], strict=True):
            max_diff = max(max_diff, abs(got - want))
    report(f"inference_logprobs vs recomputed: max|diff|={max_diff:.2e}")
    assert max_diff < 1e-4
