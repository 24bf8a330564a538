"""How many processes and GPUs each kind of node gets, from the `launch` config section alone.

Pure arithmetic, shared by the launch plan and by ``train --dry-run`` (which needs the trainer's world
size before any allocation exists).
"""

from __future__ import annotations

from atropos_megatron.config import LaunchConfig


class TopologyError(ValueError):
    """The `launch` section cannot be laid out on the nodes it asks for."""


def colocated_gpus(launch: LaunchConfig) -> int:
    """GPUs the first training node gives to its co-located inference servers."""
    if launch.gpus_per_node == 0:
        return 0
    return launch.colocated_servers * launch.inference.gpus_per_server


def trainer_procs_per_node(launch: LaunchConfig) -> int:
    """Trainer ranks on each training node."""
    if launch.trainer_procs_per_node is not None:
        return launch.trainer_procs_per_node
    if launch.gpus_per_node == 0:
        return 1
    return launch.gpus_per_node - colocated_gpus(launch)


def trainer_world_size(launch: LaunchConfig) -> int:
    """Trainer ranks in the whole job."""
    return launch.train_nodes * trainer_procs_per_node(launch)


def servers_per_inference_node(launch: LaunchConfig) -> int:
    """Inference servers on each node dedicated to inference."""
    if launch.inference.servers_per_node is not None:
        return launch.inference.servers_per_node
    if launch.gpus_per_node == 0:
        return 1
    return launch.gpus_per_node // launch.inference.gpus_per_server


def check_topology(launch: LaunchConfig) -> None:
    """Raise :class:`TopologyError` (saying what to change) for a layout the nodes cannot hold."""
    gpus = launch.gpus_per_node
    if gpus == 0:
        return
    shared = colocated_gpus(launch)
    if shared and launch.train_nodes > 1:
        raise TopologyError(
            "inference servers next to the trainer (launch.inference.colocated_servers) need "
            f"launch.train_nodes: 1, not {launch.train_nodes}: every training node must give the trainer "
            "the same GPUs; put the servers on launch.inference_nodes instead"
        )
    procs = trainer_procs_per_node(launch)
    if shared + procs > gpus:
        raise TopologyError(
            f"the first training node needs {shared} GPUs for inference servers and {procs} for trainer "
            f"ranks, but launch.gpus_per_node is {gpus}"
        )
    if procs < 1:
        raise TopologyError(
            f"no GPU left for the trainer: {launch.colocated_servers} co-located servers x "
            f"{launch.inference.gpus_per_server} GPUs take all {gpus}"
        )
    if launch.inference_nodes:
        needed = servers_per_inference_node(launch) * launch.inference.gpus_per_server
        if needed > gpus or needed == 0:
            raise TopologyError(
                f"an inference node has {gpus} GPUs; {servers_per_inference_node(launch)} servers x "
                f"{launch.inference.gpus_per_server} GPUs do not fit"
            )
