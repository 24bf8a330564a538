"""Weights between layouts and formats: full Megatron state dicts, TP/PP shards, HF names."""
