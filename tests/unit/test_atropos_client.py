"""AtroposClient against the real Atropos API server (``run-api``): registration, polling, gzip,
outages, restarts and resets. One server is shared by the module; each test resets its data first."""

from __future__ import annotations

import gzip
import json
import logging
import random
import threading
import time
import uuid

import httpx
import pytest

pytest.importorskip("atroposlib", reason="needs atroposlib (pip install -e '.[atropos]')")

from atropos_megatron.bridge.atropos_client import (  # noqa: E402
    AtroposClient,
    AtroposUnavailable,
    Registration,
    backoff_delay,
)
from tests.atropos_api import AtroposAPI, free_port  # noqa: E402

LOGGER = "atropos_megatron.bridge.atropos_client"
FAST = {"timeout_s": 5.0, "poll_interval_s": 0.05, "poll_max_interval_s": 0.2}


def registration(batch_size: int = 4, starting_step: int = 0) -> Registration:
    return Registration(
        wandb_group="g",
        wandb_project="p",
        batch_size=batch_size,
        max_token_len=64,
        checkpoint_dir="/tmp/atropos-ckpt",
        save_checkpoint_interval=10,
        starting_step=starting_step,
        num_steps=100,
    )


def group(seed: int, length: int = 6) -> dict:
    """A group of 2 sequences: 2 prompt tokens (mask -100), then completion tokens (mask = token id)."""
    tokens = [[seed * 100 + s * 10 + i for i in range(length)] for s in range(2)]
    masks = [[-100, -100, *seq[2:]] for seq in tokens]
    return {"tokens": tokens, "masks": masks, "scores": [1.0, -1.0]}


def warnings_matching(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.fixture(scope="module")
def api():
    with AtroposAPI() as server:
        yield server


@pytest.fixture
def fresh_api(api: AtroposAPI) -> AtroposAPI:
    if not api.running:
        api.start()
    assert httpx.get(api.url + "/reset_data", timeout=5).text == "Reset successful"
    return api


@pytest.fixture
def client(fresh_api: AtroposAPI):
    with AtroposClient(fresh_api.url, **FAST) as c:
        yield c


# --------------------------------------------------------------------------------------------- backoff


def test_backoff_delay_grows_is_capped_and_jitter_stays_in_bounds():
    rng = random.Random(1234)
    means = []
    for attempt in range(8):
        ceiling = min(5.0, 0.5 * 2**attempt)
        samples = [backoff_delay(attempt, 0.5, 5.0, rng) for _ in range(300)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), attempt
        assert max(samples) - min(samples) > 0.4 * ceiling  # jitter really spreads over [d/2, d]
        means.append(sum(samples) / len(samples))
    assert means[0] < means[1] < means[2] < means[3] < means[4]  # 0.5, 1, 2, 4, then capped at 5
    assert all(abs(m - 3.75) < 0.25 for m in means[4:])
    assert 2.5 <= backoff_delay(100_000, 0.5, 5.0, rng) <= 5.0  # no overflow for huge attempts
    assert backoff_delay(3, 0.5, 5.0, random.Random(7)) == backoff_delay(3, 0.5, 5.0, random.Random(7))
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.5, 5.0, rng)


# ------------------------------------------------------------------------------------ basic protocol


def test_register_returns_exact_uuid_and_sets_batch_size(client: AtroposClient):
    text = client.register(registration(batch_size=4, starting_step=3))
    assert text.isdigit()
    parsed = uuid.UUID(int=int(text))
    # A float on the way would zero every bit below ~2**75, including uuid4's variant bits.
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert client.info()["batch_size"] == 4
    assert client.status() == {"current_step": 3, "queue_size": 0}
    assert client.resume_step == 3 and client.registration == registration(4, 3)
    assert client.reachable


def test_fetch_batch_before_register_is_a_programming_error(client: AtroposClient):
    with pytest.raises(RuntimeError, match="before register"):
        client.fetch_batch(wait_s=0.1)


def test_end_to_end_batch_arrives_only_when_complete(client: AtroposClient):
    client.register(registration(batch_size=4))
    start = time.monotonic()
    assert client.fetch_batch(wait_s=0.3) is None  # nothing queued yet
    assert 0.3 <= time.monotonic() - start < 1.0

    first, second = group(1), group(2)
    assert client.post_json("/scored_data_list", [first]) == {"status": "received", "groups_processed": 1}
    assert client.fetch_batch(wait_s=0.2) is None  # 2 of 4 sequences: not a batch yet
    client.post_json("/scored_data_list", [second])

    batch = client.fetch_batch(wait_s=5.0)
    assert batch is not None and len(batch) == 2
    got = sorted(batch, key=lambda g: g["tokens"][0][0])
    for sent, received in zip((first, second), got, strict=True):
        assert {k: received[k] for k in sent} == sent
    assert client.status() == {"current_step": 1, "queue_size": 0}


def test_large_body_is_gzipped_and_arrives_intact(client: AtroposClient):
    sent: list[httpx.Request] = []
    client._http.event_hooks = {"request": [sent.append]}  # observe what goes on the wire
    client.register(registration(batch_size=4))
    big = [group(1, length=400), group(2, length=400)]
    raw = json.dumps(big, separators=(",", ":")).encode()
    assert len(raw) > client.gzip_min_bytes

    assert client.post_json("/scored_data_list", big)["groups_processed"] == 2
    request = sent[-1]
    assert request.headers["content-encoding"] == "gzip"
    assert len(request.content) < len(raw) and json.loads(gzip.decompress(request.content)) == big
    assert "content-encoding" not in sent[0].headers  # the small /register body went uncompressed

    batch = client.fetch_batch(wait_s=5.0)
    assert batch is not None
    assert sorted(g["tokens"] for g in batch) == sorted(g["tokens"] for g in big)


# ------------------------------------------------------------------------------------------- outages


def test_register_waits_for_an_api_that_comes_up_late(fresh_api: AtroposAPI, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fresh_api.stop()
    starter = threading.Timer(1.0, fresh_api.start)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    with AtroposClient(fresh_api.url, sleep=sleep, **FAST) as client:
        start = time.monotonic()
        starter.start()
        try:
            text = client.register(registration(batch_size=4), deadline_s=20.0)
        finally:
            starter.join()
        assert time.monotonic() - start >= 0.9
        assert text.isdigit() and client.reachable
        assert client.info()["batch_size"] == 4
    assert len(sleeps) >= 4 and max(sleeps) <= FAST["poll_max_interval_s"]
    assert len(warnings_matching(caplog, "unavailable")) == 1  # once per outage, not per retry
    assert len(warnings_matching(caplog, "answering again")) == 1


def test_register_without_api_raises_after_the_deadline():
    url = f"http://127.0.0.1:{free_port()}"
    with AtroposClient(url, **FAST) as client:
        start = time.monotonic()
        with pytest.raises(AtroposUnavailable, match=url):
            client.register(registration(), deadline_s=0.5)
        assert 0.5 <= time.monotonic() - start < 2.0
        assert not client.reachable and client.registration is None


def test_api_restart_mid_run_reregisters_with_resume_step(fresh_api: AtroposAPI, client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    client.register(registration(batch_size=4))
    client.post_json("/scored_data_list", [group(1), group(2)])
    assert client.fetch_batch(wait_s=5.0) is not None
    assert client.status()["current_step"] == 1

    fresh_api.stop()  # crash: queue, step counter and registration are gone
    client.resume_step = 7
    starter = threading.Timer(0.5, fresh_api.start)
    starter.start()
    try:
        # Down, then up with no data: never raises. However long the restart takes on a busy
        # machine, polling goes on until the client has registered again.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert client.fetch_batch(wait_s=1.0) is None
            if warnings_matching(caplog, "re-registering") and client.status()["current_step"] == 7:
                break
    finally:
        starter.join()
    assert client.status() == {"current_step": 7, "queue_size": 0}
    assert client.info()["batch_size"] == 4
    assert len(warnings_matching(caplog, "unavailable")) == 1
    assert warnings_matching(caplog, "re-registering with starting_step=7")
    # The next poll (the bridge polls without pause) marks the trainer started again, so
    # environments can register again.
    assert client.fetch_batch(wait_s=1.0) is None
    env = {"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 2}
    assert client.post_json("/register-env", env)["status"] == "success"

    client.post_json("/scored_data_list", [group(3), group(4)])
    batch = client.fetch_batch(wait_s=5.0)
    assert batch is not None
    assert sorted(g["tokens"][0][0] for g in batch) == [300, 400]
    assert client.status()["current_step"] == 8


def test_reset_data_then_fetch_reregisters_after_http_500(fresh_api: AtroposAPI, client, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    client.register(registration(batch_size=4, starting_step=3))
    client.resume_step = 5
    httpx.get(fresh_api.url + "/reset_data", timeout=5).raise_for_status()
    assert httpx.get(fresh_api.url + "/batch", timeout=5).status_code == 500  # the state Atropos leaves
    assert client.info()["batch_size"] == -1

    assert client.fetch_batch(wait_s=0.5) is None
    assert client.info()["batch_size"] == 4
    assert client.status()["current_step"] == 5
    assert warnings_matching(caplog, "HTTP 500")
    client.post_json("/scored_data_list", [group(5), group(6)])
    assert client.fetch_batch(wait_s=5.0) is not None


def test_groups_posted_before_reregistration_cannot_block_it(fresh_api: AtroposAPI, client, caplog):
    client.register(registration(batch_size=4))
    assert client.fetch_batch(wait_s=0.2) is None
    fresh_api.restart()
    client.post_json("/scored_data_list", [group(1), group(2)])  # an env, faster than the trainer
    assert client.fetch_batch(wait_s=2.0) is None  # Atropos drops those groups in the reset
    assert client.info()["batch_size"] == 4
    assert warnings_matching(caplog, "stays unregistered")
    client.post_json("/scored_data_list", [group(3), group(4)])
    batch = client.fetch_batch(wait_s=5.0)
    assert batch is not None and sorted(g["tokens"][0][0] for g in batch) == [300, 400]


def test_stop_event_ends_fetch_batch_promptly(fresh_api: AtroposAPI):
    slow = {**FAST, "poll_interval_s": 30.0, "poll_max_interval_s": 30.0}  # only `stop` can end the wait
    with AtroposClient(fresh_api.url, **slow) as client:
        client.register(registration())
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        assert client.fetch_batch(stop=stop) is None
        assert 0.25 <= time.monotonic() - start < 1.5
        assert client.fetch_batch(stop=stop) is None  # already set: returns at once
