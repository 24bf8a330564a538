"""`make gpu-check`'s driver without a GPU: the stage commands carry the issue's sizes, a stage that runs
out of time is killed and reported, and the RESULTS.md entry holds the numbers (all CPU, ~1 s)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def test_dry_run_lists_the_three_stages_with_the_issue_sizes():
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = {line.split(" ", 1)[0]: line for line in done.stdout.splitlines()}
    assert (
        "-m pytest -m gpu" in lines["gpu-tests"] and "tests/unit/test_kernels_cuda.py" in lines["gpu-tests"]
    )
    for flag in ("--device cuda", "--tokens 16384", "--vocab 151936", "--dtype bf16"):
        assert flag in lines["kernels"]
    for flag in ("--device cuda", "--dtype bf16", "--hidden 2048", "--vocab 151936", "--sequences 64"):
        assert flag in lines["trainer"]
    assert "total budget 460 s" in done.stdout  # inside the 8 minutes with the wheel install


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    def run(name: str, code: str, limit_s: float) -> dict:
        stage = gpu_check.Stage(
            name, name, [sys.executable, "-c", code], tmp_path / f"{name}.json", read_json
        )
        return gpu_check.run_stage(stage, limit_s, gpu_check.stage_env(), tmp_path)

    def read_json(output: Path, log: Path) -> tuple[dict, list[str]]:
        return json.loads(output.read_text()), []

    ok = run("ok", f"print('hi'); open({str(tmp_path / 'ok.json')!r}, 'w').write('{{\"x\": 1}}')", 30)
    assert ok["status"] == "passed" and ok["numbers"] == {"x": 1} and ok["tail"] == ["hi"]
    # The limit leaves a busy machine's interpreter ample time to start and print; the sleep outlasts it.
    slow = run("slow", "import time; print('started', flush=True); time.sleep(600)", 5)
    assert slow["status"] == "timed out" and slow["seconds"] < 15 and slow["tail"] == ["started"]
    assert "started" in (tmp_path / "gpu_check.slow.log").read_text()
    stale = run("stale", "pass", 30)  # exits 0 but writes no numbers
    assert stale["status"] == "failed" and "not written by this run" in stale["problems"][0]


def test_kernel_rows_are_relative_to_naive_and_to_the_hbm_floor(tmp_path):
    row = {"logits_bytes": 10**9, "copy_bandwidth_Bps": 3e12}
    report = {
        "tokens": 16384, "vocab": 151936, "dtype": "bf16",
        "rows": [
            {"op": "grpo", "variant": "naive", "median_s": 0.1, "extra_peak_bytes": 40 * 2**30, **row},
            {"op": "grpo", "variant": "triton", "median_s": 0.002, "extra_peak_bytes": 2**30, **row},
        ],
    }  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps(report))
    numbers, problems = gpu_check.summarize_kernels(tmp_path / "k.json", tmp_path / "log")
    triton = numbers["rows"][1]
    assert triton["speedup_vs_naive"] == 50 and triton["mem_vs_naive"] == 1 / 40
    assert abs(triton["hbm_floor_ms"] - 1.0) < 1e-9 and abs(triton["vs_floor"] - 2.0) < 1e-9
    assert "logprobs/naive" in numbers["missing"] and problems  # a variant that did not run fails the stage


def test_pytest_counts_and_measured_lines(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="4" failures="0" errors="0" skipped="1"/></testsuites>'
    )
    (tmp_path / "log").write_text(
        "...\n==== measured ====\ntest_a[bf16]: cuda bf16 V=151936: values 3.1e-03\n==== 3 passed ====\n"
    )
    numbers, problems = gpu_check.summarize_tests(tmp_path / "j.xml", tmp_path / "log")
    assert (numbers["passed"], numbers["skipped"], problems) == (3, 1, [])
    assert numbers["measured"] == ["test_a[bf16]: cuda bf16 V=151936: values 3.1e-03"]


def fake_results() -> dict:
    stage = {"limit_s": 200.0, "returncode": 0, "log": "benchmarks/out/x.log", "tail": [], "problems": []}
    kernels = {
        "op": "grpo", "variant": "triton-inplace", "median_ms": 12.34, "extra_peak_mib": 96.0,
        "mem_vs_naive": 0.004, "speedup_vs_naive": 7.89, "hbm_floor_ms": 4.56, "vs_floor": 2.71,
        "copy_bandwidth_GBps": 3210.0,
    }  # fmt: skip
    trainer = {
        "parameters": 1_340_000_000, "tokens_per_step": 12345.0, "speedup": 1.42, "peak_tflops": 989.0,
        "first_step_loss": {"trainer": -0.0123, "baseline": -0.0123},
        "trainer": {"step_s": 0.456, "tokens_per_s": 27072.0, "mfu": 0.293},
        "baseline": {"step_s": 0.648, "tokens_per_s": 19051.0, "mfu": 0.206},
    }  # fmt: skip
    return {
        "device": "NVIDIA H100 80GB HBM3", "device_memory_gib": 79.2, "date": "2026-12-06",
        "python": "3.12.3", "commit": "abc1234", "total_s": 301.0, "budget_s": 460.0,
        "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0", "megatron-core": "0.16.1"},
        "stages": [
            stage | {"name": "gpu-tests", "title": "GPU tests", "status": "passed", "seconds": 41.0,
                     "command": "python3 -m pytest -m gpu", "numbers": {
                         "passed": 4, "failed": 0, "skipped": 0, "measured": ["t[bf16]: grads 2.5e-03"]}},
            stage | {"name": "kernels", "title": "GRPO kernels", "status": "timed out", "seconds": 180.0,
                     "command": "python3 benchmarks/bench_grpo_kernels.py --tokens 16384", "numbers": {},
                     "tail": ["grpo: fwd+bwd", "naive ..."], "problems": ["no result within 180 s"]},
            stage | {"name": "trainer", "title": "Trainer step", "status": "passed", "seconds": 80.0,
                     "command": "python3 benchmarks/bench_trainer_step.py", "numbers": trainer},
        ],
    }, kernels  # fmt: skip


def test_results_section_has_the_numbers_and_goes_below_the_intro():
    results, kernel_row = fake_results()
    section = gpu_check.render_results_section(results)
    assert section.startswith("## GPU check: GPU tests, GRPO kernels, Trainer step (2026-12-06, NVIDIA H100")
    for text in ("commit abc1234", "torch 2.11.0+cu130", "triton 3.6.0", "megatron-core 0.16.1"):
        assert text in section
    assert "| GRPO kernels | timed out (no result within 180 s) | 180 | 200 |" in section
    assert "naive ..." in section  # the timed-out stage's tail
    assert "| Megatron trainer | 0.456 | 27,072 | 29.3% | 1.42 |" in section
    assert "1.34B parameters" in section and "- t[bf16]: grads 2.5e-03" in section
    assert "python3 benchmarks/bench_trainer_step.py\n```" in section

    kernels = results["stages"][1] | {"status": "passed", "problems": [], "numbers": {
        "tokens": 16384, "vocab": 151936, "dtype": "bf16", "rows": [kernel_row], "missing": []}}  # fmt: skip
    section = gpu_check.render_results_section(results | {"stages": [kernels]})
    assert "| grpo | triton-inplace | 12.34 | 96 | 0.004 | 7.89 | 4.56 | 2.71 |" in section
    assert "T=16384, V=151936, bf16" in section and "3,210 GB/s" in section

    text = "# Benchmark results\n\nNewest first.\n\n## Older entry\n\nbody\n"
    updated = gpu_check.insert_section(text, section)
    assert updated.startswith("# Benchmark results\n\nNewest first.\n\n## GPU check:")
    assert updated.endswith("```\n\n## Older entry\n\nbody\n")
