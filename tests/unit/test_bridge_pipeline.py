"""The spool and the batch pipeline, driven directly (no gRPC, no Atropos): durability, order, prefetch."""

from __future__ import annotations

import threading
import time

import pytest

from atropos_megatron.bridge.pipeline import BatchPipeline, Limits
from atropos_megatron.bridge.spool import LEDGER, BatchSpool, SpoolError
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


def _put(spool: BatchSpool, *batches: tuple[int, str]) -> None:
    for step, batch_id in batches:
        spool.put(bridge_pb2.TrainingBatch(batch_id=batch_id, step=step))


def _ids(batches) -> list[str]:
    return [b.batch_id for b in batches]


def test_spool_keeps_acknowledged_batches_until_a_checkpoint_commits_them(tmp_path):
    spool = BatchSpool(tmp_path)
    spool.set_next_step(5)
    _put(spool, (5, "a"), (6, "b"), (7, "c"))
    for batch_id, trained_step in (("a", 1), ("b", 2)):
        spool.hand_out(batch_id)
        assert spool.ack(batch_id, trained_step) and spool.ack(batch_id, trained_step)  # repeats are harmless
    assert not spool.ack("never-seen", 3)
    assert spool.counts() == {"queued": 1, "handed_out": 0, "acked": 2, "bytes": spool.counts()["bytes"]}
    assert len(list(tmp_path.glob("*.batch"))) == 3  # acknowledged is not committed: all still on disk
    assert spool.commit(1) == 1 and spool.commit(1) == 0 and spool.commit(0) == 0
    assert sorted(p.name for p in tmp_path.glob("*.batch")) == [
        "000000000006-b.batch",
        "000000000007-c.batch",
    ]
    assert spool.ack("a", 1)  # a late ack of a committed batch is still fine
    spool.close()

    reopened = BatchSpool(tmp_path)  # states come back from the ledger
    assert reopened.committed_step == 1 and reopened.next_step == 8
    assert _ids(reopened.unacked()) == ["c"] and _ids(reopened.replay(1)) == ["b"]
    assert _ids(reopened.replay(2)) == []  # a trainer at step 2 already holds b
    assert reopened.ack("a", 1)
    reopened.set_next_step(2)  # a trainer resuming further back does not reuse spooled steps
    assert reopened.next_step == 8
    assert reopened.ack("b", 2) and reopened.commit(2) == 1 and reopened.counts()["acked"] == 0
    reopened.close()


def test_replay_is_training_order_then_unacknowledged_batches(tmp_path):
    spool = BatchSpool(tmp_path)
    _put(spool, (0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e"))
    for batch_id, trained_step in (("a", 1), ("b", 2), ("c", 3)):
        spool.hand_out(batch_id)
        spool.ack(batch_id, trained_step)
    spool.hand_out("d")  # trained at step 4 when the trainer died, never acknowledged
    assert _ids(spool.replay(1)) == ["b", "c", "d"]
    spool.hand_out("b")  # replayed, then the trainer died again before acknowledging it:
    assert _ids(spool.replay(1)) == ["b", "c", "d"]  # it keeps its place in the training order
    # Handed out and unacknowledged is always served again (the trainer acknowledges, without training,
    # a batch its checkpoint's batch_history already holds).
    assert _ids(spool.replay(3)) == ["b", "d"]
    spool.close()


def test_the_ledger_survives_a_torn_last_line_and_a_crash_between_commit_and_delete(tmp_path):
    spool = BatchSpool(tmp_path)
    _put(spool, (0, "a"), (1, "b"))
    spool.hand_out("a")
    spool.ack("a", 1)
    spool.close()
    kept = (tmp_path / "000000000000-a.batch").read_bytes()
    spool = BatchSpool(tmp_path)
    spool.commit(1)
    spool.close()
    (tmp_path / "000000000000-a.batch").write_bytes(kept)  # the delete never reached the disk
    with open(tmp_path / LEDGER, "ab") as ledger:
        ledger.write(b'{"event": "acked", "batch_id": "b", "tra')  # a crash mid-append
    reopened = BatchSpool(tmp_path)
    assert not (tmp_path / "000000000000-a.batch").exists()
    assert _ids(reopened.unacked()) == ["b"]  # the torn ack never happened
    reopened.hand_out("b")  # and the ledger goes on cleanly after the cut
    reopened.close()
    assert BatchSpool(tmp_path).replay(0)[0].batch_id == "b"
    (tmp_path / LEDGER).write_bytes(b"not json\n" + (tmp_path / LEDGER).read_bytes())
    with pytest.raises(SpoolError, match="ledger.jsonl:1"):
        BatchSpool(tmp_path)


def test_spool_ignores_unfinished_writes_and_reports_corrupt_files(tmp_path):
    spool = BatchSpool(tmp_path)
    spool.put(bridge_pb2.TrainingBatch(batch_id="ok", step=0))
    (tmp_path / "000000000001-half.batch.tmp").write_bytes(b"partial")
    (tmp_path / "000000000002-bad.batch").write_bytes(b"\xff\xff not a proto")
    reopened = BatchSpool(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SpoolError, match="000000000002-bad.batch"):
        reopened.unacked()


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
            assert pipeline.ack(batch.batch_id, 0)  # trained_step 0: committed at once
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


def test_a_trainer_registering_at_its_checkpoint_is_served_what_it_lost_first(tmp_path):
    source = Source([[_group(i)] for i in range(10, 15)])
    pipeline = BatchPipeline(BatchSpool(tmp_path), source, prefetch=2, poll_s=0.05)
    pipeline.start(LIMITS)
    try:
        assert pipeline.register(starting_step=0, committed_step=0) == 0
        served = [pipeline.next_batch(5.0) for _ in range(4)]
        for trained_step, batch in enumerate(served[:3], start=1):
            assert pipeline.ack(batch.batch_id, trained_step)
        assert pipeline.commit(1) == 1  # checkpoint at step 1 holds the first batch
        # Killed after training step 4 (never acknowledged) with its checkpoint at 1: steps 2-4 again.
        assert pipeline.register(starting_step=1, committed_step=1) == 3
        again = [pipeline.next_batch(5.0) for _ in range(3)]
        assert _ids(again) == _ids(served[1:4])
        assert pipeline.next_batch(5.0).batch_id not in _ids(served)  # then new ones
        # A live trainer registering again (its bridge restarted) at step 4 is served nothing twice.
        for trained_step, batch in enumerate(again, start=2):
            pipeline.ack(batch.batch_id, trained_step)
        assert pipeline.register(starting_step=4, committed_step=1) == 1  # the one handed out just now
        status = pipeline.snapshot()
        assert (status["retained"], status["committed_step"], status["batches_replayed"]) == (3, 1, 4)
    finally:
        pipeline.stop()


def test_a_request_whose_caller_is_gone_takes_no_batch(tmp_path):
    pipeline = BatchPipeline(BatchSpool(tmp_path), Source([[_group(10)]]), prefetch=2, poll_s=0.05)
    pipeline.start(LIMITS)
    try:
        _wait_for(lambda: pipeline.snapshot()["queue_depth"] == 1)
        assert pipeline.next_batch(1.0, caller_alive=lambda: False) is None
        assert pipeline.snapshot()["queue_depth"] == 1  # still there for the trainer that is alive
        assert pipeline.next_batch(1.0) is not None
    finally:
        pipeline.stop()
