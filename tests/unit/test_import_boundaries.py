"""Import boundaries: the package, config and CLI import cheaply; the maths never pulls in Megatron."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ("megatron", "grpc", "transformers")


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("atropos_megatron", (*FRAMEWORKS, "torch")),
        ("atropos_megatron.config", (*FRAMEWORKS, "torch")),
        ("atropos_megatron.cli", (*FRAMEWORKS, "torch")),
        ("atropos_megatron.algo.grpo", FRAMEWORKS),
        ("atropos_megatron.algo.alignment", FRAMEWORKS),
        ("atropos_megatron.data.batching", FRAMEWORKS),
        # The trainer gets its bridge client passed in: the loop itself never loads gRPC.
        ("atropos_megatron.trainer.loop", ("grpc", "megatron")),
        # The bridge runs beside the trainer, often on a CPU-only head node: no torch, no Megatron.
        ("atropos_megatron.bridge.server", ("torch", "megatron", "transformers")),
        ("atropos_megatron.bridge.client", ("torch", "megatron", "transformers")),
    ],
)
def test_module_does_not_import(module, forbidden):
    code = (
        f"import sys, {module}\n"
        f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"{module} pulls in: {out.strip()}"
