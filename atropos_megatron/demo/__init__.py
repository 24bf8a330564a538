"""The one-command CPU demo (`atropos-megatron demo`): every part of the system on one machine.

A tiny random Qwen2 model learns a toy Atropos task in minutes on 2 CPU cores, with the real
processes a cluster run has: the Atropos API, an inference server, the bridge, the trainer and an
environment. Modules, in the order the demo uses them:

- ``assets``: the character tokenizer, the tiny checkpoint and the task (prompts, reward), built locally;
- ``processes``: a small supervisor that starts, watches and always stops child processes;
- ``run``: the command itself (ports, resolved config, start order, progress, summary);
- ``report``: the summary and the reward-curve PNG, from ``metrics.jsonl``.

Importing this package is cheap: no torch, transformers or matplotlib until a function needs them.
"""
