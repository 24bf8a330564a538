"""Shared test plumbing: the `gpu` marker skips without CUDA; `report` prints numbers in the summary;
Triton runs interpreted on CPU; a run that leaves a process behind fails and names it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU only under the interpreter, which must be switched on before any module
# defining kernels is imported (and is inherited by the ranks that tests spawn).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPORT: list[str] = []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def report(request):
    """``report("max |diff| = 1e-7")``: a line shown under 'measured' at the end of the run.

    Tests compare against tolerances; this keeps the measured values visible in CI logs too.
    """

    def add(line: str) -> None:
        _REPORT.append(f"{request.node.name}: {line}")

    return add


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measured")
        for line in _REPORT:
            terminalreporter.write_line(line)
    if _LEFTOVERS:
        terminalreporter.section("leftover processes", red=True)
        terminalreporter.write_line(
            f"still running {LEFTOVER_GRACE_S:.0f} s after the last test (killed now; the run fails):"
        )
        for line in _LEFTOVERS:
            terminalreporter.write_line(f"  {line}")


# ------------------------------------------------------------------------------------------------
# Leftover processes
# ------------------------------------------------------------------------------------------------
#
# A suite must leave no process behind. The pytest process makes itself a child subreaper, so every
# process a test starts stays its descendant even when its parent died (an orphan is re-parented to
# pytest instead of init). When the session ends, once every fixture is torn down, the descendants
# still alive are listed, given LEFTOVER_GRACE_S to exit, then named in the report, killed, and the
# run fails.
#
# Two helpers of the pytest process itself are expected, and only as its direct children: the
# multiprocessing resource tracker (it reads its pipe until pytest exits) and torch_shm_manager (it
# serves pytest's own shared tensors until pytest exits). The same helpers of any other process exit
# as soon as that process is gone; if that process is still alive, it is itself reported.

_PR_SET_CHILD_SUBREAPER = 36
LEFTOVER_GRACE_S = float(os.environ.get("ATROPOS_MEGATRON_LEFTOVER_GRACE_S", "30"))
_LEFTOVERS: list[str] = []
_PYTEST_HELPERS = ("torch_shm_manager", "multiprocessing.resource_tracker")


def pytest_configure(config):
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_sessionfinish(session, exitstatus):
    if sys.platform != "linux":
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := _leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for processes that are on their way out, not for a test
    for pid, command in left.items():
        _LEFTOVERS.append(f"pid {pid}: {command}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap_children()
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _leftovers() -> dict[int, str]:
    me = os.getpid()
    return {
        pid: command
        for pid, (ppid, command) in _live_descendants(me).items()
        if not (ppid == me and any(helper in command for helper in _PYTEST_HELPERS))
    }


def _live_descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every live (not zombie) descendant of ``root``: pid -> (parent pid, command line). Reaps
    finished children first."""
    _reap_children()
    parents: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue  # exited meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state not in ("Z", "X"):
            parents.setdefault(int(ppid), []).append(int(entry))
            commands[int(entry)] = command.strip() or stat.split("(", 1)[1].split(")", 1)[0]
    found: dict[int, tuple[int, str]] = {}
    stack = [root]
    while stack:
        parent = stack.pop()
        for child in parents.get(parent, ()):
            found[child] = (parent, commands[child])
            stack.append(child)
    return found


def _reap_children() -> None:
    """Collect the exit status of adopted orphans that finished (they would stay zombies)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
