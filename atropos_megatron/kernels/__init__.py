"""Fused, memory-bounded and vocab-parallel implementations of the ops in ``algo/``, each checked against it.

- ``logprobs.fused_token_logprobs``: token log-probs + entropy from (vocab-parallel) logits.
- ``grpo_loss.fused_grpo_loss``: the GRPO loss from logits, gradient written during the forward.
- ``token_stats``: the per-token statistics both are built on, and their merge across TP ranks.
- ``triton_ops`` / ``torch_ops``: the two backends of the passes; ``backends`` chooses between them.
"""
