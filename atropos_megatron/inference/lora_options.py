"""The reference server's LoRA flags, spelled and checked as SGLang 0.5.23 spells and checks them.

``--enable-lora``, ``--max-lora-rank``, ``--lora-target-modules`` and ``--max-loras-per-batch`` mean
what they mean to SGLang (``arg_groups/fields/lora.py``, ``arg_groups/lora_hook.py``), and SGLang's
target-module names are normalised the way its LoRA memory pool does (``lora/utils.py``:
``q_proj``/``k_proj``/``v_proj`` become ``qkv_proj``, ``gate_proj``/``up_proj`` become
``gate_up_proj``), so an adapter that one server accepts the other accepts too. Deliberately absent:
``--lora-paths`` (adapters are loaded through the routes), ``--max-loaded-loras`` and its LRU eviction,
and the kernel, overlap and MoE flags, which only matter for SGLang's GPU memory pool.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# SGLang 0.5.23's SUPPORTED_LORA_TARGET_MODULES (utils/common.py): the choices of --lora-target-modules.
SUPPORTED_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj",
    "wq_b", "wk", "weights_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
    "embed_tokens", "lm_head", "qkvr", "wo_ud",
)  # fmt: skip
ALL_MODULES = "all"
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # what "all" adds to the model's linear modules
DEFAULT_MAX_LORAS_PER_BATCH = 8

# Module-name suffix -> the pool's normalised name (SGLang's get_normalized_target_modules).
_NORMALIZED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "vocab_emb": "embed_tokens",
    "embeddings": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "output": "lm_head",
    "unembed_tokens": "lm_head",
    "q_a_proj": "fused_qkv_a_proj_with_mqa",
    "kv_a_proj_with_mqa": "fused_qkv_a_proj_with_mqa",
    "wq_b": "indexer.wq_b",
    "wk": "indexer.wk",
    "weights_proj": "indexer.weights_proj",
}


class LoraOptionsError(ValueError):
    """Server flags SGLang would refuse at start-up."""


def normalize_target_modules(target_modules: Any) -> frozenset[str]:
    """An adapter's (or the server's) ``target_modules`` as the pool's names; ``{"all"}`` for the shorthands.

    Raises ValueError with SGLang's text for a string other than ``all``/``all-linear`` (e.g. a PEFT
    regex, which SGLang cannot match).
    """
    if isinstance(target_modules, str):
        if target_modules not in (ALL_MODULES, "all-linear"):
            raise ValueError("Only 'all' or 'all-linear' can be used as the string for target module")
        return frozenset({ALL_MODULES})
    if not isinstance(target_modules, Iterable) or not all(isinstance(m, str) for m in target_modules):
        raise ValueError(f"target_modules must be a list of module names, got {target_modules!r}")
    suffixes = (name.split(".")[-1] for name in target_modules)
    return frozenset(_NORMALIZED.get(suffix, suffix) for suffix in suffixes)


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """LoRA is enabled with these limits; ``target_modules`` is as given (``("all",)`` allowed)."""

    max_lora_rank: int
    target_modules: tuple[str, ...]
    max_loras_per_batch: int = DEFAULT_MAX_LORAS_PER_BATCH  # distinct adapters per batch, base included

    def __post_init__(self) -> None:
        if self.max_loras_per_batch < 1:
            raise LoraOptionsError("max_loras_per_batch must be positive")
        if self.max_lora_rank < 1:
            raise LoraOptionsError(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        unknown = sorted(set(self.target_modules) - set(SUPPORTED_TARGET_MODULES) - {ALL_MODULES})
        if unknown:
            raise LoraOptionsError(
                f"--lora-target-modules: unknown module(s) {unknown}; choose from "
                f"{[*SUPPORTED_TARGET_MODULES, ALL_MODULES]}"
            )
        if ALL_MODULES in self.target_modules and len(self.target_modules) != 1:
            raise LoraOptionsError(
                "If 'all' is specified in --lora-target-modules, it should be the only module specified."
            )

    @property
    def normalized_targets(self) -> frozenset[str]:
        """``{"all"}`` or the pool's names; the runtime resolves ``all`` against the model."""
        return normalize_target_modules(list(self.target_modules))


_LORA_HELP = """\
LoRA adapters (SGLang 0.5.23's flags and routes): with --enable-lora the server accepts
POST /load_lora_adapter {lora_name, lora_path: a PEFT directory on this machine},
/load_lora_adapter_from_tensors and /unload_lora_adapter, and a request picks an adapter by
name: /generate {"lora_path": NAME or one per prompt}, /v1/* {"model": "SERVED:NAME"} or
{"lora_path": NAME}; no name means the base model. Like SGLang, the scale is lora_alpha / r
(use_rslora and rank/alpha patterns are not read: fold them into lora_B before loading).
With --protocol vllm, adapters come as with vllm serve: start the server with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, then POST /v1/load_lora_adapter {lora_name, lora_path}
and /v1/unload_lora_adapter {lora_name}; a request picks one by {"model": NAME}.
Example: --enable-lora --max-lora-rank 64 --lora-target-modules all"""


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """SGLang's LoRA server flags on ``parser`` (the ``serve`` command)."""
    group = parser.add_argument_group("LoRA adapters", _LORA_HELP)
    group.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters on top of the base model (off: the LoRA routes and any lora_path "
        "in a request answer 400, as SGLang does); needs --max-lora-rank and --lora-target-modules. "
        "--protocol vllm: adapters come through /v1/load_lora_adapter, mounted with "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True as with vllm serve (off: a load answers vLLM's 500)",
    )
    group.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        metavar="R",
        help="largest adapter rank r that loads (SGLang sizes its GPU pool with it; larger ranks are refused)",
    )
    group.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        choices=[*SUPPORTED_TARGET_MODULES, ALL_MODULES],
        metavar="MODULE",
        help="modules adapters may target, e.g. 'q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj' or 'all' (every linear module of the model plus embed_tokens and lm_head); "
        "q/k/v count as one module (qkv_proj) and gate/up as one (gate_up_proj), as in SGLang. An "
        "adapter targeting anything else is refused",
    )
    group.add_argument(
        "--max-loras-per-batch",
        type=int,
        default=DEFAULT_MAX_LORAS_PER_BATCH,
        metavar="N",
        help=f"most distinct adapters decoded together, the base model counting as one (default "
        f"{DEFAULT_MAX_LORAS_PER_BATCH}); at most N-1 adapters may be pinned",
    )


def lora_options_from_args(args: argparse.Namespace) -> LoraOptions | None:
    """``None`` without ``--enable-lora`` (like SGLang, the other LoRA flags then do nothing)."""
    if not getattr(args, "enable_lora", False):
        return None
    if not args.max_lora_rank or not args.lora_target_modules:
        raise LoraOptionsError(
            "When no initial --lora-paths is provided, you need to specify both --max-lora-rank and "
            "--lora-target-modules for LoRA initialization."
        )
    return LoraOptions(
        max_lora_rank=args.max_lora_rank,
        target_modules=tuple(args.lora_target_modules),
        max_loras_per_batch=args.max_loras_per_batch,
    )
