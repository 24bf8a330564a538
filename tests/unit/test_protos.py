"""The committed gRPC stubs are what `make protos` generates from the committed .proto file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = Path("atropos_megatron/bridge/v1")


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run(
        ["bash", str(REPO / "tools" / "gen_protos.sh"), str(tmp_path)],
        check=True, cwd=REPO, env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    fresh = sorted(p.name for p in (tmp_path / GENERATED).iterdir())
    assert fresh == ["bridge_pb2.py", "bridge_pb2.pyi", "bridge_pb2_grpc.py"]
    for name in fresh:
        committed = (REPO / GENERATED / name).read_text()
        assert (tmp_path / GENERATED / name).read_text() == committed, (
            f"{GENERATED / name} is stale: run `make protos` and commit the result"
        )


def test_stubs_import_and_describe_the_service():
    from atropos_megatron.bridge.v1 import bridge_pb2, bridge_pb2_grpc

    service = bridge_pb2.DESCRIPTOR.services_by_name["Bridge"]
    assert [m.name for m in service.methods] == [
        "RegisterRun",
        "GetBatch",
        "AckBatch",
        "CommitCheckpoint",
        "GetStatus",
        "PushWeights",
    ]
    assert hasattr(bridge_pb2_grpc, "BridgeServicer")
