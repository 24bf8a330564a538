"""The multi-process harness reports which rank failed and why, and ends hangs with stack dumps."""

from __future__ import annotations

import time

import pytest

from tests.harness import RankFailure, run_ranks

pytestmark = pytest.mark.distributed


def _rank_one_fails(rank, world_size):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    assert rank == 0, "only rank 0 may pass"
    dist.barrier()  # rank 0 now waits for a peer that is gone: the harness must not wait 30 min


def _rank_one_hangs(rank, world_size):
    if rank == 1:
        _sleep_forever()
    return rank * 10


def _sleep_forever():
    while True:
        time.sleep(0.1)


def _return_rank(rank, world_size):
    return {"rank": rank, "world": world_size}


def test_results_come_back_by_rank():
    assert run_ranks(_return_rank, 3, timeout_s=60) == [{"rank": r, "world": 3} for r in range(3)]


def test_a_failing_rank_is_named_with_its_assertion():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_one_fails, 2, timeout_s=120)
    message = str(info.value)
    assert "rank 1 failed" in message
    assert "AssertionError: only rank 0 may pass" in message
    assert time.monotonic() - start < 60, "the harness waited for the stuck peer instead of stopping"


def test_a_hang_times_out_naming_the_rank_and_dumping_its_stack(capfd):
    with pytest.raises(RankFailure, match=r"ranks \[1\] did not finish within 8 s"):
        run_ranks(_rank_one_hangs, 2, timeout_s=8)
    assert "_sleep_forever" in capfd.readouterr().err
