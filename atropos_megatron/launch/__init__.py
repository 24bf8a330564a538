"""``atropos-megatron launch``: start each node's processes inside a Slurm allocation.

- ``topology``: how many trainer ranks and inference servers each kind of node gets (pure);
- ``allocation``: the job's nodes and their addresses, read once from Slurm;
- ``plan``: which role runs on which node, with its command, ports and readiness probes (pure);
- ``node``: runs one node's roles, watches them and the other nodes, forwards SIGTERM;
- ``supervisor``: starts, watches and always stops child processes (also used by the demo);
- ``cli``: ``launch plan`` (once per job) and ``launch run`` (once per node).
"""
