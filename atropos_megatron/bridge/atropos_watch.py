"""The bridge's view of the Atropos API's side: queue, batches formed, registered environments.

The batch poll only learns "no batch yet". To say *why* (``stalls.py``), a separate thread reads, every
``bridge.atropos_watch_s``: ``GET /status`` (batches formed, groups queued), ``GET /info`` (batch size)
and ``GET /status-env`` per environment (its queued groups, weight share, the queue's largest group and
the share of each batch reserved by ``min_batch_allocation``). It runs beside the batch poll, so a slow
answer never delays a batch.

Atropos has no endpoint that lists environments: an ``env_id`` is an index, and ``/status-env`` for one
past the last answers HTTP 500 (with a traceback in the API's log). So the watcher re-reads the envs it
knows every poll and probes for the next id only on a sign of one: the known weight shares
(``env_weight``, each env's weight over the connected envs' total) sum to less than 1 (an unknown env
holds the rest), groups of an unknown env reached the bridge, or the queue grew while no env is known.
While the shares sum to exactly 1 it never probes. With no env known, or shares above 1 (an env
disconnected by someone else), it also probes blindly with backoff (doubling from one interval to
``DISCOVERY_POLLS`` intervals, the first after ``FIRST_BLIND_PROBE_POLLS``): an API without
environments sees about one 500 a minute at the default interval, a healthy run none. (An env
registered with weight 0 adds nothing to the shares and is found only by those blind probes.)

An environment's activity is not in the API either (its ``last_update`` is set once, at registration):
an env is active when its queued groups grow, or when its groups reach the bridge in a batch
(``env_activity``, from the pipeline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from atropos_megatron.bridge.atropos_client import AtroposClient, AtroposUnavailable
from atropos_megatron.bridge.stalls import AtroposView, EnvView

logger = logging.getLogger(__name__)

DISCOVERY_POLLS = 12
"""The longest backoff between probes for an unknown env, in polls (60 s at the default 5 s)."""
FIRST_BLIND_PROBE_POLLS = 6
"""Polls before the first probe with no sign of an env (30 s at the default 5 s). Environments that
post are found sooner, from their groups, so a healthy run's API log never shows a probe's 500."""
RATE_WINDOW_S = 60.0
"""The posting rate is measured over this much recent history (seconds)."""
_WEIGHTS_COMPLETE = 0.999  # known envs' weight shares at or above this: no connected env is unknown


@dataclass
class _EnvTrack:
    queued: int
    weight: float
    last_active: float
    disconnected: bool = False


class AtroposWatch:
    """Polls the Atropos API's state on its own thread; :attr:`view` is the latest reading.

    ``env_activity()`` gives, per env_id, the monotonic time its groups last reached the bridge.
    ``on_view(view)`` runs on the watcher thread after each poll (the bridge names stalls there).
    """

    def __init__(
        self,
        client: AtroposClient,
        *,
        interval_s: float,
        env_activity: Callable[[], Mapping[int, float]] = dict,
        on_view: Callable[[AtroposView], None] | None = None,
        alive: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.interval_s = interval_s
        self._discovery_s = DISCOVERY_POLLS * interval_s
        self._env_activity = env_activity
        self._on_view = on_view
        self._alive = alive
        self._clock = clock
        self._envs: dict[int, _EnvTrack] = {}
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, queued groups, batches formed)
        self._last_posted: float | None = None
        self._next_probe_at = clock() + FIRST_BLIND_PROBE_POLLS * interval_s
        self._probe_backoff_s = interval_s
        self._hint_refuted: float | None = None  # a weight sum whose probe found no env
        self._probe_refuted_at = float("-inf")  # when a probe last found no env
        self._view: AtroposView | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start polling (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="atropos-watch", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def view(self) -> AtroposView | None:
        """The latest reading (None before the first)."""
        return self._view

    # -- one poll ---------------------------------------------------------------------------------

    def poll_once(self) -> AtroposView:
        """Read the API once and return (and keep) the resulting view."""
        now = self._clock()
        try:
            status = self._client.status()
            info = self._client.info()
            batch_size = int(info.get("batch_size", -1))
            answers = self._poll_envs(now) if batch_size > 0 else {}
        except AtroposUnavailable as exc:
            view = AtroposView(observed_at=now, reachable=False, error=str(exc), envs=self._env_views())
            self._view = view
            logger.debug("Atropos watch: API unreachable: %s", exc)
            return view
        if batch_size <= 0 and self._envs:
            logger.info("the Atropos API lost its registrations (restarted or reset): forgetting its envs")
            self._envs.clear()
        queued, formed = int(status.get("queue_size", 0)), int(status.get("current_step", 0))
        self._track_queue(now, queued, formed)
        first = next(iter(answers.values()), {})
        view = AtroposView(
            observed_at=now,
            reachable=True,
            batches_formed=formed,
            queued_groups=queued,
            batch_size=batch_size,
            max_token_len=int(info.get("max_token_len", -1)),
            largest_group=max([int(a.get("max_group_size", 1)) for a in answers.values()] or [1]),
            min_allocation_claimed=max(0.0, 1.0 - float(first.get("unallocated_fraction", 1.0))),
            posting_rate=self._posting_rate(),
            last_posted=self._last_posted,
            envs=self._env_views(),
        )
        self._view = view
        logger.debug(
            "Atropos watch: %d batches formed, %d groups queued, envs %s",
            formed,
            queued,
            {e.env_id: e.queued_groups for e in view.envs},
        )
        return view

    def disconnect(self, env_id: int, reason: str) -> bool:
        """``POST /disconnect-env`` for ``env_id``, logged in one line; never tried twice for one env."""
        track = self._envs.get(env_id)
        if track is None or track.disconnected:
            return False
        track.disconnected = True
        view = self._view
        if view is not None:  # show it at once, not from the next reading
            envs = tuple(replace(e, disconnected=True) if e.env_id == env_id else e for e in view.envs)
            self._view = replace(view, envs=envs)
        try:
            done = self._client.disconnect_env(env_id)
        except Exception as exc:  # noqa: BLE001 - the API's answer decides nothing else here
            logger.warning("could not disconnect Atropos env %d (%s): %s", env_id, reason, exc)
            return False
        if done:
            logger.warning("disconnected Atropos env %d: %s", env_id, reason)
        else:
            logger.warning("the Atropos API refused to disconnect env %d (%s)", env_id, reason)
        return done

    # -- internals --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set() and self._alive():
            try:
                view = self.poll_once()
                if self._on_view is not None:
                    self._on_view(view)
            except RuntimeError as exc:  # the HTTP client was closed: the bridge is shutting down
                logger.debug("Atropos watch stops: %s", exc)
                return
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad answer
                logger.exception("reading the Atropos API's state failed; trying again")
            self._stop.wait(self.interval_s)

    def _poll_envs(self, now: float) -> dict[int, dict]:
        """``/status-env`` for each known env, then for the next id when one may have registered."""
        answers: dict[int, dict] = {}
        for env_id in sorted(self._envs):
            body = self._client.status_env(env_id)
            if body is None:  # the API forgot it: restarted or reset, its envs register anew
                logger.info("the Atropos API no longer knows env %d (restarted or reset?)", env_id)
                for gone in [k for k in self._envs if k >= env_id]:
                    del self._envs[gone]
                break
            self._update_env(env_id, body, now)
            answers[env_id] = body
        while True:
            weights = sum(
                a.get("env_weight", 0.0) for k, a in answers.items() if not self._envs[k].disconnected
            )
            hint = (bool(answers) and weights < _WEIGHTS_COMPLETE and weights != self._hint_refuted) or (
                self._unknown_env_posted()
            )
            # Shares summing to 1 prove every connected env (of positive weight) is known: no probe. Above
            # 1 (an env disconnected by someone else, or the 0.01 floor) they prove nothing: probe now and then.
            complete = bool(answers) and abs(weights - 1.0) <= 1.0 - _WEIGHTS_COMPLETE
            if not (hint or (now >= self._next_probe_at and not complete)):
                return answers
            env_id = len(self._envs)
            body = self._client.status_env(env_id)
            if body is None:
                self._hint_refuted = weights if hint else self._hint_refuted
                self._probe_refuted_at = now
                self._next_probe_at = now + self._probe_backoff_s
                self._probe_backoff_s = min(self._discovery_s, 2 * self._probe_backoff_s)
                return answers
            self._envs[env_id] = _EnvTrack(queued=-1, weight=0.0, last_active=now)
            self._update_env(env_id, body, now)
            answers[env_id] = body
            self._next_probe_at = now + self._discovery_s
            self._probe_backoff_s = self.interval_s
            logger.info(
                "Atropos env %d is registered (inference share %.2f, %d groups queued)",
                env_id,
                self._envs[env_id].weight,
                self._envs[env_id].queued,
            )

    def _unknown_env_posted(self) -> bool:
        """Since the last probe that found nothing, groups of an env not known yet reached the bridge,
        or the queue grew while no env is known."""
        after = self._probe_refuted_at
        if any(i >= len(self._envs) and t > after for i, t in self._env_activity().items()):
            return True
        return not self._envs and self._last_posted is not None and self._last_posted > after

    def _update_env(self, env_id: int, body: dict, now: float) -> None:
        track = self._envs[env_id]
        queued = int(body.get("self_queue_size", 0))
        if queued > track.queued >= 0:
            track.last_active = now
        track.queued = queued
        track.weight = float(body.get("env_weight", 0.0))

    def _track_queue(self, now: float, queued: int, formed: int) -> None:
        if self._samples and queued > self._samples[-1][1]:
            self._last_posted = now
        self._samples.append((now, queued, formed))
        while len(self._samples) > 2 and self._samples[1][0] < now - RATE_WINDOW_S:
            self._samples.popleft()

    def _posting_rate(self) -> float | None:
        """Groups posted per second over the window: the queue's growth (a lower bound while batches form)."""
        if len(self._samples) < 2:
            return None
        samples = list(self._samples)
        span = samples[-1][0] - samples[0][0]
        if span <= 0:
            return None
        posted = sum(max(0, b[1] - a[1]) for a, b in zip(samples, samples[1:], strict=False))
        return posted / span

    def _env_views(self) -> tuple[EnvView, ...]:
        seen = self._env_activity()
        return tuple(
            EnvView(
                env_id=env_id,
                queued_groups=max(track.queued, 0),
                weight=track.weight,
                last_active=max(track.last_active, seen.get(env_id, track.last_active)),
                disconnected=track.disconnected,
            )
            for env_id, track in sorted(self._envs.items())
        )
