"""Batches: Atropos groups -> per-sequence tensors -> micro-batches (pure torch, no Megatron)."""
