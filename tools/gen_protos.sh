#!/usr/bin/env bash
# Regenerate the Python gRPC stubs from protos/ (run via `make protos`). The generated modules land in
# atropos_megatron/bridge/v1/, a package that holds generated code only; tests/unit/test_protos.py
# regenerates into a temporary directory and fails when the committed files differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  protos/atropos_megatron/bridge/v1/bridge.proto
