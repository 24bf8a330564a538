"""Importing the package and its config stays cheap: no torch.distributed, megatron or grpc."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("megatron", "grpc", "torch.distributed", "transformers")


@pytest.mark.parametrize("module", ["atropos_megatron", "atropos_megatron.config", "atropos_megatron.cli"])
def test_module_imports_without_heavy_dependencies(module):
    code = (
        f"import sys, {module}\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}]\n"
        "print(','.join(sorted(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"{module} pulls in: {out.strip()}"
