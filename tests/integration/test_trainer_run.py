"""`atropos-megatron train` as users launch it: torchrun, two ranks (TP=2), the real Atropos API, the real
bridge (`atropos-megatron bridge`), scored groups posted the way environments post them.

SIGTERM (what Slurm sends before a preemption) mid-run must leave a complete checkpoint that the next
launch resumes: it re-registers at the right step, trains the remaining steps, and the metrics file
continues as one curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.hf_models import save_tiny_checkpoint
from tests.rollouts import atropos_groups
from tests.subprocess_server import free_port

atropos_api = pytest.importorskip("tests.atropos_api")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BATCH_SIZE = 8  # two groups of four per step
BIN = Path(sys.executable).parent


def _config(tmp_path: Path, api_url: str, hf_dir: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"""
steps: 40
model: {{hf_path: {hf_dir}}}
parallel: {{tensor_parallel_size: 2}}
data: {{batch_size: {BATCH_SIZE}, max_token_len: 64, micro_batch_tokens: 256, batch_wait_s: 1.0}}
optimizer: {{lr: 1.0e-3}}
bridge: {{address: "127.0.0.1:{free_port()}", atropos_url: "{api_url}", spool_dir: "{tmp_path}/spool",
         poll_interval_s: 0.05, poll_max_interval_s: 0.2}}
logging: {{run_dir: "{tmp_path}/run"}}
"""
    )
    return path


class _Poster(threading.Thread):
    """Posts a batch worth of groups whenever the API's queue runs low, as environments would."""

    def __init__(self, api_url: str) -> None:
        super().__init__(daemon=True)
        self.api_url, self.stopped, self.seed = api_url, threading.Event(), 0

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                info = httpx.get(f"{self.api_url}/info", timeout=5).json()
                queued = httpx.get(f"{self.api_url}/status", timeout=5).json().get("queue_size", 0)
                if info.get("batch_size") == BATCH_SIZE and queued < 4:
                    self.seed += 1
                    httpx.post(f"{self.api_url}/scored_data_list", json=atropos_groups(self.seed), timeout=5)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)


def _train(config: Path, *overrides: str) -> subprocess.Popen:
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "atropos_megatron.cli", "train", "--config", str(config), *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _steps(run_dir: Path) -> list[int]:
    from atropos_megatron.trainer.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return [line["step"] for line in read_metrics(path)] if path.exists() else []


def test_sigterm_leaves_a_checkpoint_that_the_next_launch_resumes(tmp_path: Path, report):
    hf_dir = tmp_path / "hf"
    save_tiny_checkpoint("qwen2", hf_dir)
    run_dir = tmp_path / "run"
    with atropos_api.AtroposAPI() as api:
        config = _config(tmp_path, api.url, hf_dir)
        bridge = subprocess.Popen([str(BIN / "atropos-megatron"), "bridge", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        poster = _Poster(api.url)
        poster.start()
        try:
            trainer = _train(config)
            deadline = time.monotonic() + 180
            while len(_steps(run_dir)) < 3:
                assert trainer.poll() is None, f"the trainer died:\n{trainer.communicate()[0][-4000:]}"
                assert time.monotonic() < deadline, "no third step within 180 s"
                time.sleep(0.2)
            trainer.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
            output = trainer.communicate(timeout=120)[0]
            stopped_at = _steps(run_dir)[-1]
            latest = (run_dir / "checkpoints" / "latest").read_text().strip()
            report(f"SIGTERM after step {stopped_at}: checkpoint {latest}")
            assert latest == f"step_{stopped_at:08d}", output[-4000:]
            assert "checkpoint written" in output, output[-4000:]
            sidecar = json.loads((run_dir / "checkpoints" / latest / "atropos_megatron.json").read_text())
            assert sidecar["progress"]["step"] == stopped_at

            resumed = _train(config, "checkpoint.load=latest", f"steps={stopped_at + 2}")
            output = resumed.communicate(timeout=180)[0]
            assert resumed.returncode == 0, output[-4000:]
            assert f"resumed from {run_dir / 'checkpoints' / latest} at step {stopped_at}" in output
            assert _steps(run_dir) == list(range(1, stopped_at + 3)), "the metrics file is not one curve"
            status = json.loads(
                subprocess.run(
                    [str(BIN / "atropos-megatron"), "bridge-status", "--address", _address(config)],
                    capture_output=True, text=True, timeout=60, check=True,
                ).stdout
            )  # fmt: skip
            report(
                f"resumed: steps {stopped_at + 1}-{stopped_at + 2} trained; bridge acked {status['batchesAcked']}"
            )
            # Every batch trained was acknowledged, once; the only unacknowledged ones are still queued.
            assert int(status["batchesAcked"]) == stopped_at + 2, status
            assert int(status["unacked"]) == int(status.get("queueDepth", 0)), status
        finally:
            poster.stopped.set()
            bridge.terminate()
            bridge.wait(timeout=30)


def _address(config: Path) -> str:
    from atropos_megatron.config import load_config

    return load_config(config).bridge.address
