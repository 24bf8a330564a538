"""The trainer's stop signal in forked helpers: Megatron forks a writer per checkpoint save and waits for
each to report, and Slurm or a supervisor signals the whole process group. A writer must finish."""

from __future__ import annotations

import multiprocessing
import os
import signal

from atropos_megatron.trainer.loop import Trainer


def _helper(results) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the group's stop signal arrives in the middle of the work
    results.put("finished")


def test_a_forked_helper_finishes_its_work_through_the_stop_signal():
    trainer = Trainer.__new__(Trainer)  # only the handler's state: no model, no process group
    trainer._pid, trainer._stop_signal, trainer.bridge = os.getpid(), None, None
    previous = signal.signal(signal.SIGTERM, trainer._request_stop)
    try:
        context = multiprocessing.get_context("fork")  # as Megatron's writer workers are made
        results = context.Queue()
        worker = context.Process(target=_helper, args=(results,))
        worker.start()
        assert results.get(timeout=60) == "finished"
        worker.join(60)
        assert worker.exitcode == 0
        assert trainer._stop_signal is None  # the helper's signal is not the trainer's
    finally:
        signal.signal(signal.SIGTERM, previous)
