"""The demo's assets, built locally and deterministically: a tokenizer, a tiny model and the task.

- **Tokenizer**: one token per printable ASCII character (95) plus ``<pad> <s> </s> <unk>``, as a
  ``PreTrainedTokenizerFast`` that adds ``<s>`` in front of every encoded text and decodes without
  spaces between characters. Saved in its own directory: next to a ``config.json`` that says qwen2,
  transformers 5's ``AutoTokenizer`` would pick Qwen2's byte-level BPE class, which cannot read it.
- **Model**: a randomly initialised Qwen2 (2 layers, width 64, 4 query / 2 key-value heads, untied
  embeddings, fp32, vocabulary = the tokenizer's 99 tokens), saved with ``save_pretrained``. Its
  next-token distribution starts almost uniform, which is what makes the task's first rewards ~0.1.
- **Task** ("answer in the prompt's alphabet"): a prompt is 4 symbols drawn from one of two small
  alphabets, the letters ``a-h`` or the digits ``0-7``, then ``>``; a completion of up to 8 tokens
  earns the fraction of those 8 positions holding a symbol of the prompt's alphabet. The Atropos
  environment (``examples/envs/alphabet_match.py``) and the plain-torch baseline
  (``benchmarks/hf_grpo_step.py``) both use these functions, so they train the same thing.

No network, no hub: everything comes from a seed. torch and transformers are imported inside the
builders, so the task functions stay importable anywhere (the environment process, the benchmark).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------

ALPHABETS: tuple[str, ...] = ("abcdefgh", "01234567")
"""A prompt draws all its symbols from one of these; the completion should use the same one."""
PROMPT_SYMBOLS = 4
"""Symbols in a prompt, before the ``>`` that asks for the answer."""
PROMPT_END = ">"
COMPLETION_TOKENS = 8
"""Tokens a completion may have (``max_tokens``); the reward divides by this, so stopping early or
emitting a wrong symbol both cost 1/8."""


def sample_prompt(rng: random.Random) -> str:
    """One prompt, e.g. ``"cahc>"`` or ``"0621>"``."""
    alphabet = rng.choice(ALPHABETS)
    return "".join(rng.choice(alphabet) for _ in range(PROMPT_SYMBOLS)) + PROMPT_END


def prompt_alphabet(prompt: str) -> str:
    """The alphabet a prompt was drawn from (its first symbol decides)."""
    for alphabet in ALPHABETS:
        if prompt[:1] and prompt[0] in alphabet:
            return alphabet
    raise ValueError(f"not a task prompt: {prompt!r} (expected symbols of one of {ALPHABETS})")


def score_completion(prompt: str, completion: str) -> float:
    """The reward in [0, 1]: the share of the first ``COMPLETION_TOKENS`` positions that hold a
    symbol of the prompt's alphabet. Partial credit keeps a group's scores apart from the first step
    (a near-uniform model hits 8 of 99 tokens, ~0.08), which is what GRPO needs to get any signal."""
    alphabet = prompt_alphabet(prompt)
    hits = sum(ch in alphabet for ch in completion[:COMPLETION_TOKENS])
    return hits / COMPLETION_TOKENS


# ------------------------------------------------------------------------------------------------
# The tokenizer and the model
# ------------------------------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
CHARACTERS: str = "".join(ch for ch in string.printable if ch.isprintable())  # ASCII 32..126, 95 chars
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 99
MAX_POSITIONS = 128
"""Context the model is built for (tokens); a demo sequence has 1 + 5 + 8 = 14."""

MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@dataclass(frozen=True)
class DemoAssets:
    """Where :func:`build_assets` put things."""

    model_dir: Path
    """HF checkpoint: config.json, generation_config.json, model.safetensors (no tokenizer)."""
    tokenizer_dir: Path
    """tokenizer.json + tokenizer_config.json, without a config.json (see the module docstring)."""


def build_tokenizer():
    """The character tokenizer (a ``PreTrainedTokenizerFast``); identical on every call."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    # BPE without merges splits text into single characters and, unlike WordLevel, needs no
    # pre-tokenizer (so spaces are ordinary tokens); Fuse joins characters back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def build_model(*, seed: int):
    """A randomly initialised fp32 ``Qwen2ForCausalLM`` of :data:`MODEL_SHAPE`; same seed, same weights.

    The global torch RNG is forked, so building assets does not change the caller's random stream.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        **MODEL_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


def build_assets(directory: str | Path, *, seed: int = 0) -> DemoAssets:
    """Write the model to ``directory/model`` and the tokenizer to ``directory/tokenizer``.

    Deterministic: the same seed gives byte-identical weight and tokenizer files.
    """
    from transformers.utils import logging as hf_logging

    root = Path(directory)
    assets = DemoAssets(model_dir=root / "model", tokenizer_dir=root / "tokenizer")
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is only noise here
    try:
        build_model(seed=seed).save_pretrained(assets.model_dir)
        build_tokenizer().save_pretrained(assets.tokenizer_dir)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return assets


if __name__ == "__main__":  # python -m atropos_megatron.demo.assets DIR: the tiny model + tokenizer alone
    import sys

    built = build_assets(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
    print(f"model:     {built.model_dir}\ntokenizer: {built.tokenizer_dir}")
