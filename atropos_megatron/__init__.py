"""atropos-megatron: GRPO training for Atropos environments on Megatron-Core.

Importing the package is cheap on purpose: it never imports torch.distributed, megatron or grpc.
Those come in with the subpackage that needs them.
"""

__version__ = "0.1.0.dev0"
