"""Exactly-once training: a trainer killed outright (SIGKILL: no checkpoint on the way out) loses no
update, with the bridge alive or killed beside it.

The real Atropos API, the real bridge (`atropos-megatron bridge`) and the real trainer
(`atropos-megatron train`, one process) run as users run them. The trainer checkpoints every 3 steps
and is killed once steps 4 and 5 are acknowledged (the environment has posted exactly 5 batches, so
the trainer is then waiting for the sixth: no race with a later step). The next launch resumes at
step 3, is served the batches of steps 4 and 5 again with the same ids, then 6 and 7; its final
weights and optimizer state equal, bit for bit, those of an uninterrupted run on the same batches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.hf_models import save_tiny_checkpoint
from tests.rollouts import atropos_groups
from tests.subprocess_server import SubprocessServer, free_port

atropos_api = pytest.importorskip("tests.atropos_api")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BATCH_SIZE = 8  # atropos_groups(seed): two groups of four, one batch
STEPS, INTERVAL, KILLED_AFTER = 7, 3, 5
BIN = Path(sys.executable).parent
DEADLINE_S = 300  # for a whole phase on a saturated machine; every wait below ends on an event


class BridgeProcess(SubprocessServer):
    """`atropos-megatron bridge` on a fixed port; ``stop()`` is a SIGKILL, ``start()`` reuses the spool."""

    name = "bridge"

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        super().__init__(port, startup_timeout_s=DEADLINE_S)

    def command(self) -> list[str]:
        return [str(BIN / "atropos-megatron"), "bridge", "--config", str(self.config)]

    def ready(self) -> bool:
        return "bridge listening on" in self.output()

    def status(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        from atropos_megatron.bridge.client import BridgeClient

        with BridgeClient(f"127.0.0.1:{self.port}", timeout_s=30, reconnect_s=30) as client:
            return MessageToDict(client.status(), preserving_proto_field_name=True)


def _config(root: Path, api_url: str, hf_dir: Path, bridge_port: int) -> Path:
    path = root / "run.yaml"
    path.write_text(
        f"""
steps: {STEPS}
model: {{hf_path: {hf_dir}}}
data: {{batch_size: {BATCH_SIZE}, max_token_len: 64, micro_batch_tokens: 256, batch_wait_s: 1.0}}
optimizer: {{lr: 1.0e-3}}
checkpoint: {{save_interval_steps: {INTERVAL}, load: latest}}
bridge: {{address: "127.0.0.1:{bridge_port}", atropos_url: "{api_url}", spool_dir: "{root}/spool",
         poll_interval_s: 0.05, poll_max_interval_s: 0.2}}
logging: {{run_dir: "{root}/run"}}
"""
    )
    return path


def _post_batches(api_url: str, seeds: range) -> None:
    """What an environment does: scored groups, one batch's worth per seed. Each is posted once the
    API's queue is empty, so that every run gets its batches in the same order (with several batches
    queued, the API does not hand them out in the order they came)."""
    deadline = time.monotonic() + DEADLINE_S
    while httpx.get(f"{api_url}/info", timeout=30).json().get("batch_size") != BATCH_SIZE:
        assert time.monotonic() < deadline, "the bridge never registered the run with Atropos"
        time.sleep(0.05)
    for seed in seeds:
        while httpx.get(f"{api_url}/status", timeout=30).json().get("queue_size", 0):
            assert time.monotonic() < deadline, "the bridge stopped taking batches from Atropos"
            time.sleep(0.05)
        httpx.post(f"{api_url}/scored_data_list", json=atropos_groups(seed), timeout=30).raise_for_status()


def _train(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "atropos-megatron"), "train", "--config", str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_acks(bridge: BridgeProcess, trainer: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while int(bridge.status().get("batches_acked", 0)) < count:
        assert trainer.poll() is None, f"the trainer died:\n{trainer.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"{count} batches were not acknowledged in {DEADLINE_S} s"
        time.sleep(0.1)


def _finish(trainer: subprocess.Popen) -> str:
    output = trainer.communicate(timeout=DEADLINE_S)[0]
    assert trainer.returncode == 0, output[-4000:]
    return output


def _acked_ids(spool: Path) -> list[tuple[int, str]]:
    """(trained_step, batch_id) of every acknowledgement, in the order the bridge recorded them."""
    lines = (spool / "ledger.jsonl").read_text().splitlines()
    return [(r["trained_step"], r["batch_id"]) for r in map(json.loads, lines) if r["event"] == "acked"]


def _final_state(run_dir: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The last checkpoint's batch history and every tensor in it (model and optimizer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    history = json.loads((checkpoint / "atropos_megatron.json").read_text())["progress"]["batch_history"]
    dcp_to_torch_save(checkpoint, run_dir / "final.pt")
    state = torch.load(run_dir / "final.pt", weights_only=False)
    return history, {key: value for key, value in _flatten(state) if isinstance(value, torch.Tensor)}


def _flatten(state, prefix: str = ""):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), state


def _run(root: Path, hf_dir: Path, *, kill: str | None) -> dict:
    """One run of STEPS steps on batches seeded 1..STEPS; ``kill``: None, "trainer" or "trainer+bridge"."""
    root.mkdir()
    with atropos_api.AtroposAPI() as api:
        config = _config(root, api.url, hf_dir, free_port())
        bridge = BridgeProcess(config, int(_port(config)))
        with bridge:
            trainer = _train(config)
            if kill is None:
                _post_batches(api.url, range(1, STEPS + 1))
                outputs = [_finish(trainer)]
            else:
                _post_batches(api.url, range(1, KILLED_AFTER + 1))
                _wait_for_acks(bridge, trainer, KILLED_AFTER)
                trainer.send_signal(signal.SIGKILL)
                first_life = trainer.communicate(timeout=60)[0]
                if kill == "trainer+bridge":
                    bridge.restart()
                resumed = _train(config)
                _post_batches(api.url, range(KILLED_AFTER + 1, STEPS + 1))
                outputs = [first_life, _finish(resumed)]
            status = bridge.status()
    history, tensors = _final_state(root / "run")
    from atropos_megatron.trainer.metrics import read_metrics

    steps = [line["step"] for line in read_metrics(root / "run" / "metrics.jsonl")]
    return dict(
        outputs=outputs,
        acked=_acked_ids(root / "spool"),
        history=history,
        tensors=tensors,
        steps=steps,
        status=status,
    )


def _port(config: Path) -> str:
    from atropos_megatron.config import load_config

    return load_config(config).bridge.address.rpartition(":")[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    save_tiny_checkpoint("qwen2", path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(hf_dir, tmp_path_factory) -> dict:
    return _run(tmp_path_factory.mktemp("uninterrupted") / "run", hf_dir, kill=None)


@pytest.mark.parametrize("kill", ["trainer", "trainer+bridge"])
def test_a_sigkilled_trainer_loses_no_update(kill: str, hf_dir, uninterrupted, tmp_path: Path, report):
    run = _run(tmp_path / "run", hf_dir, kill=kill)
    first_life, resumed = run["outputs"]
    assert f"at step {INTERVAL}" in resumed and "resumed from" in resumed, resumed[-4000:]
    assert "serves 2 batches again first" in resumed, resumed[-4000:]

    # The bridge saw steps 1-5 acknowledged, then 4 and 5 again with the same ids, then 6 and 7.
    acked = run["acked"]
    first = dict(acked[:KILLED_AFTER])
    assert list(first) == [1, 2, 3, 4, 5], acked
    again = acked[KILLED_AFTER:]
    assert [step for step, _ in again] == [4, 5, 6, 7], acked
    assert [batch_id for _, batch_id in again[:2]] == [first[4], first[5]], "steps 4-5 were not served again"

    # The final model holds each batch once, in order; the metrics are one curve.
    history = run["history"]
    assert history == [first[s] for s in (1, 2, 3, 4, 5)] + [again[2][1], again[3][1]]
    assert len(set(history)) == STEPS
    assert run["steps"] == list(range(1, STEPS + 1)), "metrics.jsonl is not one curve"

    # Same batches, same weights and optimizer state as the uninterrupted run, bit for bit.
    reference = uninterrupted["tensors"]
    assert run["tensors"].keys() == reference.keys() and reference
    different = [key for key in reference if not torch.equal(run["tensors"][key], reference[key])]
    assert not different, f"differs from the uninterrupted run: {different[:5]}"
    initial_history = uninterrupted["history"]
    assert len(initial_history) == STEPS

    # Everything trained is committed by the final checkpoint and gone from the spool.
    status = run["status"]
    assert int(status.get("committed_step", 0)) == STEPS and int(status.get("retained", 0)) == 0, status
    report(
        f"kill {kill}: resumed at step {INTERVAL}, served {again[0][1]}, {again[1][1]} again; "
        f"{len(reference)} tensors bitwise equal to the uninterrupted run"
    )
