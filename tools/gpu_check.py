#!/usr/bin/env python
"""`make gpu-check`: the GPU tests, the kernel benchmark and the trainer benchmark on one CUDA device,
in under 8 minutes, with the numbers recorded at the top of benchmarks/RESULTS.md.

GPU time comes in short, rare slots, so everything a GPU must confirm runs from this one command, and a
stage that breaks costs only its own budget: each stage runs in its own process group with a time
limit, a stage that fails or runs out of time is reported (status and the tail of its output) and the
others still run.

Stages, in this order (the tests compile the Triton kernels that the benchmarks then reuse):

  gpu-tests  pytest -m gpu over the test files that carry the marker: the compiled Triton kernels at
             Qwen2's V=151936 against fp64 (tests/unit/test_kernels_cuda.py)
  kernels    benchmarks/bench_grpo_kernels.py at T=16384, V=151936, bf16: token log-probs and the whole
             GRPO loss, fwd+bwd, vs naive PyTorch and vs the HBM floor measured in the same run
  trainer    benchmarks/bench_trainer_step.py on a 1.3B Qwen2-shaped model (hidden 2048, 16 layers,
             vocabulary 151936, 64 sequences, bf16): tokens/s and MFU vs plain HF transformers + torch

Budgets (seconds, --budget STAGE=S to change one): gpu-tests 80, kernels 180, trainer 200; 460 in all,
which leaves the Makefile's wheel install and this script's start inside 8 minutes. A stage may also
use what the stages before it left unused: its limit is the sum of the budgets so far minus the time
already spent.

Writes benchmarks/out/gpu_check.json (device, versions, commit; per stage: command, status, seconds,
key numbers, output tail), benchmarks/out/gpu_check.<stage>.log (each stage's whole output),
benchmarks/out/gpu_check.md (the RESULTS.md section: device, date, versions, commit, a table per stage,
the exact commands) and, unless --no-record, puts that section at the top of benchmarks/RESULTS.md,
right below its intro paragraph (newest first). Where the machine's copy of the repository is not a git
checkout, name the commit (--commit); where its files do not come back, bring gpu_check.json and record
it here with --record-from.

    make gpu-check                                   # python3 (GPU_PY), wheels from .whl/ if present
    python3 tools/gpu_check.py --dry-run             # the stage commands; needs no GPU
    python3 tools/gpu_check.py --stages kernels --no-record --budget kernels=300
    python tools/gpu_check.py --record-from gpu_check.json   # record a run made on another machine

Exit status: 0 every stage passed, 1 a stage failed or timed out, 2 no CUDA device (one line).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# One file on purpose (~500 lines, over the usual ~400): it runs under a GPU machine's bare python3 and
# the unit test loads it by path, so it imports nothing from the repository.
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
TOKENS, VOCAB, DTYPE = 16384, 151936, "bf16"
TRAINER_MODEL = ("--hidden", "2048", "--layers", "16", "--heads", "16", "--kv-heads", "4", "--ffn", "5632")
PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100 SXM and an H200, the denominator of the trainer's MFU."""
BUDGETS_S = {"gpu-tests": 80.0, "kernels": 180.0, "trainer": 200.0}
TAIL_LINES = 30


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    command: list[str]
    output: Path
    """The file the stage's numbers are read from (written during this run, else the stage failed)."""
    summarize: Callable[[Path, Path], tuple[dict, list[str]]]
    """(output, log) -> (key numbers, problems); a problem fails the stage."""


def build_stages(python: str) -> list[Stage]:
    """The three stages with the issue's sizes, run by ``python`` from the repository root."""
    junit = OUT / "gpu_check.gpu-tests.xml"
    kernels_json = OUT / "grpo_kernels.json"
    tests = [
        python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
        f"--junitxml={junit.relative_to(REPO)}", *find_gpu_test_files(),
    ]  # fmt: skip
    kernels = [
        python, "benchmarks/bench_grpo_kernels.py", "--device", "cuda", "--tokens", str(TOKENS),
        "--vocab", str(VOCAB), "--dtype", DTYPE, "--out", str(kernels_json.relative_to(REPO)),
    ]  # fmt: skip
    trainer = [
        python, "benchmarks/bench_trainer_step.py", "--device", "cuda", "--dtype", DTYPE, *TRAINER_MODEL,
        "--vocab", str(VOCAB), "--sequences", "64", "--peak-tflops", f"{PEAK_TFLOPS:g}",
    ]  # fmt: skip
    return [
        Stage("gpu-tests", "GPU tests", tests, junit, summarize_tests),
        Stage("kernels", "GRPO kernels", kernels, kernels_json, summarize_kernels),
        Stage("trainer", "Trainer step", trainer, OUT / "bench_trainer_step.json", summarize_trainer),
    ]


def find_gpu_test_files() -> list[str]:
    """Test files that use the ``gpu`` marker: collecting only those keeps pytest's start short and
    needs none of the other tests' dependencies."""
    found = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").rglob("test_*.py"))
        if "mark.gpu" in path.read_text(errors="replace")
    ]
    return found or ["tests"]


def run_stage(stage: Stage, timeout_s: float, env: dict[str, str], out_dir: Path = OUT) -> dict:
    """Run one stage with live output (prefixed), its whole log on disk and its process group killed at
    the time limit; then read its numbers."""
    log_path = out_dir / f"gpu_check.{stage.name}.log"
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started_at, start = time.time(), time.monotonic()
    print(f"\n=== {stage.name} (limit {timeout_s:.0f} s): {shlex.join(stage.command)}", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            stage.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        pump = threading.Thread(target=_pump, args=(proc, log, tail, stage.name), daemon=True)
        pump.start()
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout_s)
            with contextlib.suppress(ProcessLookupError):  # a worker left behind would hold the GPU
                os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = _kill_group(proc)
        except BaseException:  # Ctrl-C: the stage runs in its own session and would not get it
            _kill_group(proc)
            raise
        pump.join(timeout=10)
    result = {
        "name": stage.name, "title": stage.title, "command": shlex.join(stage.command),
        "limit_s": round(timeout_s, 1), "seconds": round(time.monotonic() - start, 1),
        "returncode": returncode, "log": _display(log_path), "tail": list(tail), "numbers": {},
    }  # fmt: skip
    problems = [f"exit status {returncode}"] if returncode and not timed_out else []
    if timed_out:
        problems.append(f"no result within {timeout_s:.0f} s; process group killed")
    else:
        try:
            result["numbers"], found = stage.summarize(_fresh(stage.output, started_at), log_path)
            problems += found
        except (OSError, ValueError, KeyError, TypeError, ET.ParseError) as exc:
            if not returncode:  # else the exit status says it
                problems.append(f"no numbers: {exc}")
    result["status"] = "timed out" if timed_out else ("failed" if problems else "passed")
    result["problems"] = problems
    return result


def _pump(proc: subprocess.Popen, log: TextIO, tail: collections.deque, name: str) -> None:
    for line in proc.stdout:
        log.write(line)
        tail.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the stage's process group (benchmarks spawn workers), SIGKILL 10 s later."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=wait_s)
    return proc.wait()


def _fresh(path: Path, since: float) -> Path:
    """``path`` if this run wrote it: an older file's numbers must not pass for this run's."""
    if not path.exists() or path.stat().st_mtime < since - 1:
        raise ValueError(f"{_display(path)} was not written by this run")
    return path


def _display(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def summarize_tests(junit: Path, log: Path) -> tuple[dict, list[str]]:
    """Counts from pytest's JUnit XML; the ``report`` fixture's lines from the 'measured' section."""
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    count = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    numbers = {
        "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
        "failed": count["failures"] + count["errors"],
        "skipped": count["skipped"],
        "measured": _measured_lines(log.read_text(errors="replace").splitlines()),
    }
    problems = [f"{numbers['failed']} failed"] if numbers["failed"] else []
    if numbers["passed"] == 0:
        problems.append("no GPU test passed (all skipped: does pytest see the GPU?)")
    return numbers, problems


def _measured_lines(lines: list[str]) -> list[str]:
    """The lines under pytest's ``= measured =`` summary section, up to the next section."""
    start = next((i for i, line in enumerate(lines) if line.startswith("=") and " measured " in line), None)
    if start is None:
        return []
    body = []
    for line in lines[start + 1 :]:
        if line.startswith(("=", "_")):
            break
        body.append(line.strip())
    return body


def summarize_kernels(path: Path, log: Path) -> tuple[dict, list[str]]:
    """Per (op, variant): time, extra peak memory, both relative to naive PyTorch, and the HBM floor
    (read the logits twice, write the gradient once, at the copy bandwidth measured in the run)."""
    report = json.loads(path.read_text())
    rows = []
    for row in report["rows"]:
        naive = next((r for r in report["rows"] if r["op"] == row["op"] and r["variant"] == "naive"), None)
        entry = {
            "op": row["op"], "variant": row["variant"], "median_ms": row["median_s"] * 1e3,
            "extra_peak_mib": row["extra_peak_bytes"] / 2**20,
            "mem_vs_naive": row["extra_peak_bytes"] / max(naive["extra_peak_bytes"], 1) if naive else None,
            "speedup_vs_naive": naive["median_s"] / row["median_s"] if naive else None,
        }  # fmt: skip
        if row.get("copy_bandwidth_Bps"):
            floor_s = 3 * row["logits_bytes"] / row["copy_bandwidth_Bps"]
            entry |= {"hbm_floor_ms": floor_s * 1e3, "vs_floor": row["median_s"] / floor_s}
            entry["copy_bandwidth_GBps"] = row["copy_bandwidth_Bps"] / 1e9
        rows.append(entry)
    bench = _load_module(REPO / "benchmarks" / "bench_grpo_kernels.py")
    ran = {(r["op"], r["variant"]) for r in rows}
    missing = [f"{op}/{v}" for op in bench.OPS for v in bench.VARIANTS if (op, v) not in ran]
    numbers = {key: report[key] for key in ("tokens", "vocab", "dtype")} | {"rows": rows, "missing": missing}
    return numbers, [f"variants that did not run: {', '.join(missing)}"] if missing else []


def summarize_trainer(path: Path, log: Path) -> tuple[dict, list[str]]:
    """Tokens/s, MFU and step time of both sides, the speed-up and the first-step losses (the benchmark
    itself exits 1 when those disagree)."""
    report = json.loads(path.read_text())
    numbers = {key: report[key] for key in ("parameters", "tokens_per_step", "first_step_loss", "speedup")}
    numbers |= {"trainer": report["megatron_trainer"], "baseline": report["hf_torch_baseline"]}
    return numbers | {"peak_tflops": PEAK_TFLOPS}, []


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe_machine(commit: str | None) -> dict:
    """Device, date, versions and commit: what a RESULTS.md entry must name."""
    import torch

    try:
        device = torch.cuda.get_device_name(0)
        memory_gib = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except RuntimeError as exc:  # the results of the stages still count
        device, memory_gib = f"unknown CUDA device ({exc})", None
    versions = {}
    for name in ("torch", "triton", "megatron-core"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "device": device, "device_memory_gib": memory_gib,
        "date": datetime.date.today().isoformat(), "python": platform.python_version(),
        "versions": versions, "commit": commit or _git_commit(),
    }  # fmt: skip


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; pass --commit)"


def render_results_section(results: dict) -> str:
    """The RESULTS.md entry of one run: heading, stage table, each stage's numbers, exact commands.

    Pure (``results`` is gpu_check.json's content), so that a run made elsewhere can be recorded here.
    """
    stages = results["stages"]
    passed = sum(s["status"] == "passed" for s in stages)
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    lines = [
        f"## GPU check: {', '.join(s['title'] for s in stages)} ({results['date']}, {results['device']})",
        "",
        f"`make gpu-check` (`tools/gpu_check.py`) on {results['device']} ({results['device_memory_gib']} GiB),"
        f" commit {results['commit']}, {versions}, Python {results['python']}. {passed} of {len(stages)}"
        f" stages passed in {results['total_s']:.0f} s.",
        "",
        "| stage | status | seconds | limit s |",
        "|---|---|---:|---:|",
        *(f"| {s['title']} | {_status(s)} | {s['seconds']:.0f} | {s['limit_s']:.0f} |" for s in stages),
    ]
    for stage in stages:
        if stage["numbers"] and stage["name"] in RENDERERS:
            lines += ["", *RENDERERS[stage["name"]](stage["numbers"], stage["title"])]
        if stage["status"] != "passed":
            lines += ["", f"{stage['title']}: {stage['status']}; last lines of its output:", "", "```text"]
            lines += [*stage["tail"][-15:], "```"]
    lines += ["", "Commands, in this order, from the repository root:", "", "```bash"]
    lines += [stage["command"] for stage in stages] + ["```", ""]
    return "\n".join(lines)


def _status(stage: dict) -> str:
    return stage["status"] + (f" ({'; '.join(stage['problems'])})" if stage.get("problems") else "")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_tests(numbers: dict, title: str) -> list[str]:
    lines = [
        f"**{title}** (compiled Triton kernels vs fp64): {numbers['passed']} passed, "
        f"{numbers['failed']} failed, {numbers['skipped']} skipped."
    ]
    if numbers["measured"]:
        lines += ["", *(f"- {line}" for line in numbers["measured"])]
    return lines


def render_kernels(numbers: dict, title: str) -> list[str]:
    bandwidth = next((r["copy_bandwidth_GBps"] for r in numbers["rows"] if "copy_bandwidth_GBps" in r), None)
    lines = [
        f"**{title}** (T={numbers['tokens']}, V={numbers['vocab']}, {numbers['dtype']}, fwd+bwd; baseline: "
        "naive PyTorch `log_softmax` in fp32; HBM floor: the logits read twice and the gradient written "
        f"once at the `copy_` bandwidth measured in the same run, {_fmt(bandwidth, ',.0f')} GB/s):",
        "",
        "| op | variant | median ms | extra peak MiB | mem vs naive | speed-up vs naive | HBM floor ms | vs floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in numbers["rows"]:
        lines.append(
            f"| {r['op']} | {r['variant']} | {r['median_ms']:.2f} | {r['extra_peak_mib']:,.0f} | "
            f"{_fmt(r['mem_vs_naive'], '.3f')} | {_fmt(r['speedup_vs_naive'], '.2f')} | "
            f"{_fmt(r.get('hbm_floor_ms'), '.2f')} | {_fmt(r.get('vs_floor'), '.2f')} |"
        )
    if numbers["missing"]:
        lines += ["", f"Did not run: {', '.join(numbers['missing'])}."]
    return lines


def render_trainer(numbers: dict, title: str) -> list[str]:
    loss = numbers["first_step_loss"]
    lines = [
        f"**{title}** (Qwen2-shaped, {numbers['parameters'] / 1e9:.2f}B parameters, "
        f"{numbers['tokens_per_step']:,.0f} tokens per step; MFU = 8 x parameters x tokens / step time / "
        f"{numbers['peak_tflops']:g} TFLOP/s; first-step loss {loss['trainer']:.6g} vs {loss['baseline']:.6g}):",
        "",
        "| trainer | step s | tokens/s | MFU | speed-up vs HF |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, side, speedup in (
        ("Megatron trainer", numbers["trainer"], numbers["speedup"]),
        ("HF transformers + torch (baseline)", numbers["baseline"], 1.0),
    ):
        mfu = side.get("mfu")
        lines.append(
            f"| {name} | {side['step_s']:.3f} | {side['tokens_per_s']:,.0f} | "
            f"{_fmt(None if mfu is None else 100 * mfu, '.1f')}% | {speedup:.2f} |"
        )
    return lines


RENDERERS = {"gpu-tests": render_tests, "kernels": render_kernels, "trainer": render_trainer}


def insert_section(text: str, section: str) -> str:
    """``section`` right below RESULTS.md's intro paragraph, above the newest entry (newest first)."""
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    head = "".join(lines[:at])
    if head and not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    return head + section.rstrip("\n") + "\n\n" + "".join(lines[at:])


def record(results: dict, results_md: Path = RESULTS) -> None:
    section = render_results_section(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.md").write_text(section)
    results_md.write_text(insert_section(results_md.read_text(), section))
    print(f"recorded in {_display(results_md)} (also {_display(OUT / 'gpu_check.md')})")


def stage_env() -> dict[str, str]:
    """The stages see the repository (the benchmarks' workers import atropos_megatron) and the real GPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)  # set, the "compiled" kernels would run interpreted
    return env


def run_all(stages: list[Stage], budgets: dict[str, float]) -> dict:
    """Every stage, each limited to the budgets so far minus the time spent (unused time rolls over)."""
    OUT.mkdir(parents=True, exist_ok=True)
    env, start, planned, done = stage_env(), time.monotonic(), 0.0, []
    for stage in stages:
        planned += budgets[stage.name]
        done.append(run_stage(stage, max(1.0, planned - (time.monotonic() - start)), env, OUT))
    return {"total_s": round(time.monotonic() - start, 1), "budget_s": planned, "stages": done}


def print_summary(results: dict) -> None:
    print("\n=== gpu-check summary")
    for stage in results["stages"]:
        print(f"{stage['name']:<10}{stage['seconds']:>5.0f} s  {_status(stage)}  (log: {stage['log']})")
        if stage["status"] != "passed":
            print("\n".join(f"    | {line}" for line in stage["tail"][-15:]))
    print(f"total {results['total_s']:.0f} s of {results['budget_s']:.0f} s budgeted")


def cuda_problem() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported: {exc}"
    return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands and exit 0")
    parser.add_argument(
        "--stages", nargs="+", choices=list(BUDGETS_S), default=list(BUDGETS_S), help="default: all three"
    )
    parser.add_argument(
        "--budget", action="append", default=[], metavar="STAGE=SECONDS", help="change one stage's budget"
    )
    parser.add_argument("--no-record", action="store_true", help="leave benchmarks/RESULTS.md alone")
    parser.add_argument("--commit", help="the commit to record (default: from git, if this is a checkout)")
    parser.add_argument(
        "--record-from",
        type=Path,
        metavar="JSON",
        help="record a gpu_check.json made elsewhere (no GPU needed)",
    )
    args = parser.parse_args(argv)
    args.budgets = dict(BUDGETS_S)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS_S or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item}: expected STAGE=SECONDS with STAGE in {', '.join(BUDGETS_S)}")
        args.budgets[name] = float(seconds)
    if args.record_from and args.no_record:
        parser.error("--record-from records; drop --no-record")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record_from:
        results = json.loads(args.record_from.read_text())
        record(results | ({"commit": args.commit} if args.commit else {}))
        return 0
    stages = [stage for stage in build_stages(sys.executable) if stage.name in args.stages]
    if args.dry_run:
        for stage in stages:
            print(f"{stage.name} (budget {args.budgets[stage.name]:.0f} s): {shlex.join(stage.command)}")
        print(f"total budget {sum(args.budgets[s.name] for s in stages):.0f} s; from {REPO}")
        return 0
    problem = cuda_problem()
    if problem:
        print(
            f"gpu-check: no CUDA device ({problem}); run it on a GPU machine (--dry-run: the commands)",
            file=sys.stderr,
        )
        return 2
    results = run_all(stages, args.budgets)
    results = describe_machine(args.commit) | results  # after the stages: no CUDA context held beside them
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    if not args.no_record:
        record(results)
    return 0 if all(stage["status"] == "passed" for stage in results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
