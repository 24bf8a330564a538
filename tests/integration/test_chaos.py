"""The chaos benchmark as a regression test: the demo's processes keep training while the killer
restarts the inference server (a restarted server comes back with its initial weights; the bridge
pauses it, and the trainer, with no batch coming, pushes its weights again: with one server nothing
else would unpause it), with no batch lost or trained twice.

The 8-minute run over every role is `make chaos` (benchmarks/RESULTS.md); the reward is its business,
not this test's (a minute on a busy machine is too few steps to judge it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atroposlib")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_training_goes_on_while_the_inference_server_is_killed_and_restarted(tmp_path, report):
    out = tmp_path / "chaos.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--minutes", "1", "--roles", "inference",
        "--seed", "0", "--min-interval-s", "15", "--max-interval-s", "25", "--min-reward-gain", "-1",
        "--run-dir", str(tmp_path / "run"), "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    chaos = json.loads(out.read_text())
    report(
        f"{chaos['kills']} inference kills, recovered in {chaos['recover_s']['inference']['max']} s at most, "
        f"next step after {chaos['next_step_s']['inference']['max']} s at most; {chaos['steps_trained']} steps"
    )
    assert chaos["kills_by_role"]["inference"] >= 1 and not chaos["unrecovered_roles"]
    assert chaos["batches_lost"] == 0 and chaos["batches_duplicated"] == 0 and not chaos["problems"]
