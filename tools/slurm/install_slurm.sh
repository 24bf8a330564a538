#!/usr/bin/env bash
# Install a local Slurm (slurmctld, slurmd, client tools) and munge, for tests/slurm_cluster.py.
#
# The Slurm integration tests start a real one-machine cluster; they need these binaries and skip
# themselves when they are missing. This script is safe to call from anywhere (CI, `make`, a
# developer box): it does nothing when Slurm is already there, installs it with apt-get when it can
# (root on Debian/Ubuntu), and otherwise only explains why the Slurm tests will be skipped. It never
# fails its caller.
set -u

log() { printf '[install_slurm] %s\n' "$*"; }

have_all() {
  local b
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null 2>&1 || return 1
  done
}

if have_all; then
  log "slurmctld, slurmd, sbatch and munged are already on PATH; nothing to do"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "not root: cannot install slurm-wlm/munge; the Slurm integration tests will be skipped"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this machine: install slurm-wlm and munge by hand; the Slurm tests will be skipped"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if apt-get update && apt-get install -y --no-install-recommends slurm-wlm munge; then
  if have_all; then
    log "installed: $(slurmctld -V 2>/dev/null || echo slurm), $(munged -V 2>/dev/null | head -n1 || echo munge)"
  else
    log "apt-get succeeded but some binaries are still missing; the Slurm tests will be skipped"
  fi
else
  log "apt-get install slurm-wlm munge failed; the Slurm integration tests will be skipped"
fi
exit 0
