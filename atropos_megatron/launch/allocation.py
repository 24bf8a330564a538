"""The job's nodes and how to reach them: read from Slurm once, then passed on in the launch plan.

A Slurm node's name is not always resolvable from the other nodes (fake nodes, clusters whose DNS
knows only the management names); ``scontrol show node`` knows the address Slurm itself uses
(``NodeAddr``), so that is what every role binds to and connects to. Outside Slurm the allocation is
this machine alone, on loopback.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from atropos_megatron.slurm import expand_hostlist

logger = logging.getLogger(__name__)

SCONTROL_TIMEOUT_S = 30.0
"""One ``scontrol`` call; it blocks (about 10 s) when slurmctld does not answer."""


class AllocationError(RuntimeError):
    """The Slurm allocation could not be read."""


@dataclass(frozen=True)
class Node:
    name: str
    """Slurm's name for the node (``SLURMD_NODENAME`` on it)."""
    address: str
    """Where the other nodes reach it (Slurm's ``NodeAddr``)."""


@dataclass(frozen=True)
class Allocation:
    nodes: tuple[Node, ...]
    """In Slurm's order: the order decides which node runs what."""
    job_id: str | None = None
    """Slurm job id (None outside Slurm)."""
    restart_count: int = 0
    """How often Slurm requeued the job (``SLURM_RESTART_COUNT``)."""

    @property
    def session(self) -> str:
        """Names this life of the job: ``job<id>-<restarts>`` (a requeued job is a new session)."""
        if self.job_id is None:
            return f"local-{time.strftime('%Y%m%d-%H%M%S')}"
        return f"job{self.job_id}-{self.restart_count}"


def local_allocation() -> Allocation:
    """This machine alone, on loopback (``launch`` outside Slurm)."""
    return Allocation(nodes=(Node("localhost", "127.0.0.1"),))


def slurm_allocation(environ: Mapping[str, str] | None = None, *, scontrol: str = "scontrol") -> Allocation:
    """The allocation of the Slurm job this process runs in.

    Node names come from ``SLURM_JOB_NODELIST``; their addresses from one ``scontrol show node`` call
    (the names themselves if Slurm has no ``NodeAddr`` or scontrol cannot be asked).
    """
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise AllocationError("not inside a Slurm job (SLURM_JOB_NODELIST is not set)")
    try:
        names = expand_hostlist(nodelist)
    except ValueError as exc:
        raise AllocationError(str(exc)) from None
    addresses = node_addresses(nodelist, scontrol=scontrol)
    nodes = tuple(Node(name, addresses.get(name, name)) for name in names)
    return Allocation(
        nodes=nodes,
        job_id=env.get("SLURM_JOB_ID"),
        restart_count=int(env.get("SLURM_RESTART_COUNT") or 0),
    )


def node_addresses(nodelist: str, *, scontrol: str = "scontrol") -> dict[str, str]:
    """``{node name: NodeAddr}`` from ``scontrol show node -o <nodelist>`` (empty if it fails)."""
    try:
        result = subprocess.run(
            [scontrol, "show", "node", "-o", nodelist],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("scontrol show node failed (%s); using the node names as addresses", exc)
        return {}
    return parse_node_addresses(result.stdout)


def parse_node_addresses(scontrol_output: str) -> dict[str, str]:
    """The ``NodeName``/``NodeAddr`` pairs of ``scontrol show node -o`` output (one node per line)."""
    addresses = {}
    for line in scontrol_output.splitlines():
        name = re.search(r"(?:^|\s)NodeName=(\S+)", line)
        address = re.search(r"(?:^|\s)NodeAddr=(\S+)", line)
        if name and address:
            addresses[name.group(1)] = address.group(1)
    return addresses
