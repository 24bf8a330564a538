"""Logs a person reads: one setup for every process, and events that repeat every step said once.

A run's log is read when something went wrong, so a line per poll, per request or per weight push
buries the line that matters. Library request loggers (httpx) stay at WARNING unless the process
runs at DEBUG, and an event that happens every step is logged at INFO the first time and at DEBUG
afterwards (:class:`FirstTimeInfo`); outages are logged once when they start and once when they end
by the code that sees them. Libraries we do not own that log per poll get a :class:`RepeatLimiter`.
"""

from __future__ import annotations

import logging
import re
import time

CHATTY_LIBRARIES = ("httpx", "httpx2", "httpcore")
"""Loggers that write one INFO line per HTTP request (``httpx2``: the openai client's own copy)."""


def configure_logging(level: int | str, fmt: str) -> None:
    """``logging.basicConfig`` plus quiet request loggers (unless ``level`` is DEBUG)."""
    logging.basicConfig(level=level, format=fmt)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if numeric > logging.DEBUG else logging.NOTSET)


class FirstTimeInfo:
    """The level for an event that recurs every step: INFO the first time, DEBUG afterwards.

    ``logger.log(first.level(), "weights updated ...")``: the first line shows the event works and
    how long it takes; DEBUG shows every one.
    """

    def __init__(self) -> None:
        self._said = False

    def level(self) -> int:
        if self._said:
            return logging.DEBUG
        self._said = True
        return logging.INFO


class RepeatLimiter(logging.Filter):
    """Drops a line below WARNING that repeats, numbers aside, within ``interval_s`` of its last showing.

    For loggers we do not own that report their state on every poll (atroposlib's environment loop
    logs its status ten times a second): the state stays visible once a minute instead of burying
    everything else.
    """

    MAX_KEYS = 4096  # lines that differ in more than numbers (e.g. quoting prompts) must not pile up

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._shown: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        key = (record.name, _NUMBER.sub("#", record.getMessage()))
        now = time.monotonic()
        last = self._shown.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._shown) >= self.MAX_KEYS:
            self._shown.clear()
        self._shown[key] = now
        return True


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")
