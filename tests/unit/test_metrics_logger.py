"""MetricsLogger sinks (JSONL, TensorBoard, wandb), resume truncation, read_metrics, format_step_line."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from atropos_megatron.config import LoggingConfig
from atropos_megatron.trainer.metrics import MetricsLogger, format_step_line, read_metrics


def _cfg(tmp_path, **overrides) -> LoggingConfig:
    return LoggingConfig(run_dir=str(tmp_path / "run"), **overrides)


def _steps(records) -> list[int]:
    return [record["step"] for record in records]


def _strict_json(line: str):
    """json.loads that refuses NaN/Infinity, which Python's default parser would accept."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


# ------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------


def test_jsonl_line_per_step_keeps_ints_and_converts_tensor_and_numpy_scalars(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg, run_name="t") as metrics:
        for step in range(3):
            metrics.log(
                step,
                {
                    "reward/mean": torch.tensor(0.5 + step),
                    "optim/lr": np.float64(1e-6),
                    "weights/version": step + 1,
                    "data/sequences": np.int64(64),
                    "grpo/clip_frac_low": 0.25,
                    "bridge/healthy": True,
                },
            )
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [_strict_json(line) for line in lines]
    assert _steps(records) == [0, 1, 2]
    first = records[0]
    assert list(first)[:2] == ["step", "time_unix"]
    assert isinstance(first["time_unix"], float) and first["time_unix"] > 1.6e9
    assert first["reward/mean"] == 0.5 and records[2]["reward/mean"] == 2.5
    assert first["optim/lr"] == 1e-6
    assert type(first["weights/version"]) is int and records[2]["weights/version"] == 3
    assert type(first["data/sequences"]) is int
    assert first["bridge/healthy"] == 1 and type(first["bridge/healthy"]) is int
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records


def test_nonfinite_values_are_written_as_null_counted_and_warned_once_per_key(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="atropos_megatron.trainer.metrics")
    with MetricsLogger(_cfg(tmp_path), run_name="t") as metrics:
        metrics.log(0, {"grpo/pg_loss": float("nan"), "optim/grad_norm": float("inf"), "ok": 1.0})
        metrics.log(1, {"grpo/pg_loss": torch.tensor(float("nan")), "optim/grad_norm": -math.inf})
        metrics.log(2, {"grpo/pg_loss": 0.5})
        assert metrics.nonfinite_counts == {"grpo/pg_loss": 2, "optim/grad_norm": 2}
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert records[0]["grpo/pg_loss"] is None and records[0]["optim/grad_norm"] is None
    assert records[0]["ok"] == 1.0
    assert records[1]["optim/grad_norm"] is None and records[2]["grpo/pg_loss"] == 0.5
    per_step_warnings = [r for r in caplog.records if "written as null" in r.getMessage()]
    assert len(per_step_warnings) == 2  # one per key, not one per occurrence


def test_resume_drops_lines_from_the_resume_step_and_a_crash_truncated_line(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg, run_name="t") as metrics:
        for step in range(6):
            metrics.log(step, {"reward/mean": float(step)})
    path = tmp_path / "run" / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step":6,"reward/me')  # the process died mid-line (not possible with our writer)

    with MetricsLogger(cfg, run_name="t", resume_step=3) as metrics:
        metrics.log(3, {"reward/mean": 30.0})
        metrics.log(4, {"reward/mean": 40.0})
    records = read_metrics(path)
    assert _steps(records) == [0, 1, 2, 3, 4]
    assert [r["reward/mean"] for r in records] == [0.0, 1.0, 2.0, 30.0, 40.0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_resume_without_an_earlier_file_starts_one(tmp_path):
    with MetricsLogger(_cfg(tmp_path), run_name="t", resume_step=10) as metrics:
        metrics.log(10, {"a": 1.0})
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [10]


def test_fresh_run_replaces_an_earlier_metrics_file(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg, run_name="t") as metrics:
        for step in range(4):
            metrics.log(step, {"a": 1.0})
    with MetricsLogger(cfg, run_name="t") as metrics:
        metrics.log(0, {"a": 2.0})
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["a"] == 2.0
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 1


def test_interval_writes_first_multiples_forced_and_the_last_step_on_close(tmp_path):
    metrics = MetricsLogger(_cfg(tmp_path, log_interval_steps=3), run_name="t")
    written = [metrics.log(step, {"a": float(step)}) for step in range(1, 9)]
    assert written == [True, False, True, False, False, True, False, False]
    assert metrics.log(9, {"a": 9.0}) is True  # a multiple again: nothing pending any more
    assert metrics.log(10, {"a": 10.0}, force=True) is True
    assert metrics.log(11, {"a": 11.0}) is False
    metrics.close()
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [1, 3, 6, 9, 10, 11]


def test_log_rejects_reserved_keys_non_numbers_and_use_after_close(tmp_path):
    metrics = MetricsLogger(_cfg(tmp_path, log_interval_steps=10), run_name="t")
    with pytest.raises(ValueError, match="reserved"):
        metrics.log(0, {"step": 1.0})
    with pytest.raises(TypeError, match="reward/mean"):
        metrics.log(3, {"reward/mean": "high"})  # checked even though step 3 is skipped
    metrics.close()
    metrics.close()  # idempotent
    with pytest.raises(ValueError, match="after close"):
        metrics.log(1, {"a": 1.0})


def test_jsonl_write_failure_warns_and_training_continues(tmp_path, caplog, monkeypatch):
    import atropos_megatron.trainer.metrics as module

    metrics = MetricsLogger(_cfg(tmp_path), run_name="t")
    metrics.log(0, {"a": 1.0})
    monkeypatch.setattr(module, "_write_all", lambda fd, line: (_ for _ in ()).throw(OSError("disk full")))
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        metrics.log(1, {"a": 2.0})
        metrics.log(2, {"a": 3.0})
    metrics.close()
    assert sum("disk full" in r.getMessage() for r in caplog.records) == 1
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [0]


# ------------------------------------------------------------------------------------------------
# read_metrics
# ------------------------------------------------------------------------------------------------


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":0,"a":1.0}\n\n{"step":1,"a":null}\n{"step":2,"a"')
    records = read_metrics(path)
    assert records == [{"step": 0, "a": 1.0}, {"step": 1, "a": None}]
    assert np.isnan(np.asarray([r["a"] for r in records], dtype=float)[1])


def test_read_metrics_raises_on_a_malformed_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":0}\n{"step":1,\n{"step":2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------


def _tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_are_written_and_read_back(tmp_path):
    cfg = _cfg(tmp_path, tensorboard=True)
    with MetricsLogger(cfg, run_name="t", config={"grpo": {"clip_low": 0.2}}) as metrics:
        for step in range(3):
            metrics.log(step, {"reward/mean": 0.5 * step, "optim/lr": 1e-6, "grpo/pg_loss": float("nan")})
    scalars = _tb_scalars(tmp_path / "run" / "tb")
    assert scalars["reward/mean"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert [step for step, _ in scalars["optim/lr"]] == [0, 1, 2]
    assert all(math.isnan(value) for _, value in scalars["grpo/pg_loss"])  # TB takes NaN as is


def test_tensorboard_resume_purges_the_overlapping_steps(tmp_path):
    cfg = _cfg(tmp_path, tensorboard=True)
    with MetricsLogger(cfg, run_name="t") as metrics:
        for step in range(5):
            metrics.log(step, {"reward/mean": float(step)})
    with MetricsLogger(cfg, run_name="t", resume_step=2) as metrics:
        for step in range(2, 4):
            metrics.log(step, {"reward/mean": 10.0 * step})
    assert _tb_scalars(tmp_path / "run" / "tb")["reward/mean"] == [(0, 0.0), (1, 1.0), (2, 20.0), (3, 30.0)]


# ------------------------------------------------------------------------------------------------
# wandb
# ------------------------------------------------------------------------------------------------


class _FakeRun:
    def __init__(self, fail_on_log: bool = False) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.exit_code: int | None = None
        self.fail_on_log = fail_on_log

    def log(self, values, step):
        if self.fail_on_log:
            raise ConnectionError("wandb backend gone")
        self.logged.append((step, dict(values)))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording init kwargs: no network, no service process."""
    module = types.SimpleNamespace(inits=[], runs=[], fail_on_log=False)

    def init(**kwargs):
        module.inits.append(kwargs)
        run = _FakeRun(fail_on_log=module.fail_on_log)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_project_config_and_a_stable_id_reused_on_resume(tmp_path, fake_wandb):
    cfg = _cfg(tmp_path, wandb_project="proj")
    with MetricsLogger(cfg, run_name="exp1", config={"steps": 10}) as metrics:
        metrics.log(0, {"reward/mean": torch.tensor(0.25), "weights/version": 1})
    init = fake_wandb.inits[0]
    assert init["project"] == "proj" and init["name"] == "exp1" and init["config"] == {"steps": 10}
    assert init["resume"] == "allow" and init["dir"] == str(tmp_path / "run")
    assert "mode" not in init  # wandb reads WANDB_MODE itself
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    assert init["id"] == run_id
    assert fake_wandb.runs[0].logged == [(0, {"reward/mean": 0.25, "weights/version": 1})]
    assert fake_wandb.runs[0].exit_code == 0

    with MetricsLogger(cfg, run_name="exp1", resume_step=1):
        pass
    assert fake_wandb.inits[1]["id"] == run_id
    with MetricsLogger(cfg, run_name="exp2"):  # a fresh run in the same directory: a new wandb run
        pass
    assert fake_wandb.inits[2]["id"] != run_id


def test_wandb_run_is_marked_failed_when_the_context_exits_with_an_error(tmp_path, fake_wandb):
    with pytest.raises(RuntimeError), MetricsLogger(_cfg(tmp_path, wandb_project="p"), run_name="t"):
        raise RuntimeError("step failed")
    assert fake_wandb.runs[0].exit_code == 1


def test_wandb_log_failure_drops_wandb_but_keeps_jsonl(tmp_path, fake_wandb, caplog):
    fake_wandb.fail_on_log = True
    with (
        caplog.at_level(logging.WARNING),
        MetricsLogger(_cfg(tmp_path, wandb_project="p"), run_name="t") as m,
    ):
        m.log(0, {"a": 1.0})
        m.log(1, {"a": 2.0})
    assert sum("wandb backend gone" in r.getMessage() for r in caplog.records) == 1
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [0, 1]


def test_wandb_missing_or_failing_init_warns_once_and_training_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with (
        caplog.at_level(logging.WARNING),
        MetricsLogger(_cfg(tmp_path, wandb_project="p"), run_name="t") as m,
    ):
        m.log(0, {"a": 1.0})
    assert sum("wandb cannot be imported" in r.getMessage() for r in caplog.records) == 1

    def broken_init(**kwargs):
        raise PermissionError("no API key")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=broken_init))
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING),
        MetricsLogger(_cfg(tmp_path, wandb_project="p"), run_name="t") as m,
    ):
        m.log(0, {"a": 1.0})
    assert sum("no API key" in r.getMessage() for r in caplog.records) == 1
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [0]


def test_real_wandb_in_disabled_mode_logs_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsLogger(_cfg(tmp_path, wandb_project="p"), run_name="t", config={"a": 1}) as metrics:
        assert metrics._wandb is not None
        metrics.log(0, {"reward/mean": 0.5, "grpo/pg_loss": float("nan")})
    assert (tmp_path / "run" / "wandb_id").read_text().strip()
    assert _steps(read_metrics(tmp_path / "run" / "metrics.jsonl")) == [0]


# ------------------------------------------------------------------------------------------------
# format_step_line and import cost
# ------------------------------------------------------------------------------------------------


def test_format_step_line_renders_fields_in_fixed_order():
    line = format_step_line(
        12,
        100,
        {
            "time/sync_s": 0.431,
            "perf/tokens_per_s": 1234.5,
            "grpo/kl_ref": 0.0012,
            "rollout/kl": 3e-05,
            "grpo/pg_loss": torch.tensor(-0.01234),
            "reward/std": 0.2314,
            "reward/mean": 0.5123,
            "time/step_s": 4.561,
            "time/wait_s": 0.12,
            "time/compute_s": 4.01,
            "optim/lr": 1e-6,
        },
    )
    assert line == (
        "step 12/100 | reward 0.5123±0.2314 | loss -0.01234 | kl_ref 0.0012 | rollout_kl 3e-05 | 1.23k tok/s"
        " | 4.56s (wait 0.12 compute 4.01 sync 0.43)"
    )


def test_format_step_line_omits_missing_fields():
    assert format_step_line(3, None, {}) == "step 3"
    assert format_step_line(3, 5, {"reward/mean": 1.0, "time/compute_s": 2.0, "reward/std": None}) == (
        "step 3/5 | reward 1 | compute 2.00"
    )
    assert format_step_line(1, 2, {"grpo/loss": 0.5, "grpo/pg_loss": 9.0}) == "step 1/2 | loss 0.5"


def test_importing_the_module_pulls_in_neither_torch_nor_wandb_nor_tensorboard():
    code = (
        "import sys, atropos_megatron.trainer.metrics\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'wandb', 'tensorboard'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_a_follower_reads_complete_new_lines_and_starts_over_when_the_file_is_rewritten(tmp_path):
    from atropos_megatron.trainer.metrics import MetricsFollower

    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read_new() == []  # not there yet
    path.write_text('{"step": 1, "r": 0.1}\n{"step": 2, "r"')  # the second line is still being written
    assert [r["step"] for r in follower.read_new()] == [1]
    with path.open("a") as file:
        file.write(": 0.2}\n")
    assert [r["step"] for r in follower.read_new()] == [2]
    replacement = tmp_path / "metrics.tmp"  # a resumed trainer rewrites the file atomically
    replacement.write_text('{"step": 1, "r": 0.1}\n{"step": 2, "r": 0.3}\n')
    replacement.replace(path)
    assert [(r["step"], r["r"]) for r in follower.read_new()] == [(1, 0.1), (2, 0.3)]
    assert follower.read_new() == []
