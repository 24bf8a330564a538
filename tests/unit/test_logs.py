"""Logs a person reads: repeating lines limited, per-step events at INFO once, request loggers quiet."""

from __future__ import annotations

import logging

from atropos_megatron.logs import CHATTY_LIBRARIES, FirstTimeInfo, RepeatLimiter, configure_logging


def _record(message: str, level: int = logging.INFO, name: str = "lib") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_a_line_repeating_with_other_numbers_is_shown_once_per_interval():
    limiter = RepeatLimiter(interval_s=3600)
    assert limiter.filter(_record("Status dict: {'current_step': 3, 'queue_size': 0.5}"))
    assert not limiter.filter(_record("Status dict: {'current_step': 4, 'queue_size': 12}"))
    assert limiter.filter(_record("Status dict: {'current_step': 4}", name="other"))  # another logger
    assert limiter.filter(_record("a different line"))
    assert limiter.filter(_record("Status dict: {'current_step': 5, 'queue_size': 1}", logging.WARNING))


def test_a_repeating_line_comes_back_after_the_interval():
    limiter = RepeatLimiter(interval_s=0.0)
    assert limiter.filter(_record("poll 1"))
    assert limiter.filter(_record("poll 2"))


def test_the_limiter_forgets_old_lines_instead_of_growing_without_bound():
    limiter = RepeatLimiter(interval_s=3600)
    for i in range(RepeatLimiter.MAX_KEYS + 10):
        limiter.filter(_record(f"item {'x' * (i % 50)}{chr(65 + i % 26)}{i}"))
    assert len(limiter._shown) <= RepeatLimiter.MAX_KEYS


def test_first_time_info_is_info_once_then_debug():
    first = FirstTimeInfo()
    assert [first.level() for _ in range(3)] == [logging.INFO, logging.DEBUG, logging.DEBUG]


def test_configure_logging_quiets_request_loggers_unless_debug():
    configure_logging("INFO", "%(message)s")
    assert all(logging.getLogger(name).level == logging.WARNING for name in CHATTY_LIBRARIES)
    configure_logging(logging.DEBUG, "%(message)s")
    assert all(logging.getLogger(name).level == logging.NOTSET for name in CHATTY_LIBRARIES)
