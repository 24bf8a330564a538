"""``stalls.diagnose`` on hand-made snapshots: one test per named stall, and the healthy cases."""

from __future__ import annotations

from dataclasses import replace

from atropos_megatron.bridge.stalls import (
    AtroposView,
    EnvView,
    Snapshot,
    StallPolicy,
    diagnose,
    envs_to_disconnect,
)

NOW = 1000.0
POLICY = StallPolicy(stall_after_s=30.0, slow_batch_s=60.0)


def _view(**changes) -> AtroposView:
    base = AtroposView(
        observed_at=NOW,
        reachable=True,
        batches_formed=3,
        queued_groups=0,
        batch_size=8,
        max_token_len=64,
        largest_group=4,
        posting_rate=0.0,
        envs=(EnvView(env_id=0, queued_groups=0, weight=1.0, last_active=NOW - 100),),
    )
    return replace(base, **changes)


def _waiting(view: AtroposView | None = None, **changes) -> Snapshot:
    """The bridge has had no batch ready for 60 s."""
    snapshot = Snapshot(atropos=view or _view(), bridge_registered=True, no_batch_since=NOW - 60)
    return replace(snapshot, **changes)


def _codes(snapshot: Snapshot) -> list[str]:
    return [stall.code for stall in diagnose(snapshot, NOW, POLICY)]


def test_healthy_when_a_batch_is_ready_or_the_wait_is_short():
    stalled_view = _view(queued_groups=0)
    assert _codes(_waiting(stalled_view, no_batch_since=None)) == []  # a batch is ready
    assert _codes(_waiting(stalled_view, no_batch_since=NOW - 5)) == []  # waiting, but briefly


def test_healthy_while_a_batch_fills_quickly():
    filling = _view(queued_groups=1, posting_rate=1.0)  # 4 of 8 sequences, 1 group/s: ~1 s to go
    assert _codes(_waiting(filling)) == []


def test_no_groups_without_environments():
    (stall,) = diagnose(_waiting(_view(envs=())), NOW, POLICY)
    assert stall.code == "no_groups"
    assert "no environment is registered" in stall.message


def test_no_groups_with_registered_environments_names_equal_score_drops():
    view = _view(envs=(EnvView(0, 0, 0.5, NOW - 90), EnvView(1, 0, 0.5, NOW - 80)), last_posted=NOW - 75)
    (stall,) = diagnose(_waiting(view), NOW, POLICY)
    assert stall.code == "no_groups"
    assert "env 0, 1" in stall.message and "for 75 s" in stall.message
    assert "scores are all equal" in stall.message


def test_quiet_env_with_minimum_names_the_env_and_disconnecting_it():
    view = _view(
        queued_groups=5,  # 20 sequences, batch needs 8
        min_allocation_claimed=0.5,
        envs=(EnvView(0, 5, 0.33, NOW - 1), EnvView(1, 0, 0.67, NOW - 58)),
    )
    (stall,) = diagnose(_waiting(view), NOW, POLICY)
    assert stall.code == "quiet_env_with_minimum"
    assert "env 1 (no group queued, quiet for 58 s)" in stall.message
    assert "env 0" not in stall.message
    assert '"env_id": 1' in stall.message and "bridge.disconnect_quiet_envs_s" in stall.message
    assert envs_to_disconnect(_waiting(view), NOW, 30.0, POLICY) == [1]
    assert envs_to_disconnect(_waiting(view), NOW, 120.0, POLICY) == []  # not quiet for that long yet
    assert envs_to_disconnect(_waiting(view), NOW, 0.0, POLICY) == []  # off
    gone = replace(view, envs=(view.envs[0], replace(view.envs[1], disconnected=True)))
    assert envs_to_disconnect(_waiting(gone), NOW, 30.0, POLICY) == []  # never twice


def test_nothing_is_disconnected_while_batches_flow():
    view = _view(queued_groups=5, min_allocation_claimed=0.5, envs=(EnvView(1, 0, 1.0, NOW - 500),))
    assert envs_to_disconnect(_waiting(view, no_batch_since=None), NOW, 30.0, POLICY) == []


def test_batch_too_large_at_the_recent_rate():
    view = _view(queued_groups=2, largest_group=2, batch_size=64, posting_rate=0.1)  # 30 groups at 0.1/s
    (stall,) = diagnose(_waiting(view), NOW, POLICY)
    assert stall.code == "batch_too_large"
    assert "~4 sequences" in stall.message and "of the 64" in stall.message and "300 s" in stall.message


def test_batch_too_large_when_nothing_more_is_posted():
    view = _view(queued_groups=2, largest_group=2, batch_size=64, posting_rate=0.0, last_posted=NOW - 45)
    (stall,) = diagnose(_waiting(view), NOW, POLICY)
    assert stall.code == "batch_too_large" and "no group was posted for 45 s" in stall.message


def test_batch_too_large_when_whole_groups_cannot_fill_it():
    (stall,) = diagnose(_waiting(_view(queued_groups=9, largest_group=4, batch_size=6)), NOW, POLICY)
    assert stall.code == "batch_too_large" and "multiple of every environment's group_size" in stall.message


def test_groups_rejected_names_the_main_reason():
    snapshot = _waiting(rejections_since_batch={"too_long": 6, "mask_mismatch": 2})
    (stall,) = diagnose(snapshot, NOW, POLICY)
    assert stall.code == "groups_rejected"
    assert "6 of 8" in stall.message and "too_long" in stall.message and "data.max_token_len" in stall.message


def test_groups_unpackable_when_enough_is_queued_without_minimums():
    (stall,) = diagnose(_waiting(_view(queued_groups=5)), NOW, POLICY)
    assert stall.code == "groups_unpackable"


def test_atropos_unreachable_and_registration_stalls():
    down = _view(reachable=False, error="ConnectError")
    assert _codes(_waiting(down)) == ["atropos_unreachable"]
    assert _codes(_waiting(_view(batch_size=-1))) == ["trainer_not_registered"]
    assert _codes(_waiting(bridge_registered=False)) == ["trainer_not_registered"]
    assert _codes(_waiting(atropos=None)) == []  # not read yet: nothing to say


def test_servers_behind_comes_with_the_queue_stall():
    assert _codes(_waiting(servers_behind=1)) == ["servers_behind", "no_groups"]
