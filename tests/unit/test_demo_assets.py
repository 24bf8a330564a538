"""The demo's assets: built deterministically, the tokenizer round-trips the task's text, the
checkpoint is one our converter accepts, and the reward means what the environment says. The byte
assets: every text round-trips, the chat template renders, tokenizes and masks as Atropos expects,
and the checkpoint has the requested context and a row for every token id."""

from __future__ import annotations

import random

import pytest
import torch

from atropos_megatron.demo import assets
from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return [assets.build_assets(tmp_path_factory.mktemp(f"assets{i}"), seed=7) for i in range(2)]


@pytest.fixture(scope="module")
def built_bytes(tmp_path_factory):
    return [
        assets.build_assets(tmp_path_factory.mktemp(f"bytes{i}"), seed=7, tokenizer="bytes") for i in range(2)
    ]


@pytest.fixture(scope="module")
def byte_tokenizer(built_bytes):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built_bytes[0].tokenizer_dir)


CHAT = [
    {"role": "system", "content": "You answer briefly.\nAlways."},
    {"role": "user", "content": "Héllo\tthere 👋 — what's 2+2?"},
    {"role": "assistant", "content": "4\n\n(four) ✅"},
]
TEXTS = [
    "",
    "plain ascii",
    "line one\nline two\r\n\ttabbed  double  spaces ",
    " leading space and trailing\n\n",
    "ünïcödé 中文 العربية עברית 😀👍🏽🇫🇷 \u200b\x00\x7f",
    "".join(chr(i) for i in range(1, 0x300)),
]


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_files(built):
    first, second = built
    assert _files(first.model_dir) == _files(second.model_dir)
    assert _files(first.tokenizer_dir) == _files(second.tokenizer_dir)
    assert "model.safetensors" in _files(first.model_dir)


def test_other_seed_gives_other_weights_and_the_caller_rng_is_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = assets.build_model(seed=1)
    after = torch.rand(3)
    b = assets.build_model(seed=2)
    assert torch.equal(expected, after)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_tokenizer_dir_has_no_model_config_and_loads_with_autotokenizer(built):
    from transformers import AutoTokenizer

    # A qwen2 config.json beside it would make AutoTokenizer pick Qwen2's BPE class.
    assert not (built[0].tokenizer_dir / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(built[0].tokenizer_dir)
    assert len(tokenizer) == assets.VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        assets.BOS_ID,
        assets.EOS_ID,
        assets.PAD_ID,
    )


def test_tokenizer_round_trips_the_task_text_one_token_per_character(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[0].tokenizer_dir)
    rng = random.Random(0)
    texts = [assets.sample_prompt(rng) + "ab 7!~" for _ in range(20)] + [assets.CHARACTERS]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == assets.BOS_ID and len(ids) == len(text) + 1
        assert assets.UNK_ID not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # An EOS sampled by the model disappears from the decoded completion.
    eos = tokenizer.encode("abc", add_special_tokens=False) + [assets.EOS_ID]
    assert tokenizer.decode(eos, skip_special_tokens=True) == "abc"


def test_checkpoint_is_accepted_by_the_converter_with_the_tokenizer_vocabulary(built):
    model = model_config_from_hf(read_hf_config(built[0].model_dir))
    assert model.vocab_size == assets.VOCAB_SIZE
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.query_groups) == (
        2,
        64,
        4,
        2,
    )
    assert model.add_qkv_bias and not model.tie_word_embeddings
    assert model.max_position_embeddings >= 1 + assets.PROMPT_SYMBOLS + 1 + assets.COMPLETION_TOKENS


def test_prompts_use_one_alphabet_and_end_with_the_marker():
    rng = random.Random(1)
    prompts = [assets.sample_prompt(rng) for _ in range(200)]
    for prompt in prompts:
        body = prompt[: assets.PROMPT_SYMBOLS]
        assert prompt.endswith(assets.PROMPT_END) and len(prompt) == assets.PROMPT_SYMBOLS + 1
        assert set(body) <= set(assets.prompt_alphabet(prompt))
    assert {assets.prompt_alphabet(p) for p in prompts} == set(assets.ALPHABETS)


@pytest.mark.parametrize(
    ("prompt", "completion", "score"),
    [
        ("cahc>", "bad1eeg", 6 / 8),  # '1' is the wrong alphabet, the 8th position is empty
        ("cahc>", "abcdefgh", 1.0),
        ("cahc>", "abcdefghhhhh", 1.0),  # only the first 8 characters count
        ("0621>", "abcdefgh", 0.0),
        ("0621>", "0123 567", 7 / 8),  # '8', '9' and ' ' are not in 0-7
        ("0621>", "", 0.0),
    ],
)
def test_score_is_the_share_of_the_8_positions_in_the_prompts_alphabet(prompt, completion, score):
    assert assets.score_completion(prompt, completion) == score


def test_score_rejects_text_that_is_not_a_task_prompt():
    with pytest.raises(ValueError, match="not a task prompt"):
        assets.score_completion("xyz>", "abc")


# ------------------------------------------------------------------------------------------------
# The byte-level assets
# ------------------------------------------------------------------------------------------------


def test_default_build_is_the_demos_char_assets(built):
    assert (built[0].tokenizer, built[0].size, built[0].context, built[0].vocab_size) == (
        "chars",
        "tiny",
        assets.MAX_POSITIONS,
        assets.VOCAB_SIZE,
    )


def test_byte_assets_are_byte_identical_for_the_same_seed(built_bytes):
    first, second = built_bytes
    assert _files(first.model_dir) == _files(second.model_dir)
    assert _files(first.tokenizer_dir) == _files(second.tokenizer_dir)
    assert not (first.tokenizer_dir / "config.json").exists()


def test_byte_tokenizer_round_trips_any_text_one_token_per_byte(byte_tokenizer):
    for text in TEXTS:
        ids = byte_tokenizer.encode(text)
        assert ids == list(text.encode("utf-8"))  # no BOS added, id = byte value
        assert byte_tokenizer.decode(ids) == text
        assert byte_tokenizer.decode(ids, skip_special_tokens=True) == text
    # Every byte has its own id, so no UTF-8 sequence can fall outside the vocabulary.
    assert [byte_tokenizer.convert_tokens_to_ids(s) for s in assets.byte_symbols()] == list(range(256))


def test_byte_tokenizer_specials_and_skip_special_tokens(byte_tokenizer):
    t = byte_tokenizer
    assert len(t) == assets.BYTE_VOCAB_SIZE
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (
        assets.BYTE_PAD_ID,
        assets.BYTE_BOS_ID,
        assets.BYTE_EOS_ID,
    )
    assert t.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [assets.IM_START_ID, assets.IM_END_ID]
    assert t.eos_token == "<|im_end|>" and t.model_max_length == assets.BYTE_CONTEXT
    specials = [assets.BYTE_BOS_ID, assets.IM_START_ID, assets.IM_END_ID, assets.BYTE_PAD_ID]
    ids = [specials[0], *t.encode("a\nb"), *specials[1:], *t.encode("😀")]
    assert t.decode(ids, skip_special_tokens=True) == "a\nb😀"
    assert t.decode(ids) == "<s>a\nb<|im_start|><|im_end|><pad>😀"


def test_chat_template_renders_chatml_with_one_bos_and_a_generation_prompt(byte_tokenizer):
    t = byte_tokenizer
    prompt = t.apply_chat_template(CHAT[:-1], add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<s><|im_start|>system\nYou answer briefly.\nAlways.<|im_end|>"
        "<|im_start|>user\nHéllo\tthere 👋 — what's 2+2?<|im_end|><|im_start|>assistant\n"
    )
    ids = t.apply_chat_template(CHAT[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    # tokenize=True, encode() and the inference server's encode(add_special_tokens=False) agree.
    assert ids == t.encode(prompt) == t.encode(prompt, add_special_tokens=False) == t(prompt)["input_ids"]
    assert ids.count(assets.BYTE_BOS_ID) == 1 and ids[0] == assets.BYTE_BOS_ID
    assert t.decode(ids) == prompt
    assert t.apply_chat_template(CHAT[:-1], add_generation_prompt=True)["input_ids"] == ids
    # The whole chat ends with the EOS generation stops at, and the prompt is its exact prefix.
    full = t.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert full[: len(ids)] == ids and full[-1] == t.eos_token_id
    assert t.decode(full[len(ids) :], skip_special_tokens=True) == CHAT[-1]["content"]
    assert t.decode(full) == t.apply_chat_template(CHAT, tokenize=False)


class _ListChatTemplate:
    """atroposlib's helper expects ``apply_chat_template`` to return a token list, as transformers 4
    did; transformers 5 returns a ``BatchEncoding`` unless ``return_dict=False``."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, conversation, **kwargs):
        return self._tokenizer.apply_chat_template(conversation, return_dict=False, **kwargs)


def test_atroposlib_tokenize_for_trainer_masks_all_but_the_assistant_turn(byte_tokenizer):
    from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer

    out = tokenize_for_trainer(_ListChatTemplate(byte_tokenizer), CHAT)
    tokens, masks = out["tokens"], out["masks"]
    assert len(tokens) == len(masks)
    trained = [tok for tok, mask in zip(tokens, masks, strict=True) if mask != -100]
    assert trained == [*byte_tokenizer.encode(CHAT[-1]["content"]), assets.BYTE_EOS_ID]
    assert masks[: len(tokens) - len(trained)] == [-100] * (len(tokens) - len(trained))


def test_byte_model_loads_with_the_context_and_a_row_for_every_token(built_bytes, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built_bytes[0].model_dir)
    config = model.config
    assert config.model_type == "qwen2" and not config.tie_word_embeddings
    assert config.max_position_embeddings == built_bytes[0].context == assets.BYTE_CONTEXT
    assert config.vocab_size == built_bytes[0].vocab_size >= max(byte_tokenizer.get_vocab().values()) + 1
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (
        byte_tokenizer.eos_token_id,
        byte_tokenizer.bos_token_id,
        byte_tokenizer.pad_token_id,
    )
    assert model.generation_config.eos_token_id == byte_tokenizer.eos_token_id
    prompt = byte_tokenizer.apply_chat_template(CHAT[:-1], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits
    assert logits.shape == (1, len(prompt), config.vocab_size) and torch.isfinite(logits).all()


def test_context_and_size_are_configurable(tmp_path):
    built = assets.build_assets(tmp_path, seed=1, tokenizer="bytes", context=4096, size="small")
    hf = read_hf_config(built.model_dir)
    assert (hf["max_position_embeddings"], hf["hidden_size"], hf["num_hidden_layers"]) == (4096, 256, 4)
    model = model_config_from_hf(hf)
    assert model.vocab_size == assets.BYTE_VOCAB_SIZE and model.add_qkv_bias
    assert (model.num_attention_heads, model.query_groups) == (4, 2)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(built.tokenizer_dir).model_max_length == 4096


@pytest.mark.parametrize("size", list(assets.MODEL_SIZES))
def test_documented_parameter_counts(size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=assets.BYTE_VOCAB_SIZE, tie_word_embeddings=False, **assets.MODEL_SIZES[size]
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == assets.BYTE_MODEL_PARAMETERS[size]


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        assets.build_assets(tmp_path, tokenizer="words")
    with pytest.raises(ValueError, match="unknown model size"):
        assets.build_assets(tmp_path, size="huge")
    with pytest.raises(ValueError, match="context"):
        assets.build_assets(tmp_path, tokenizer="bytes", context=0)
    assert not any(tmp_path.iterdir())


def test_cli_arguments():
    args = assets._parse_args(["out", "--tokenizer", "bytes", "--context", "2048", "--size", "small"])
    assert (args.directory, args.tokenizer, args.context, args.size, args.seed) == (
        "out",
        "bytes",
        2048,
        "small",
        0,
    )
    defaults = assets._parse_args([])
    assert (defaults.tokenizer, defaults.context, defaults.size) == ("chars", None, "tiny")
