"""Each named stall made to happen against the real Atropos API (``run-api``) and a real bridge.

"Environments" here are what the API sees of them: ``POST /register-env`` and ``/scored_data_list``
with httpx (the API's real protocol). Every wait polls the bridge's status against a deadline that
only a hang reaches; nothing assumes the machine's speed. ``atropos-megatron status`` (its ``main``)
is checked on the same runs: what it prints and its exit status.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from atropos_megatron import status as status_cli
from atropos_megatron.bridge.client import BridgeClient
from atropos_megatron.bridge.server import build_service, create_server
from atropos_megatron.config import BridgeConfig

atropos_api = pytest.importorskip("tests.atropos_api")
pytest.importorskip("atroposlib")

DEADLINE_S = 120.0  # only a hang gets there


def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _group(env_id: int | None, size: int = 2, length: int = 5) -> dict:
    """A valid group of ``size`` sequences of ``length`` tokens (prompt 2, completion the rest)."""
    sequences = [[1, 2, *range(10 + i, 10 + i + length - 2)] for i in range(size)]
    return {
        "tokens": sequences,
        "masks": [[-100, -100, *s[2:]] for s in sequences],
        "scores": [float(i % 2) for i in range(size)],
        "env_id": env_id,
    }


class Run:
    """A real Atropos API + a real bridge (port 0) with a registered trainer, watched closely."""

    def __init__(self, tmp_path: Path, *, batch_size: int, max_token_len: int = 64, **bridge) -> None:
        self.api = atropos_api.AtroposAPI().start()
        self.cfg = BridgeConfig(
            atropos_url=self.api.url,
            spool_dir=str(tmp_path / "spool"),
            poll_interval_s=0.05,
            poll_max_interval_s=0.2,
            request_timeout_s=20,
            atropos_watch_s=0.2,
            stall_after_s=0.5,
            **bridge,
        )
        self.service = build_service(self.cfg)
        self.server, port = create_server(self.cfg, self.service, "127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.client = BridgeClient(self.address, timeout_s=20)
        self.client.register_run(
            run_name="stalls",
            batch_size=batch_size,
            max_token_len=max_token_len,
            starting_step=0,
            num_steps=10,
        )
        self.config_path = tmp_path / "config.yaml"
        self.run_dir = tmp_path / "run"
        self.config_path.write_text(
            f"bridge: {{address: '{self.address}', atropos_watch_s: 0.2}}\nlogging: {{run_dir: '{self.run_dir}'}}\n"
        )

    def close(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.service.pipeline.stop()
        self.service.stop_watch()
        self.service.atropos.close()
        self.api.close()

    def register_env(
        self, name: str, *, group_size: int = 2, min_batch_allocation: float | None = None
    ) -> int:
        """``POST /register-env`` until the API accepts (it waits for the trainer's first ``/batch``)."""
        body = {"max_token_length": 64, "desired_name": name, "weight": 1.0, "group_size": group_size}
        if min_batch_allocation is not None:
            body["min_batch_allocation"] = min_batch_allocation

        def attempt():
            answer = httpx.post(f"{self.api.url}/register-env", json=body, timeout=30).json()
            return answer if answer.get("status") == "success" else None

        return _wait_for(attempt, f"/register-env of {name}")["env_id"]

    def post(self, groups: list[dict]) -> None:
        httpx.post(f"{self.api.url}/scored_data_list", json=groups, timeout=30).raise_for_status()

    def wait_for_stall(self, code: str, *, containing: str = "", env_count: int | None = None):
        """Poll GetStatus until ``code`` is named (with ``containing`` in its message); returns the status."""

        def named():
            status = self.client.status()
            if env_count is not None and len(status.atropos.envs) != env_count:
                return None
            hits = [s for s in status.stalls if s.code == code and containing in s.message]
            return status if hits else None

        return _wait_for(named, f"stall {code!r} containing {containing!r}")

    def status_cli(self, capsys, *extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = status_cli.main(["--config", str(self.config_path), *extra])
        return code, capsys.readouterr().out


@pytest.fixture()
def runs(tmp_path):
    made: list[Run] = []

    def make(**kwargs) -> Run:
        run = Run(tmp_path / f"run{len(made)}", **kwargs)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


def test_no_groups_without_and_with_registered_envs(runs, capsys):
    run = runs(batch_size=4)
    status = run.wait_for_stall("no_groups", containing="no environment is registered")
    assert status.atropos.reachable and status.atropos.batch_size == 4 and status.atropos.queued_groups == 0

    code, out = run.status_cli(capsys)
    assert code == 1
    assert "STALLED" in out and "no_groups: no environment is registered" in out
    assert "no environment registered" in out and "trainer    no step logged yet" in out

    env_id = run.register_env("silent")
    status = run.wait_for_stall("no_groups", containing="scores are all equal", env_count=1)
    assert f"env {env_id}" in status.stalls[0].message
    assert [e.env_id for e in status.atropos.envs] == [env_id]

    # Enumerating envs costs a 500 (and a traceback in the API's log) per probe past the last one; once
    # the known envs' weight shares add up to 1 the watcher stops probing.
    errors = run.api.output().count("Exception in ASGI application")
    seen: set[float] = set()
    _wait_for(lambda: seen.add(run.service.watch.view.observed_at) or len(seen) >= 20, "20 more readings")
    assert run.api.output().count("Exception in ASGI application") == errors


def test_quiet_env_with_minimum_is_named_then_disconnected(runs, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="atropos_megatron.bridge")
    run = runs(batch_size=4)
    busy = run.register_env("busy")
    quiet = run.register_env("quiet", min_batch_allocation=0.5)
    run.post([_group(busy) for _ in range(3)])  # 6 sequences: enough for a batch of 4, but env 1 has none

    status = run.wait_for_stall("quiet_env_with_minimum", containing=f"env {quiet} (no group queued")
    assert f"env {busy} " not in status.stalls[0].message
    assert status.atropos.queued_groups == 3 and status.atropos.min_allocation_claimed == pytest.approx(0.5)
    assert status.batches_fetched == 0

    code, out = run.status_cli(capsys, "--json")
    assert code == 1
    report = json.loads(out)
    assert not report["healthy"] and [s["code"] for s in report["stalls"]] == ["quiet_env_with_minimum"]
    assert [e["envId"] for e in report["bridge"]["atropos"]["envs"]] == [str(busy), str(quiet)]  # int64: text

    # Turn the option on in the running bridge: it disconnects the quiet env, and a batch forms.
    run.service.cfg.disconnect_quiet_envs_s = 0.01
    status = _wait_for(
        lambda: (s := run.client.status()).queue_depth >= 1 and s, "a batch after the disconnect"
    )
    assert [e.disconnected for e in status.atropos.envs] == [False, True]
    _wait_for(
        lambda: any(f"disconnected Atropos env {quiet}" in r.getMessage() for r in caplog.records),
        "the disconnect's log line",
    )
    assert sum(f"disconnected Atropos env {quiet}" in r.getMessage() for r in caplog.records) == 1

    run.run_dir.mkdir()
    (run.run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 7, "time_unix": time.time(), "perf/tokens_per_s": 1234.0}) + "\n"
    )
    code, out = run.status_cli(capsys)
    assert code == 0, out
    assert "healthy: no stall named" in out and "trainer    step 7" in out and "1,234 tokens/s" in out
    batch = run.client.next_batch(wait_s=30)
    assert {g.env_id for g in batch.groups} == {busy}


def test_batch_too_large(runs):
    run = runs(batch_size=64)
    env_id = run.register_env("slow")
    run.post([_group(env_id), _group(env_id)])  # 4 of 64 sequences, then nothing more
    status = run.wait_for_stall("batch_too_large", containing="of the 64 a batch needs")
    assert "~4 sequences" in status.stalls[0].message
    assert status.atropos.queued_groups == 2 and status.atropos.largest_group == 2


def test_groups_rejected(runs, capsys):
    run = runs(batch_size=4, max_token_len=8)
    run.post([_group(None, length=9), _group(None, length=9)])  # one Atropos batch, every sequence too long
    status = run.wait_for_stall("groups_rejected", containing="too_long")
    assert "2 since its last good batch" in status.stalls[0].message
    assert status.rejected_groups["too_long"] == 2 and status.batches_fetched == 1 and status.queue_depth == 0
    code, out = run.status_cli(capsys)
    assert code == 1 and "rejected groups: too_long 2" in out and "groups_rejected:" in out


def test_status_cli_exit_2_for_a_bad_config_or_no_bridge(tmp_path, capsys):
    from tests.atropos_api import free_port

    assert status_cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "bad config" in capsys.readouterr().err
    config = tmp_path / "config.yaml"
    config.write_text(f"bridge: {{address: '127.0.0.1:{free_port()}'}}\n")
    assert status_cli.main(["--config", str(config), "--timeout", "5"]) == 2
    assert "cannot be reached" in capsys.readouterr().err
