#!/usr/bin/env bash
# Create or refresh the project's virtualenv (called by `make install`).
#
# The one rule: pip must never choose torch for us. On a machine without CUDA we install the CPU
# wheel (torch==2.13.0) before anything else; on a GPU machine we keep the CUDA torch the user
# already has (the venv sees system site-packages) or take the index's default CUDA build. Every
# later install runs with a constraint file that pins the torch we ended up with, so a dependency
# asking for `torch>=X` can never pull a different (multi-GB CUDA) build.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,atropos}
CPU_TORCH=${CPU_TORCH:-torch==2.13.0}
# The Triton release that CUDA builds of torch 2.13 pin; on CPU it only runs the interpreter
# (TRITON_INTERPRET=1), and this version is the one our kernel tests are checked with.
CPU_TRITON=${CPU_TRITON:-triton==3.7.1}

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
log() { printf '[install] %s\n' "$*"; }
# pip, quietly; this machine's pip config lists package folders that may not exist, and pip warns
# about each of them on every call. Those warnings are dropped; pip's exit status is kept.
pip_install() {
  "$PY" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
  if has_cuda; then
    log "GPU machine: creating $VENV with access to system site-packages (keeps your CUDA torch)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    log "CPU machine: creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install --upgrade "pip>=24"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if has_cuda; then
    log "installing torch (CUDA build from the package index)"
    pip_install torch
  else
    log "installing $CPU_TORCH (CPU wheel) before anything that depends on torch"
    pip_install "$CPU_TORCH"
  fi
fi

constraints="$VENV/constraints.txt"
"$PY" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
if ! has_cuda; then
  echo "$CPU_TRITON" >> "$constraints"
fi
log "pinned: $(tr '\n' ' ' < "$constraints")"

log "installing atropos-megatron[$EXTRAS] (editable)"
pip_install -c "$constraints" -e ".[$EXTRAS]"
"$PY" -W ignore -c "import torch, megatron.core, atropos_megatron; print('[install] ok: torch', torch.__version__, \
'| megatron-core', megatron.core.__version__, '| cuda', torch.cuda.is_available())"
