"""Local runs: every process of a cluster run on one machine (`atropos-megatron demo` and `run`).

The Atropos API, an inference server, the bridge, the trainer and an environment, started in order on
loopback. Modules:

- ``local``: the machinery (ports, resolved config, the environment's flags, start order, progress,
  summary), shared by both commands and ``benchmarks/chaos.py``;
- ``run``: ``atropos-megatron demo``, the built-in toy task a tiny model learns in a minute;
- ``run_env``: ``atropos-megatron run ENV_SCRIPT``, any atroposlib environment script;
- ``env_launcher``: starts an environment script with two fixes for atroposlib 0.4.0;
- ``assets``: tiny Qwen2 models with character or byte-level tokenizers, and the toy task;
- ``report``: the summary and the reward-curve PNG, from ``metrics.jsonl``.

Importing this package is cheap: no torch, transformers or matplotlib until a function needs them.
"""
