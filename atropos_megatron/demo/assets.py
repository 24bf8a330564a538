"""Tiny models and tokenizers built locally and deterministically, plus the demo's task.

Two tokenizers, each saved with a randomly initialised Qwen2 whose vocabulary is exactly theirs:

- **chars** (the demo's, the default): one token per printable ASCII character (95) plus
  ``<pad> <s> </s> <unk>``, as a ``PreTrainedTokenizerFast`` that adds ``<s>`` in front of every
  encoded text and decodes without spaces between characters. No newline, no chat template, 128
  tokens of context: enough for the task below and nothing else.
- **bytes** (for real Atropos environments): byte-level, one token per UTF-8 byte (id = byte value),
  so every text (newlines, tabs, emoji) round-trips exactly, plus ``<pad> <s> <|im_start|>
  <|im_end|>`` (ids 256-259) and a ChatML chat template (:data:`CHAT_TEMPLATE`). ``<|im_end|>`` is
  the EOS of the tokenizer and of the model, so generation stops at the end of an assistant turn.
  The template writes the one ``<s>``; encoding never adds it, so a rendered chat never gets two.
  Default context 2048.

The model is a Qwen2 (GQA, QKV bias, RMSNorm, SwiGLU; untied embeddings, fp32) of one of
:data:`MODEL_SIZES`, saved with ``save_pretrained``; its next-token distribution starts almost
uniform, which is what makes the task's first rewards ~0.1. Parameters with the byte vocabulary:

- ``tiny`` (the demo's): 2 layers, width 64, 4 q / 2 kv heads, FFN 128: 107,584 (86,976 with chars)
- ``small``: 4 layers, width 256, 4 q / 2 kv heads, FFN 1024: 4,069,632 (16 MB)
- ``base``: 8 layers, width 512, 8 q / 4 kv heads, FFN 2048: 31,740,416 (127 MB)

With ``experts=E`` the model is instead a Qwen3-MoE of the same shape (q/k norms, no QKV bias) whose
every MLP is E experts of half the FFN width, two per token (renormalised): the demo's ``--moe``.

The model goes to ``model/`` and the tokenizer to its own ``tokenizer/``: next to a ``config.json``
that says qwen2, transformers 5's ``AutoTokenizer`` would pick Qwen2's byte-level BPE class, which
cannot read them.

**Task** ("answer in the prompt's alphabet"): a prompt is 4 symbols drawn from one of two small
alphabets, the letters ``a-h`` or the digits ``0-7``, then ``>``; a completion of up to 8 tokens
earns the fraction of those 8 positions holding a symbol of the prompt's alphabet. The Atropos
environment (``examples/envs/alphabet_match.py``) and the plain-torch baseline
(``benchmarks/hf_grpo_step.py``) both use these functions, so they train the same thing.

No network, no hub: everything comes from a seed (same arguments, byte-identical files). torch and
transformers are imported inside the builders, so the task functions stay importable anywhere (the
environment process, the benchmark). ``python -m atropos_megatron.demo.assets --help`` builds a set
alone, e.g. ``DIR --tokenizer bytes --context 2048 --size small``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

TokenizerKind = Literal["chars", "bytes"]
ModelSize = Literal["tiny", "small", "base"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
CHARACTERS: str = "".join(ch for ch in string.printable if ch.isprintable())  # ASCII 32..126, 95 chars
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 99
MAX_POSITIONS = 128
"""Context the character assets are built for (tokens); a demo sequence has 1 + 5 + 8 = 14."""

BYTE_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "<|im_start|>", "<|im_end|>")
"""The byte tokenizer's special tokens, after the 256 bytes. ``<|im_end|>`` ends a turn and is the
EOS: one stop token, so the template, the tokenizer and the model cannot disagree on it."""
BYTE_PAD_ID, BYTE_BOS_ID, IM_START_ID, IM_END_ID = range(256, 256 + len(BYTE_SPECIAL_TOKENS))
BYTE_EOS_ID = IM_END_ID
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIAL_TOKENS)  # 260
BYTE_CONTEXT = 2048
"""Default context of the byte assets: room for a real environment's multi-turn prompt and answer."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML (as Qwen), BOS first and no newline after ``<|im_end|>``: a chat ending with an assistant
turn then ends with the EOS the model generates, and the prompt with the generation prompt is an exact
prefix of the whole chat, which is what atroposlib's prefix masking assumes."""

MODEL_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": MODEL_SHAPE,
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "base": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
"""Qwen2 shapes by name, all CPU-friendly (the module docstring lists them)."""
BYTE_MODEL_PARAMETERS: dict[str, int] = {"tiny": 107_584, "small": 4_069_632, "base": 31_740_416}
"""Parameters of each size with the byte vocabulary (embedding and output rows included)."""


@dataclass(frozen=True)
class Vocabulary:
    """What the model's config must agree on with its tokenizer."""

    size: int
    pad_id: int
    bos_id: int
    eos_id: int


CHAR_VOCABULARY = Vocabulary(size=VOCAB_SIZE, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)
BYTE_VOCABULARY = Vocabulary(size=BYTE_VOCAB_SIZE, pad_id=BYTE_PAD_ID, bos_id=BYTE_BOS_ID, eos_id=BYTE_EOS_ID)
VOCABULARIES: dict[str, Vocabulary] = {"chars": CHAR_VOCABULARY, "bytes": BYTE_VOCABULARY}
DEFAULT_CONTEXT: dict[str, int] = {"chars": MAX_POSITIONS, "bytes": BYTE_CONTEXT}


@dataclass(frozen=True)
class DemoAssets:
    """Where :func:`build_assets` put things, and what they were built as."""

    model_dir: Path
    """HF checkpoint: config.json, generation_config.json, model.safetensors (no tokenizer)."""
    tokenizer_dir: Path
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja for bytes), without a config.json
    (see the module docstring)."""
    tokenizer: TokenizerKind = "chars"
    size: ModelSize = "tiny"
    context: int = MAX_POSITIONS
    """``max_position_embeddings`` of the model and ``model_max_length`` of the tokenizer."""
    vocab_size: int = VOCAB_SIZE
    """The tokenizer's length, which is also the model's ``vocab_size`` (every id has a row)."""


def build_tokenizer(*, context: int = MAX_POSITIONS):
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
        model_max_length=context,
    )


def byte_symbols() -> tuple[str, ...]:
    """The character ByteLevel writes for each byte value 0..255 (GPT-2's scheme: printable Latin-1
    stands for itself, every other byte for the next code point from 256 on), so id = byte value."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    stand_ins = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(stand_ins)) for b in range(256))


def build_byte_tokenizer(*, context: int = BYTE_CONTEXT):
    """The byte-level tokenizer with the ChatML :data:`CHAT_TEMPLATE`; identical on every call.

    ByteLevel without its regex split maps the whole text to byte symbols, and BPE without merges
    then gives one token per byte, so decode(encode(text)) == text for every string. No BOS is added
    on encode: the template writes it, and a rendered chat encoded again must not get a second one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(byte_symbols())}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        model_max_length=context,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    *,
    seed: int,
    size: ModelSize = "tiny",
    context: int = MAX_POSITIONS,
    vocab: Vocabulary = CHAR_VOCABULARY,
    output_std: float | None = None,
    experts: int = 0,
):
    """A randomly initialised fp32 ``Qwen2ForCausalLM`` of ``MODEL_SIZES[size]``; same seed, same weights.

    ``experts > 0``: a ``Qwen3MoeForCausalLM`` of the same shape instead, each MLP ``experts`` experts of
    half the FFN width with top-2 routing (see the module docstring).

    ``output_std``: draw the output layer with this standard deviation instead of the initialiser's
    0.02. A frozen base needs it for LoRA to learn anything: behind the final norm, a 0.02-wide output
    layer caps every logit near 1, so no adapter on the linear layers can make the model confident
    (trained models' output layers are much wider). The global torch RNG is forked, so building
    assets does not change the caller's random stream.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=vocab.size,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.pad_id,
        **_model_shape(size),
    )
    if experts < 0:
        raise ValueError(f"experts must be >= 0 (0: a dense Qwen2), got {experts}")
    if experts:
        config = Qwen3MoeConfig(
            **common,
            num_experts=experts,
            num_experts_per_tok=min(2, experts),
            moe_intermediate_size=common["intermediate_size"] // 2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        model_class = Qwen3MoeForCausalLM
    else:
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        if output_std is not None:
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, output_std)
    return model.float().eval()


def _model_shape(size: str) -> dict[str, Any]:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return MODEL_SIZES[size]


def _check_kind(tokenizer: str) -> None:
    if tokenizer not in VOCABULARIES:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {sorted(VOCABULARIES)}")


def build_assets(
    directory: str | Path,
    *,
    seed: int = 0,
    tokenizer: TokenizerKind = "chars",
    context: int | None = None,
    size: ModelSize = "tiny",
    output_std: float | None = None,
    experts: int = 0,
) -> DemoAssets:
    """Write a model to ``directory/model`` and its tokenizer to ``directory/tokenizer``.

    ``context`` defaults to the tokenizer's :data:`DEFAULT_CONTEXT` (128 chars, 2048 bytes); the
    defaults give the demo's assets; ``output_std`` and ``experts`` as in :func:`build_model`. Deterministic: the same arguments give byte-identical files.
    """
    from transformers.utils import logging as hf_logging

    _check_kind(tokenizer)
    _model_shape(size)
    context = DEFAULT_CONTEXT[tokenizer] if context is None else context
    if context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    vocab = VOCABULARIES[tokenizer]
    root = Path(directory)
    assets = DemoAssets(
        model_dir=root / "model",
        tokenizer_dir=root / "tokenizer",
        tokenizer=tokenizer,
        size=size,
        context=context,
        vocab_size=vocab.size,
    )
    build = build_byte_tokenizer if tokenizer == "bytes" else build_tokenizer
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is only noise here
    try:
        model = build_model(
            seed=seed, size=size, context=context, vocab=vocab, output_std=output_std, experts=experts
        )
        model.save_pretrained(assets.model_dir)
        build(context=context).save_pretrained(assets.tokenizer_dir)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return assets


def _parse_args(argv: list[str] | None = None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m atropos_megatron.demo.assets",
        description="Build a random Qwen2 and its tokenizer into DIR/model and DIR/tokenizer.",
    )
    parser.add_argument(
        "directory", nargs="?", default="runs/tiny", help="output folder (default: runs/tiny)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    parser.add_argument(
        "--tokenizer",
        choices=sorted(VOCABULARIES),
        default="chars",
        help="chars: the demo's 99-token tokenizer; bytes: byte-level with a ChatML template (default: chars)",
    )
    parser.add_argument(
        "--context", type=int, default=None, help="max positions (default: 128 for chars, 2048 for bytes)"
    )
    parser.add_argument(
        "--size", choices=list(MODEL_SIZES), default="tiny", help="model preset (default: tiny)"
    )
    parser.add_argument(
        "--experts", type=int, default=0, help="a Qwen3-MoE with this many experts per MLP (default 0: dense)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":  # python -m atropos_megatron.demo.assets DIR [--tokenizer bytes ...]
    args = _parse_args()
    built = build_assets(
        args.directory,
        seed=args.seed,
        tokenizer=args.tokenizer,
        context=args.context,
        size=args.size,
        experts=args.experts,
    )
    print(
        f"model:     {built.model_dir} ({built.size}, context {built.context}, vocab {built.vocab_size})\n"
        f"tokenizer: {built.tokenizer_dir} ({built.tokenizer})"
    )
