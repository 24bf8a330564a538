"""Shared test plumbing: the `gpu` marker skips without CUDA; `report` prints numbers in the summary;
Triton runs interpreted on CPU."""

from __future__ import annotations

import os

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
