"""Why no batch comes: name the stall from one snapshot of the Atropos API and the bridge.

When the trainer waits, the cause is usually outside it: environments post nothing, a killed
environment with ``min_batch_allocation`` blocks every batch, the batch size is more than the
environments produce, or the bridge rejects what arrives. :func:`diagnose` turns a plain
:class:`Snapshot` into named :class:`Stall` s (a stable code plus a sentence a person acts on). It is
pure (times are passed in, nothing is read), so every stall is unit-tested from a hand-made snapshot.

Nothing is named while batches flow: a stall needs the bridge to have had no batch ready for
``StallPolicy.stall_after_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

NO_GROUPS = "no_groups"
QUIET_ENV_WITH_MINIMUM = "quiet_env_with_minimum"
BATCH_TOO_LARGE = "batch_too_large"
GROUPS_REJECTED = "groups_rejected"
GROUPS_UNPACKABLE = "groups_unpackable"
ATROPOS_UNREACHABLE = "atropos_unreachable"
TRAINER_NOT_REGISTERED = "trainer_not_registered"
SERVERS_BEHIND = "servers_behind"

_REJECTION_ADVICE = {
    "too_long": "sequences longer than data.max_token_len: raise it, or lower the environment's "
    "max_token_length",
    "token_out_of_vocab": "token ids outside the model's vocabulary: the environment's tokenizer does not "
    "match the model",
    "mask_mismatch": "masks that are not the tokens at trained positions: the environment builds masks "
    "wrongly",
    "invalid_logprobs": "log-probs that are NaN, infinite or positive at trained positions",
}


@dataclass(frozen=True)
class Stall:
    """A named reason why no batch comes: ``code`` is stable (for scripts), ``message`` is for a person."""

    code: str
    message: str


@dataclass(frozen=True)
class EnvView:
    """One registered environment as the Atropos API shows it (``GET /status-env``)."""

    env_id: int
    queued_groups: int
    """Its groups in the API's queue (``self_queue_size``)."""
    weight: float
    """Its share of inference (``env_weight``: its weight normalised over connected envs, floor 0.01)."""
    last_active: float
    """Monotonic time it was last seen posting (its queued groups grew, or its groups reached the bridge);
    when first seen, the time it was first seen."""
    disconnected: bool = False
    """The bridge disconnected it (``bridge.disconnect_quiet_envs_s``); the API does not say otherwise."""


@dataclass(frozen=True)
class AtroposView:
    """What the bridge's watcher read from the Atropos API at ``observed_at`` (monotonic seconds)."""

    observed_at: float
    reachable: bool
    error: str = ""
    batches_formed: int = 0
    """``/status`` current_step: batches the API has formed (it counts from the registered starting step)."""
    queued_groups: int = 0
    """``/status`` queue_size: groups (not sequences) waiting in the API."""
    batch_size: int = -1
    """``/info``: sequences per batch; -1 when no trainer is registered with the API."""
    max_token_len: int = -1
    largest_group: int = 1
    """The largest group in the queue, in sequences (``/status-env`` max_group_size; 1 when empty)."""
    min_allocation_claimed: float = 0.0
    """Share of every batch that connected envs reserve with ``min_batch_allocation`` (0-1)."""
    posting_rate: float | None = None
    """Groups posted per second over the recent window; None until two readings exist."""
    last_posted: float | None = None
    """Monotonic time the queue last grew (None: not seen growing since the watcher started)."""
    envs: tuple[EnvView, ...] = ()

    @property
    def queued_sequences_max(self) -> int:
        """Sequences queued, at most (groups x the largest group; exact when all groups are one size)."""
        return self.queued_groups * self.largest_group


@dataclass(frozen=True)
class Snapshot:
    """Everything :func:`diagnose` looks at; times are monotonic seconds on the caller's clock."""

    atropos: AtroposView | None
    """None until the watcher has read the API once."""
    bridge_registered: bool
    """A trainer has registered with the bridge."""
    no_batch_since: float | None
    """Since when the bridge has had no batch ready for the trainer; None while one is ready."""
    rejections_since_batch: Mapping[str, int] = field(default_factory=dict)
    """Groups the bridge rejected (by reason) since it last accepted a batch."""
    servers_behind: int = 0
    atropos_url: str = ""


@dataclass(frozen=True)
class StallPolicy:
    """Thresholds of :func:`diagnose` (seconds)."""

    stall_after_s: float = 30.0
    """Name nothing until the bridge has had no batch ready this long (batches in flight are normal)."""
    slow_batch_s: float = 60.0
    """A batch that needs longer than this at the recent posting rate makes ``batch_too_large``."""


def diagnose(snapshot: Snapshot, now: float, policy: StallPolicy = StallPolicy()) -> list[Stall]:
    """The named stalls of ``snapshot`` at time ``now`` (empty: healthy, or not waiting long enough)."""
    if snapshot.no_batch_since is None or now - snapshot.no_batch_since < policy.stall_after_s:
        return []
    if not snapshot.bridge_registered:
        return [
            Stall(
                TRAINER_NOT_REGISTERED,
                "no trainer has registered with this bridge yet: start the trainer (atropos-megatron train); "
                "the bridge registers with Atropos on its behalf and only then can environments register",
            )
        ]
    view = snapshot.atropos
    if view is None:
        return []
    if not view.reachable:
        where = f" at {snapshot.atropos_url}" if snapshot.atropos_url else ""
        return [
            Stall(
                ATROPOS_UNREACHABLE,
                f"the Atropos API{where} does not answer ({view.error or 'no answer'}): start or restart it "
                "(run-api); the bridge registers again by itself",
            )
        ]
    stalls: list[Stall] = []
    if view.batch_size <= 0:
        stalls.append(
            Stall(
                TRAINER_NOT_REGISTERED,
                "the Atropos API holds no trainer registration (it restarted or was reset): the bridge "
                "registers again at its next /batch poll; if this stays, read the bridge's log",
            )
        )
        return stalls
    if snapshot.servers_behind:
        stalls.append(
            Stall(
                SERVERS_BEHIND,
                f"{snapshot.servers_behind} inference server(s) are paused at an older weight version "
                "(restarted?): environments get no completions from them until the trainer pushes weights "
                "again, which it does when it has no batch",
            )
        )
    rejected = _rejected(snapshot.rejections_since_batch)
    if rejected is not None:
        stalls.append(rejected)
    queue = _queue_stall(view, now, policy, rejected is not None)
    if queue is not None:
        stalls.append(queue)
    return stalls


def envs_to_disconnect(snapshot: Snapshot, now: float, quiet_s: float, policy: StallPolicy) -> list[int]:
    """Environments the bridge should disconnect (``bridge.disconnect_quiet_envs_s``): only while
    ``quiet_env_with_minimum`` holds, those it names that posted nothing for ``quiet_s`` or longer."""
    if quiet_s <= 0 or snapshot.atropos is None:
        return []
    if not any(s.code == QUIET_ENV_WITH_MINIMUM for s in diagnose(snapshot, now, policy)):
        return []
    return [env.env_id for env in _quiet_envs(snapshot.atropos, now) if now - env.last_active >= quiet_s]


# ------------------------------------------------------------------------------------------------


def _rejected(rejections: Mapping[str, int]) -> Stall | None:
    total = sum(rejections.values())
    if total <= 0:
        return None
    reason, count = max(rejections.items(), key=lambda item: (item[1], item[0]))
    advice = _REJECTION_ADVICE.get(reason, "the bridge's log names each group and what is wrong with it")
    others = "" if count == total else f" of {total}"
    return Stall(
        GROUPS_REJECTED,
        f"groups reach the bridge but it rejects them: {count}{others} since its last good batch for "
        f"{reason} ({advice})",
    )


def _queue_stall(view: AtroposView, now: float, policy: StallPolicy, rejecting: bool) -> Stall | None:
    """What the API's queue says: nothing posted, too little, blocked by a minimum, or unpackable."""
    batch, group = view.batch_size, view.largest_group
    if view.queued_groups == 0:
        if rejecting:
            return None  # what arrives goes to the bridge and is rejected: that is the stall
        return Stall(NO_GROUPS, _no_groups_message(view, now))
    if group > batch or batch % group:
        return Stall(
            BATCH_TOO_LARGE,
            f"batch_size {batch} cannot be filled with whole groups of {group} sequences (Atropos never "
            "splits a group): make data.batch_size a multiple of every environment's group_size",
        )
    have = view.queued_sequences_max
    if have < batch:
        missing_groups = math.ceil((batch - have) / group)
        rate = view.posting_rate or 0.0
        eta = missing_groups / rate if rate > 0 else math.inf
        if eta <= policy.slow_batch_s:
            return None  # a batch is on its way
        pace = (
            f"at the recent rate ({rate * 60:.3g} groups/min) the rest takes about {eta:.0f} s"
            if rate > 0
            else f"no group was posted {_since(view.last_posted, now)}"
        )
        return Stall(
            BATCH_TOO_LARGE,
            f"the API holds {view.queued_groups} group(s) (~{have} sequences) of the {batch} a batch needs; "
            f"{pace}: lower data.batch_size, or run more environment workers",
        )
    if view.min_allocation_claimed > 0:
        quiet = _quiet_envs(view, now)
        names = ", ".join(
            f"env {e.env_id} (no group queued, quiet for {now - e.last_active:.0f} s)" for e in quiet
        )
        first = quiet[0].env_id if quiet else "<id>"
        return Stall(
            QUIET_ENV_WITH_MINIMUM,
            f"the API holds {view.queued_groups} groups (~{have} sequences, a batch needs {batch}) but forms "
            f"no batch: connected environments reserve {view.min_allocation_claimed:.0%} of every batch "
            f"(min_batch_allocation) and {names or 'an environment with a minimum has too few groups'}. "
            "A killed environment stays registered and blocks every batch: restart it, or disconnect it "
            f'(POST /disconnect-env {{"env_id": {first}}}, or set bridge.disconnect_quiet_envs_s)',
        )
    return Stall(
        GROUPS_UNPACKABLE,
        f"the API holds {view.queued_groups} groups (~{have} sequences, a batch needs {batch}) but forms no "
        f"batch: its queue mixes group sizes (largest {group}) that do not add up to whole packs; give "
        "every environment the same power-of-two group_size",
    )


def _quiet_envs(view: AtroposView, now: float) -> list[EnvView]:
    """Connected envs with nothing queued, quietest first (the API does not say which has a minimum)."""
    quiet = [e for e in view.envs if e.queued_groups == 0 and not e.disconnected]
    return sorted(quiet, key=lambda e: (e.last_active, e.env_id))


def _no_groups_message(view: AtroposView, now: float) -> str:
    live = [e for e in view.envs if not e.disconnected]
    if not live:
        return (
            "no environment is registered with the Atropos API and none posts groups: start your "
            "environments (they register once the trainer has polled /batch)"
        )
    ids = ", ".join(str(e.env_id) for e in live)
    return (
        f"{len(live)} environment(s) registered (env {ids}) but the API's queue is empty: no group was "
        f"posted {_since(view.last_posted, now)}. Likely cause: Atropos environments drop groups whose "
        "scores are all equal (ensure_scores_are_not_same), which is every group while the model solves "
        "none (or all) of the task; read the environments' logs"
    )


def _since(when: float | None, now: float) -> str:
    return "since the bridge started watching" if when is None else f"for {now - when:.0f} s"
