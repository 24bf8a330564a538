"""GRPO maths in plain torch: the specification that kernels and the trainer are checked against.

Nothing here knows about Megatron, process groups, configs files or I/O. Every function takes
tensors (shapes in its docstring) and keyword hyper-parameters, and is tested against hand-computed
tiny examples in ``tests/unit/test_algo_*.py``.
"""
