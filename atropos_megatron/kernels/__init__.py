"""Fused and memory-bounded implementations of the ops in ``algo/``, each checked against it.

``chunked_logprobs`` is the torch path used where Triton cannot run; the Triton kernels arrive
one op per file.
"""
