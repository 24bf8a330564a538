"""What every process of a Slurm job can derive on its own, without ``scontrol`` or talking to the others:
the host names of a hostlist expression (``gpu-[007-009,12],cpu1``) and the job's rendezvous port.

Used by the trainer (the first host and the port are its default rendezvous under plain srun) and by
the launcher (the order of the allocation's nodes decides which node runs what). Pure, no imports
beyond the standard library, so it is cheap to import from anywhere.
"""

from __future__ import annotations

import itertools
import re

_GROUP = re.compile(r"\[([^\[\]]*)\]")

# Jobs that do not export MASTER_PORT get one derived from the job id, so that every task of the job
# (and a requeued run of it) computes the same port without talking to the others (torchtitan and
# Megatron-LM's launch scripts use the same scheme).
SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 10000


def job_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id``."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_RANGE


def expand_hostlist(expression: str) -> list[str]:
    """Every host of ``expression``, in the order ``scontrol show hostnames`` prints them.

    ``node[1-3]`` -> node1, node2, node3; ``gpu-[007-008,12],cpu1`` -> gpu-007, gpu-008, gpu-12, cpu1
    (zero padding follows the range's lower bound); ``rack[1-2]-n[3-4]`` -> rack1-n3, rack1-n4,
    rack2-n3, rack2-n4. Raises ValueError for an empty list, unbalanced brackets or a bad range.
    """
    hosts: list[str] = []
    for item in _split_top_level(expression.strip()):
        if not item:
            raise ValueError(f"empty host in Slurm node list {expression!r}")
        literals = _GROUP.split(item)  # literal, group, literal, group, ..., literal
        if any("[" in text or "]" in text for text in literals[::2]):
            raise ValueError(f"cannot parse Slurm node list {expression!r}")
        choices = [[text] for text in literals[::2]]
        for index, group in enumerate(literals[1::2]):
            choices.insert(2 * index + 1, _expand_group(group, expression))
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _expand_group(group: str, expression: str) -> list[str]:
    values = []
    for part in group.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in Slurm node list {expression!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in Slurm node list {expression!r}")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def _split_top_level(expression: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, []
    for char in expression:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items
