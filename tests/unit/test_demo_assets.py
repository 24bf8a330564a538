"""The demo's assets: built deterministically, the tokenizer round-trips the task's text, the
checkpoint is one our converter accepts, and the reward means what the environment says."""

from __future__ import annotations

import random

import pytest
import torch

from atropos_megatron.demo import assets
from atropos_megatron.weights.hf_architectures import model_config_from_hf, read_hf_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return [assets.build_assets(tmp_path_factory.mktemp(f"assets{i}"), seed=7) for i in range(2)]


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
