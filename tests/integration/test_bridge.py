"""The bridge end to end: the real Atropos API (``run-api``), a real gRPC bridge on port 0, the trainer's
client, and test code posting scored groups the way environments do (``/scored_data_list``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from atropos_megatron.bridge.client import BridgeClient
from atropos_megatron.bridge.server import build_service, create_server
from atropos_megatron.config import BridgeConfig

atropos_api = pytest.importorskip("tests.atropos_api")
pytest.importorskip("atroposlib")

TOKEN = "s3cret"
BATCH_SIZE = 4  # two groups of two sequences per batch
VOCAB = 100


def _group(seed: int, **changes) -> dict:
    """A valid two-sequence group: prompt [seed, seed + 1], completion of 3 tokens, scored."""
    sequences = [[seed, seed + 1, 10 + i, 20 + i, 30 + i] for i in range(2)]
    group = {
        "tokens": sequences,
        "masks": [[-100, -100, *s[2:]] for s in sequences],
        "scores": [1.0, 0.0],
        "inference_logprobs": [[1.0, 1.0, -0.5, -0.25, -0.125] for _ in sequences],
        "env_id": seed,
    }
    group.update(changes)
    return group


def _post(api, groups: list[dict]) -> None:
    # json.dumps as environments send it: NaN/Infinity literals pass through, as Python writes them.
    body = json.dumps(groups)
    response = httpx.post(
        f"{api.url}/scored_data_list", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    response.raise_for_status()


class Bridge:
    """A bridge server + a client on it; restartable on the same spool."""

    def __init__(self, cfg: BridgeConfig) -> None:
        self.cfg = cfg
        self.port = 0  # the first start picks a free port; restarts reuse it
        self.start()

    def start(self, *, register: bool = True) -> None:
        self.service = build_service(self.cfg)
        self.server, self.port = create_server(self.cfg, self.service, f"127.0.0.1:{self.port}")
        self.address = f"127.0.0.1:{self.port}"
        self.client = BridgeClient(self.address, token=TOKEN, timeout_s=20)
        if not register:
            return
        self.client.register_run(
            run_name="test",
            batch_size=BATCH_SIZE,
            max_token_len=8,
            starting_step=3,
            num_steps=100,
            vocab_size=VOCAB,
        )

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.service.pipeline.stop()
        self.service.atropos.close()


@pytest.fixture()
def api():
    with atropos_api.AtroposAPI() as server:
        yield server


@pytest.fixture()
def bridge(api, tmp_path):
    cfg = BridgeConfig(
        atropos_url=api.url,
        spool_dir=str(tmp_path / "spool"),
        poll_interval_s=0.05,
        poll_max_interval_s=0.2,
        request_timeout_s=20,
        auth_token=TOKEN,
    )
    bridge = Bridge(cfg)
    yield bridge
    bridge.stop()


def test_batches_arrive_intact_in_order_and_bad_groups_are_counted(api, bridge):
    bad = {
        "token_out_of_vocab": _group(1, tokens=[[1, 2, 10, 20, 300], [1, 2, 11, 21, 31]]),
        # (A NaN score cannot be tested here: Atropos itself answers /batch with HTTP 500 when a batch
        # holds one, and the batch is lost inside the API; the codec's unit tests cover it.)
        "mask_mismatch": _group(2, masks=[[-100, -100, 10, 20, 31], [-100, -100, 11, 21, 31]]),
        "ragged_lengths": _group(3, masks=[[-100, -100, 10, 20, 30]]),
        "too_long": _group(
            4, tokens=[[4] * 9, [4] * 9], masks=[[-100] + [4] * 8] * 2, inference_logprobs=None
        ),
        "invalid_logprobs": _group(5, inference_logprobs=[[1.0] * 5, [1.0] * 5]),
    }
    steps = []
    for i, (reason, bad_group) in enumerate(bad.items()):
        good = _group(40 + i)
        _post(api, [good, bad_group])  # one Atropos batch: a good group and a bad one
        batch = bridge.client.next_batch(wait_s=15)
        assert batch is not None, f"no batch for round {reason}"
        # The good group survives intact, label-aligned; the bad one is gone.
        assert batch.num_groups == 1 and batch.num_sequences == 2
        assert batch.groups[0].env_id == 40 + i
        np.testing.assert_array_equal(batch.input_ids[:4], good["tokens"][0][:-1])
        np.testing.assert_array_equal(batch.labels[:4], good["tokens"][0][1:])
        np.testing.assert_array_equal(batch.loss_mask[:4], [False, True, True, True])
        np.testing.assert_allclose(batch.inference_logprobs[:4], [0.0, -0.5, -0.25, -0.125])
        np.testing.assert_array_equal(batch.scores, [1.0, 0.0])
        steps.append(batch.step)
        bridge.client.ack(batch.batch_id, trained_step=batch.step)
    assert steps == [3, 4, 5, 6, 7]  # counted from the registered starting step, in order
    status = bridge.client.status()
    assert dict(status.rejected_groups) == dict.fromkeys(bad, 1)
    assert (status.batches_served, status.batches_acked, status.unacked) == (5, 5, 0)
    assert status.registered and status.atropos_reachable


def test_token_is_required(bridge):
    with BridgeClient(bridge.address, timeout_s=5) as anonymous, pytest.raises(grpc.RpcError) as error:
        anonymous.status()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with (
        BridgeClient(bridge.address, token="wrong", timeout_s=5) as wrong,
        pytest.raises(grpc.RpcError) as error,
    ):
        wrong.status()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unacked_batches_survive_a_bridge_restart(api, bridge):
    _post(api, [_group(10), _group(11)])
    first = bridge.client.next_batch(wait_s=15)
    _post(api, [_group(12), _group(13)])
    assert bridge.client.status().batches_fetched >= 1
    bridge.stop()  # as if killed: nothing acknowledged
    bridge.start()
    again = bridge.client.next_batch(wait_s=15)
    assert again.batch_id == first.batch_id and again.step == first.step
    np.testing.assert_array_equal(again.input_ids, first.input_ids)
    second = bridge.client.next_batch(wait_s=15)
    assert [g.env_id for g in second.groups] == [12, 13] and second.step == first.step + 1
    for batch in (again, second):
        bridge.client.ack(batch.batch_id)
    assert bridge.client.status().unacked == 0
    with pytest.raises(grpc.RpcError) as error:
        bridge.client.ack("no-such-batch")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_live_trainer_rides_out_a_bridge_restart(api, bridge):
    trainer = BridgeClient(bridge.address, token=TOKEN, timeout_s=20, reconnect_s=300)
    trainer.register_run(run_name="test", batch_size=BATCH_SIZE, max_token_len=8, starting_step=3,
                         num_steps=100, vocab_size=VOCAB)  # fmt: skip
    _post(api, [_group(50), _group(51)])
    first = trainer.next_batch(wait_s=15)
    _post(api, [_group(52), _group(53)])
    bridge.stop()  # dies while the trainer trains `first`
    restart = threading.Thread(target=bridge.start, kwargs={"register": False})
    restart.start()  # comes back on the same port, not knowing the run; the ack waits for it
    try:
        trainer.ack(first.batch_id, trained_step=4)  # registers again by itself, then acknowledges
    finally:
        restart.join()
    second = trainer.next_batch(wait_s=15)
    assert [g.env_id for g in second.groups] == [52, 53], "the acknowledged batch was served again"
    trainer.ack(second.batch_id, trained_step=5)
    status = trainer.status()
    assert status.registered and status.retained == 2 and status.unacked == 0
    trainer.close()


def test_a_stopping_trainer_does_not_wait_for_a_dead_bridge(api, bridge):
    trainer = BridgeClient(bridge.address, token=TOKEN, timeout_s=20, reconnect_s=600)
    bridge.stop()
    failed = []
    waiting = threading.Thread(target=lambda: failed.append(_raises(trainer.status)))
    waiting.start()
    trainer.stop_waiting()  # what the trainer's SIGTERM handler does
    waiting.join(timeout=300)
    assert not waiting.is_alive() and failed == [grpc.StatusCode.UNAVAILABLE]
    trainer.close()
    bridge.start(register=False)  # for the fixture's teardown


def _raises(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def test_atropos_restart_mid_run(api, bridge):
    _post(api, [_group(20), _group(21)])
    batch = bridge.client.next_batch(wait_s=15)
    bridge.client.ack(batch.batch_id)
    api.restart()  # all Atropos state lost; the bridge must re-register by itself
    _wait_for_registration(api)  # (groups posted before that are dropped: see test_atropos_client)
    _post(api, [_group(22), _group(23)])  # queued after the restart
    batch = bridge.client.next_batch(wait_s=30)
    assert batch is not None and [g.env_id for g in batch.groups] == [22, 23]
    assert httpx.get(f"{api.url}/info", timeout=10).json()["batch_size"] == BATCH_SIZE


def _wait_for_registration(api, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{api.url}/info", timeout=10).json()["batch_size"] != BATCH_SIZE:
        assert time.monotonic() < deadline, "the bridge did not re-register"
        time.sleep(0.05)


def test_status_and_peek_commands(api, bridge, tmp_path):
    _post(api, [_group(30), _group(31)])
    cli = [sys.executable, "-m", "atropos_megatron.cli"]
    common = ["--address", bridge.address, "--token", TOKEN, "--timeout", "15"]
    peeked = subprocess.run([*cli, "bridge-peek", *common, "--out", str(tmp_path / "b.json")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert peeked.returncode == 0, peeked.stderr
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["labels"][:4] == [31, 10, 20, 30] and written["groups"][0]["env_id"] == 30
    # Peeking leaves the batch for the trainer.
    batch = bridge.client.next_batch(wait_s=15)
    assert batch.batch_id == written["batch_id"]
    status = subprocess.run([*cli, "bridge-status", *common], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["registered"] is True and int(report["unacked"]) == 1
