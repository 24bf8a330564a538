"""`atropos-megatron run` end to end on an environment written only against atroposlib's public API.

``examples/envs/lowercase_chat.py`` is what a third party writes: a chat prompt through the tokenizer's
chat template, real multi-line-capable text, its own scoring, ``tokenize_for_trainer``, and a single
``APIServerConfig`` from ``config_init`` (which atroposlib alone would send to localhost:9004). The
command builds the tiny byte-level model, starts every process and trains; the test reads what the
trainer logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.mark.slow
def test_run_trains_a_third_party_style_environment(tmp_path, report):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "atropos_megatron.cli", "run", "examples/envs/lowercase_chat.py",
        "--steps", str(STEPS), "--run-dir", str(run_dir), "--no-progress",
        "--", "--env.seed", "7",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = run_dir / "logs"
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n" + _tails(logs)
    assert "run finished: lowercase_chat.py" in out.stdout
    assert "not every process stopped cleanly" not in out.stdout, out.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert record["batch/sequences"] == 16 and record["batch/groups"] == 4  # the env's group_size 4
        assert record["reward/std"] > 0  # the env's own scores differ within the batch
        # Only the replies are trained: the chat-templated prompts are masked.
        assert 0 < record["batch/trained_tokens"] < record["batch/tokens"]
    env_log = (logs / "env.log").read_text()
    assert "lowercase_chat: 6 user messages" in env_log
    assert "Traceback" not in env_log
    report(
        f"{STEPS} steps on lowercase_chat, reward {records[0]['reward/mean']:.3f} -> "
        f"{records[-1]['reward/mean']:.3f}, {records[-1]['batch/tokens']} tokens/step"
    )


def _tails(logs: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        for path in sorted(logs.glob("*.log"))
    )
