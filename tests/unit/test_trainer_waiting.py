"""The trainer's waiting line: one line per ``data.wait_report_s`` without a batch, naming the bridge's
stalls, and one when batches come again; the status call is the one the catch-up check makes anyway.

Rank 0's ``_receive_batch`` runs against a fake bridge on a fake clock (each empty poll is 20 s), so
the test does not depend on the machine's speed.
"""

from __future__ import annotations

import logging
import types

import pytest

from atropos_megatron.config import DataConfig
from atropos_megatron.trainer import loop


class FakeBridge:
    """``empty`` empty polls (each advances the clock by 20 s), then a batch."""

    def __init__(self, clock: list[float], empty: int, stalls=(), servers_behind: int = 0) -> None:
        self.clock, self.empty = clock, empty
        self.status_calls = 0
        self._status = types.SimpleNamespace(stalls=list(stalls), servers_behind=servers_behind)

    def next_batch(self, *, wait_s, redeliver_unacked):
        self.clock[0] += 20.0
        if self.empty:
            self.empty -= 1
            return None
        fields = {name: None for name in loop._BATCH_FIELDS}
        return types.SimpleNamespace(**{**fields, "batch_id": "b1"}, groups=())

    def status(self):
        self.status_calls += 1
        return self._status


def _receive(monkeypatch, bridge: FakeBridge, clock: list[float], *, pushing: bool, report_s: float = 30.0):
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(loop.dist, "broadcast_object_list", lambda message, src: None)
    trainer = types.SimpleNamespace(
        layout=types.SimpleNamespace(rank=0),
        cfg=types.SimpleNamespace(data=DataConfig(wait_report_s=report_s)),
        bridge=bridge,
        _stop_signal=None,
        _redeliver=False,
        progress=types.SimpleNamespace(batch_history=()),
    )
    trainer._bridge_status = types.MethodType(loop.Trainer._bridge_status, trainer)
    trainer._ack = lambda batch_id: None
    return loop.Trainer._receive_batch(trainer, pushing=pushing)


def test_one_line_per_interval_naming_the_stalls_then_one_when_batches_come(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=loop.__name__)
    clock = [0.0]
    stall = types.SimpleNamespace(code="quiet_env_with_minimum", message="env 1 posted nothing for 58 s")
    bridge = FakeBridge(clock, empty=4, stalls=[stall])
    batch = _receive(monkeypatch, bridge, clock, pushing=False)
    assert batch.batch_id == "b1"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "no batch for 40 s: quiet_env_with_minimum: env 1 posted nothing for 58 s",
        "no batch for 80 s: quiet_env_with_minimum: env 1 posted nothing for 58 s",
        "a batch came after 100 s of waiting; training goes on",
    ]
    assert bridge.status_calls == 2  # not pushing: asked only when a line is due


def test_pushing_asks_once_per_empty_poll_for_both_checks(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=loop.__name__)
    clock = [0.0]
    bridge = FakeBridge(clock, empty=2)
    _receive(monkeypatch, bridge, clock, pushing=True)
    assert bridge.status_calls == 2  # one per empty poll, as the catch-up check always did
    assert [r.getMessage() for r in caplog.records] == [
        "no batch for 40 s: the bridge names no stall yet (see `atropos-megatron status`)",
        "a batch came after 60 s of waiting; training goes on",
    ]


def test_catch_up_when_a_server_is_behind(monkeypatch):
    clock = [0.0]
    assert (
        _receive(monkeypatch, FakeBridge(clock, empty=1, servers_behind=1), clock, pushing=True)
        == loop.CATCH_UP
    )


def test_quiet_when_no_wait_is_long_and_when_turned_off(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=loop.__name__)
    clock = [0.0]
    _receive(monkeypatch, FakeBridge(clock, empty=1), clock, pushing=False)  # 20 s < 30 s
    _receive(monkeypatch, FakeBridge(clock, empty=5), clock, pushing=False, report_s=0)
    assert caplog.records == []


@pytest.mark.parametrize("report_s", [-1.0])
def test_wait_report_s_must_not_be_negative(report_s):
    with pytest.raises(ValueError, match="data.wait_report_s"):
        DataConfig(wait_report_s=report_s)
