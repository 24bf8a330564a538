"""The spool and the batch pipeline, driven directly (no gRPC, no Atropos): durability, order, prefetch."""

from __future__ import annotations

import threading
import time

import pytest

from atropos_megatron.bridge.pipeline import BatchPipeline, Limits
from atropos_megatron.bridge.spool import BatchSpool, SpoolError
from atropos_megatron.bridge.v1 import bridge_pb2

LIMITS = Limits(vocab_size=100, max_token_len=16)


def _group(first: int) -> dict:
    return {
        "tokens": [[first, 1, 2], [first, 3, 4]],
        "masks": [[-100, 1, 2], [-100, 3, 4]],
        "scores": [1.0, 0.0],
    }


class Source:
    """Hands out prepared Atropos batches, one per call, and counts the calls."""

    def __init__(self, batches: list[list[dict]]) -> None:
        self.batches = list(batches)
        self.calls = 0

    def __call__(self, wait_s: float, stop: threading.Event):
        self.calls += 1
        if self.batches:
            return self.batches.pop(0)
        stop.wait(wait_s)
        return None


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_spool_keeps_batches_until_acked_across_reopen(tmp_path):
    spool = BatchSpool(tmp_path)
    spool.set_next_step(5)
    for step, batch_id in ((5, "a"), (6, "b")):
        spool.put(bridge_pb2.TrainingBatch(batch_id=batch_id, step=step))
    assert spool.ack("a") and spool.ack("a")  # a repeated ack is harmless
    assert not spool.ack("never-seen")
    reopened = BatchSpool(tmp_path)
    assert [(b.batch_id, b.step) for b in reopened.pending()] == [("b", 6)]
    assert reopened.next_step == 7 and reopened.ack("a")
    reopened.set_next_step(2)  # a trainer resuming further back does not reuse spooled steps
    assert reopened.next_step == 7


def test_spool_ignores_unfinished_writes_and_reports_corrupt_files(tmp_path):
    spool = BatchSpool(tmp_path)
    spool.put(bridge_pb2.TrainingBatch(batch_id="ok", step=0))
    (tmp_path / "000000000001-half.batch.tmp").write_bytes(b"partial")
    (tmp_path / "000000000002-bad.batch").write_bytes(b"\xff\xff not a proto")
    reopened = BatchSpool(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SpoolError, match="000000000002-bad.batch"):
        reopened.pending()


def test_prefetch_is_bounded_and_batches_come_in_order(tmp_path):
    source = Source([[_group(i)] for i in range(10, 16)])
    pipeline = BatchPipeline(BatchSpool(tmp_path), source, prefetch=2, poll_s=0.05)
    pipeline.start(LIMITS)
    try:
        _wait_for(lambda: pipeline.snapshot()["queue_depth"] == 2)
        time.sleep(0.2)
        assert source.calls == 2 and pipeline.snapshot()["queue_depth"] == 2  # waits for room
        firsts = []
        for _ in range(6):
            batch = pipeline.next_batch(5.0)
            firsts.append(batch.batch_id)
            assert pipeline.ack(batch.batch_id)
        assert not list(tmp_path.glob("*.batch")) and len(set(firsts)) == 6  # acked batches leave the spool
        assert pipeline.next_batch(0.1) is None
    finally:
        pipeline.stop()


def test_redelivery_peek_and_rejections(tmp_path):
    bad = {"tokens": [[1, 2, 300]], "masks": [[-100, 2, 300]], "scores": [0.0]}
    source = Source([[_group(10), bad], [bad]])
    pipeline = BatchPipeline(BatchSpool(tmp_path), source, prefetch=4, poll_s=0.05)
    pipeline.start(LIMITS)
    try:
        peeked = pipeline.next_batch(5.0, peek=True)
        batch = pipeline.next_batch(5.0)
        assert batch.batch_id == peeked.batch_id and batch.num_groups == 1
        again = pipeline.next_batch(0.1, redeliver_unacked=True)
        assert again.batch_id == batch.batch_id
        _wait_for(lambda: pipeline.snapshot()["rejected_groups"] == {"token_out_of_vocab": 2})
        assert pipeline.next_batch(0.1) is None  # the all-bad batch was skipped, not queued
        assert pipeline.snapshot()["batches_fetched"] == 2
    finally:
        pipeline.stop()


def test_a_restarted_pipeline_serves_spooled_batches_first(tmp_path):
    first = BatchPipeline(BatchSpool(tmp_path), Source([[_group(10)], [_group(11)]]), prefetch=2, poll_s=0.05)
    first.start(LIMITS)
    handed_out = first.next_batch(5.0)
    _wait_for(lambda: first.snapshot()["queue_depth"] == 1)
    first.stop()
    second = BatchPipeline(BatchSpool(tmp_path), Source([]), prefetch=2, poll_s=0.05)
    second.start(LIMITS)
    try:
        served = [second.next_batch(1.0) for _ in range(2)]
        assert served[0].batch_id == handed_out.batch_id
        assert [b.step for b in served] == [handed_out.step, handed_out.step + 1]
    finally:
        second.stop()
