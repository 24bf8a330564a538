"""HTTP client for the Atropos API server (atroposlib 0.4.0), used by the bridge on the trainer's behalf.

Why a client of our own: the Atropos API keeps all of its state in process memory and has no
persistence, so a restart or a ``/reset_data`` silently forgets the trainer. After a restart ``/batch``
answers "Trainer not registered"; after a reset it answers HTTP 500 until ``/register`` runs again
(notes/atropos-api.md §1). A trainer that only polls would wait forever. This client remembers the
registration and re-registers by itself, starting the API's step counter at :attr:`AtroposClient.resume_step`.
It never raises while the API is down (it backs off and logs once per outage), so a long training run
survives API restarts.

Polling backoff uses *equal jitter*: attempt ``n`` waits a uniform time in ``[d/2, d]`` with
``d = min(cap, base * 2**n)``. Half the delay is fixed, so polls are never closer than ``d/2``, and the
random half keeps several clients from polling in lockstep.

Every request has a timeout. A read timeout on ``GET /batch`` can lose a batch that the server formed
and popped before the connection died; that is why the default ``timeout_s`` is generous (60 s).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

_NOT_REGISTERED = "not registered"  # substring of Atropos's "Trainer not registered. Call /register first."


@dataclass(frozen=True)
class Registration:
    """The body of ``POST /register``: exactly the fields of Atropos's ``Registration`` model."""

    wandb_group: str
    wandb_project: str
    batch_size: int  # sequences (not groups) per batch
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int  # the API's step counter starts here
    num_steps: int


class AtroposUnavailable(RuntimeError):
    """The Atropos API could not be reached, or gave no usable answer, before a deadline.

    ``status_code`` is the HTTP status when the server answered with a 5xx, else ``None``.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): equal jitter, uniform in ``[d/2, d]``.

    ``d = min(cap, base * 2**attempt)``; ``attempt`` is clamped so huge values cannot overflow.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError(f"backoff_delay needs non-negative arguments, got {attempt=}, {base=}, {cap=}")
    ceiling = min(cap, base * 2.0 ** min(attempt, 64))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


def _batch_from_body(body: Any) -> list[dict] | None | str:
    """Classify a decoded ``/batch`` answer: the groups, ``None`` (not enough data yet) or an error text."""
    if not isinstance(body, dict):
        return f"unexpected /batch body of type {type(body).__name__}"
    if body.get("status") == "error":
        return str(body.get("message", "error without a message"))
    batch = body.get("batch")
    if batch is None or batch == []:
        return None
    if isinstance(batch, list) and all(isinstance(group, dict) for group in batch):
        return batch
    return f"malformed /batch payload: {str(batch)[:200]}"


def _uuid_text(body: Any) -> str:
    """The registration uuid as a decimal string. JSON integers decode exactly (no float on the way)."""
    value = body.get("uuid") if isinstance(body, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    raise AtroposUnavailable(f"/register answered without an integer uuid: {str(body)[:200]}")


class AtroposClient:
    """Synchronous client for one Atropos API server; safe to share between threads.

    ``poll_interval_s``/``poll_max_interval_s`` bound the backoff between polls and retries.
    ``sleep`` and ``rng`` are injectable for tests. ``resume_step`` is the step the API counter restarts
    from when the client has to re-register; its owner keeps it current.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 60.0,
        poll_interval_s: float = 0.5,
        poll_max_interval_s: float = 5.0,
        gzip_min_bytes: int = 1024,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s
        self.gzip_min_bytes = gzip_min_bytes
        self.resume_step = 0
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        # No keep-alive: uvicorn closes the connection after every unhandled exception (each HTTP 500 from
        # Atropos), and the next request on that pooled connection would fail with a connection reset.
        limits = httpx.Limits(max_keepalive_connections=0)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=limits)
        self._registration: Registration | None = None
        self._reregistered = False  # the last /batch answer led to a re-registration
        self._reachable = False
        self._outage_since: float | None = None  # monotonic time of the first failure of an outage
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- public

    @property
    def reachable(self) -> bool:
        """Whether the last request got a usable answer."""
        return self._reachable

    @property
    def registration(self) -> Registration | None:
        """The registration remembered by the last successful :meth:`register`."""
        return self._registration

    def register(self, registration: Registration, *, deadline_s: float | None = None) -> str:
        """``POST /register``, retrying failures with backoff for ``deadline_s`` (default ``timeout_s``).

        Returns the uuid as a decimal string. Remembers the registration for automatic re-registration
        and sets :attr:`resume_step` to its ``starting_step``. Raises :class:`AtroposUnavailable` when
        the deadline passes, ``httpx.HTTPStatusError`` on a 4xx (a bad body: retrying cannot help).
        """
        budget = self.timeout_s if deadline_s is None else deadline_s
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                uuid = self._register_once(registration, timeout=max(0.05, min(self.timeout_s, remaining)))
                break
            except AtroposUnavailable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AtroposUnavailable(
                        f"Atropos API at {self.base_url} not reachable within {budget:g} s: {exc}"
                    ) from exc
            self._sleep(min(self._delay(attempt), remaining))
            attempt += 1
        self._registration = registration
        self.resume_step = registration.starting_step
        return uuid

    def fetch_batch(
        self, *, wait_s: float | None = None, stop: threading.Event | None = None
    ) -> list[dict] | None:
        """Poll ``GET /batch`` until a batch arrives (returns its groups), ``wait_s`` passes or ``stop`` is set.

        Never raises because the API is down or misbehaving: failures are logged once per outage and
        retried with backoff. When the API has forgotten the trainer ("Trainer not registered" or HTTP
        500, after a restart or ``/reset_data``) it re-registers with ``starting_step = resume_step``.
        A batch that arrived is always returned, even if ``stop`` was set meanwhile: the API already
        dequeued it. Raises ``RuntimeError`` if :meth:`register` never succeeded.
        """
        if self._registration is None:
            raise RuntimeError("AtroposClient.fetch_batch called before register()")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        attempt = 0
        while stop is None or not stop.is_set():
            batch = self._poll_once()
            if batch is not None:
                return batch
            delay = self._delay(attempt)
            attempt += 1
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                delay = min(delay, remaining)
            if self._pause(delay, stop):
                return None
        return None

    def status(self) -> dict:
        """``GET /status``: ``{"current_step", "queue_size"}`` (queue_size counts groups)."""
        return self._json_dict("GET", "/status")

    def info(self) -> dict:
        """``GET /info``: ``{"batch_size", "max_token_len"}`` (``-1`` before registration)."""
        return self._json_dict("GET", "/info")

    def post_json(self, path: str, body: Any) -> dict:
        """One ``POST`` of ``body`` as JSON, gzip-compressed when it is ``gzip_min_bytes`` or larger.

        Not retried (a POST of data is not idempotent). Raises :class:`AtroposUnavailable` on a
        connection failure, 5xx or malformed answer, ``httpx.HTTPStatusError`` on a 4xx.
        """
        data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if len(data) >= self.gzip_min_bytes:
            data = gzip.compress(data, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        return self._json_dict("POST", path, content=data, headers=headers)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> AtroposClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- polling

    def _poll_once(self) -> list[dict] | None:
        """One ``GET /batch``: the groups, or ``None`` after handling whatever else came back."""
        try:
            result = _batch_from_body(self._request("GET", "/batch"))
        except AtroposUnavailable as exc:
            if exc.status_code == 500:  # the API was reset (its state half-deleted): register again
                self._reregister(f"GET /batch answered HTTP 500 ({exc})")
            return None
        except httpx.HTTPStatusError as exc:
            self._note_failure(f"GET /batch: {exc}")
            return None
        if isinstance(result, str) and _NOT_REGISTERED in result.lower():
            if self._reregistered:
                self._reset_stuck_api()
            self._reregister(f"the API says: {result}")
            self._reregistered = True
            return None
        self._reregistered = False
        if isinstance(result, str):
            self._note_failure(f"GET /batch: {result}")
            return None
        return result

    def _reset_stuck_api(self) -> None:
        """Unstick an API where re-registration did not take.

        After a restart, environments may post groups before the trainer re-registers. Atropos then
        holds a queue but no trainer state, ``/register`` skips its set-up whenever a queue exists, and
        ``/batch`` says "not registered" forever. Only ``/reset_data`` clears that queue, so those
        groups are lost, inside Atropos, before any batch was formed from them.
        """
        log.warning(
            "Atropos API at %s stays unregistered: groups posted after its restart but before the "
            "trainer re-registered block registration; resetting it (those groups are dropped)",
            self.base_url,
        )
        try:  # answers plain text, not JSON
            self._http.get("/reset_data").raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("GET /reset_data on the Atropos API at %s failed: %s", self.base_url, exc)

    def _reregister(self, reason: str) -> None:
        """One re-registration attempt with ``starting_step = resume_step``; failures are left to the poll."""
        assert self._registration is not None
        registration = dataclasses.replace(self._registration, starting_step=self.resume_step)
        log.warning(
            "Atropos API at %s lost the trainer registration (%s); re-registering with starting_step=%d",
            self.base_url,
            reason,
            registration.starting_step,
        )
        try:
            self._register_once(registration, timeout=self.timeout_s)
        except (AtroposUnavailable, httpx.HTTPStatusError) as exc:
            log.warning("re-registration with the Atropos API at %s failed: %s", self.base_url, exc)

    def _pause(self, delay: float, stop: threading.Event | None) -> bool:
        """Wait ``delay`` seconds; with a ``stop`` event, wake as soon as it is set (returns whether it is)."""
        if stop is None:
            self._sleep(delay)
            return False
        return stop.wait(delay)

    def _delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.poll_interval_s, self.poll_max_interval_s, self._rng)

    # ---------------------------------------------------------------------------------------- requests

    def _register_once(self, registration: Registration, *, timeout: float) -> str:
        body = self._request("POST", "/register", json=dataclasses.asdict(registration), timeout=timeout)
        return _uuid_text(body)

    def _json_dict(self, method: str, path: str, **kwargs: Any) -> dict:
        body = self._request(method, path, **kwargs)
        if not isinstance(body, dict):
            self._note_failure(f"{method} {path}: expected a JSON object, got {type(body).__name__}")
            raise AtroposUnavailable(
                f"{method} {self.base_url}{path} answered a non-object: {str(body)[:200]}"
            )
        return body

    def _request(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """One request, decoded from JSON. Raises :class:`AtroposUnavailable` for anything worth retrying
        (no connection, timeout, 5xx, malformed JSON) and ``httpx.HTTPStatusError`` for a 4xx."""
        where = f"{method} {path}"
        try:
            response = self._http.request(method, path, timeout=timeout or self.timeout_s, **kwargs)
        except httpx.TransportError as exc:  # connect/read/write errors and every timeout
            self._note_failure(f"{where}: {type(exc).__name__}: {exc}")
            raise AtroposUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            detail = f"{where}: HTTP {response.status_code} {response.text[:200]!r}"
            self._note_failure(detail)
            raise AtroposUnavailable(detail, status_code=response.status_code)
        if response.status_code >= 400:
            self._reachable = False
            response.raise_for_status()
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            detail = f"{where}: malformed JSON {response.content[:200]!r}"
            self._note_failure(detail)
            raise AtroposUnavailable(detail) from exc
        self._note_success()
        return body

    def _note_failure(self, detail: str) -> None:
        """Mark the API unreachable; log only the first failure of an outage."""
        with self._lock:
            self._reachable = False
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
        if first:
            log.warning("Atropos API at %s unavailable (%s); retrying with backoff", self.base_url, detail)
        else:
            log.debug("Atropos API at %s still unavailable: %s", self.base_url, detail)

    def _note_success(self) -> None:
        """Mark the API reachable; log the end of an outage."""
        with self._lock:
            self._reachable = True
            since, self._outage_since = self._outage_since, None
        if since is not None:
            log.warning(
                "Atropos API at %s answering again after %.1f s", self.base_url, time.monotonic() - since
            )

    # ------------------------------------------------------------------------- environments (watcher)

    def status_env(self, env_id: int, *, timeout_s: float | None = None) -> dict | None:
        """``GET /status-env`` (a GET with a JSON body): one env's view, or None when the API answers 500.

        Atropos answers 500 for an ``env_id`` past the last registered one (that is how envs are
        enumerated), with no env or no trainer registered, or when every connected env has weight 0;
        so a 500 is an answer here, not an outage, and is not logged. Side effect (as for every env's
        own call): the API raises the env's recorded group_size to its largest queued group. Raises
        :class:`AtroposUnavailable` when the API cannot be reached or answers something unusable.
        """
        try:
            response = self._http.request(
                "GET", "/status-env", json={"env_id": env_id}, timeout=timeout_s or self.timeout_s
            )
        except httpx.TransportError as exc:
            raise AtroposUnavailable(f"GET /status-env: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            return None
        try:
            response.raise_for_status()
            body = json.loads(response.content)
        except (httpx.HTTPStatusError, ValueError) as exc:
            raise AtroposUnavailable(f"GET /status-env: {exc}") from exc
        if not isinstance(body, dict):
            raise AtroposUnavailable(f"GET /status-env answered a non-object: {str(body)[:200]}")
        return body

    def disconnect_env(self, env_id: int) -> bool:
        """``POST /disconnect-env``: Atropos stops counting the env's weight and ``min_batch_allocation``.

        Returns whether the API said ``success`` (it answers ``failure`` for an unknown env_id). An env
        cannot be reconnected; it may still post, and its groups are still batched. Not retried.
        """
        return self.post_json("/disconnect-env", {"env_id": env_id}).get("status") == "success"
