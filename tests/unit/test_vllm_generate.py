"""The bridge's translation of atroposlib's ``/generate`` onto vLLM 0.33's ``/inference/v1/generate``
(``bridge/vllm_generate.py``): what is sent, what comes back, and what is refused by name.

The replies below are in the shape of vLLM 0.33.0's ``GenerateTokensResponse``
(``entrypoints/scale_out/token_in_token_out/protocol.py``); the end-to-end check against a server and
atroposlib's own ``VLLMServer`` is ``tests/integration/test_vllm_generate_proxy.py``.
"""

from __future__ import annotations

import pytest

from atropos_megatron.bridge.vllm_generate import (
    GenerationAborted,
    TranslationError,
    UnexpectedReply,
    to_atropos,
    to_scale_out,
)

PROMPT = [5, 17, 42]


def atropos_body(**sampling):
    """What atroposlib 0.4.0's ``VLLMServer._tokens_and_logprobs_completion_wrapper`` posts."""
    return {"prompt": {"prompt_token_ids": list(PROMPT)}, "logprobs": 0, **sampling}


def choice(index, tokens, logprobs, finish="length", tops=None):
    content = [
        {"token_id": t, "logprob": lp, "rank": 1, "top_logprobs": (tops or {}).get(j, [])}
        for j, (t, lp) in enumerate(zip(tokens, logprobs, strict=True))
    ]
    return {"index": index, "finish_reason": finish, "stop_reason": None, "token_ids": tokens,
            "logprobs": {"content": content}, "routed_experts": None}  # fmt: skip


def test_the_request_becomes_token_ids_and_sampling_params():
    request = to_scale_out(atropos_body(n=2, max_tokens=8, temperature=0.7, top_p=0.9, stop=["</a>"]))
    assert request.body == {
        "token_ids": PROMPT,
        "sampling_params": {
            "logprobs": 0,
            "n": 2,
            "max_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["</a>"],
        },  # fmt: skip
        "return_token_ids": True,
    }
    assert request.logprobs == 0 and request.prompt_logprobs is None
    assert "model" not in to_scale_out(atropos_body(model="served")).body["sampling_params"]
    # the bridge's newest LoRA adapter runs it: vLLM selects adapters by model name
    assert to_scale_out(atropos_body(), adapter="policy-v3").body["model"] == "policy-v3"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"prompt": "text"}, "prompt_token_ids"),
        ({"prompt": {"prompt_token_ids": []}}, "non-empty"),
        ({"prompt": {"prompt_token_ids": [1, -2]}}, "integers >= 0"),
        ({"prompt": {"prompt_token_ids": [1, True]}}, "integers >= 0"),
        (atropos_body(max_new_tokens=4), "max_new_tokens"),  # atroposlib renames it; a raw caller may not
        (atropos_body(stream=True), "stream"),
        (atropos_body(logprobs="all"), "logprobs"),
        ([1, 2], "JSON object"),
    ],
)
def test_requests_vllm_would_misread_are_refused_by_name(body, names):
    with pytest.raises(TranslationError, match=names):
        to_scale_out(body)


def test_the_reply_gives_atroposlib_ids_logprobs_and_finish_reasons_in_choice_order():
    request = to_scale_out(atropos_body(n=2))
    reply = {"choices": [choice(1, [9, 4], [-0.5, -1.5], "stop"), choice(0, [7], [-2.0], "repetition")],
             "prompt_logprobs": None}  # fmt: skip
    out = to_atropos(reply, request)
    assert out["finish_reasons"] == ["stop", "stop"]
    assert out["token_ids"] == [[7], [9, 4]]
    assert out["logprobs"] == [[[{"7": -2.0}]], [[{"9": -0.5}], [{"4": -1.5}]]]
    assert out["prompt_token_ids"] == PROMPT and "prompt_logprobs" not in out


def test_top_logprobs_follow_the_sampled_token():
    request = to_scale_out(atropos_body(logprobs=2))
    tops = {0: [{"token_id": 3, "logprob": -0.1, "rank": 1}, {"token_id": 7, "logprob": -2.0, "rank": 2}]}
    (position,) = to_atropos({"choices": [choice(0, [7], [-2.0], tops=tops)]}, request)["logprobs"][0]
    assert list(position[0].items()) == [("7", -2.0), ("3", -0.1)]  # sampled first: atroposlib reads it


def test_prompt_logprobs_become_id_to_logprob_per_position():
    request = to_scale_out(
        {
            "prompt": {"prompt_token_ids": PROMPT},
            "prompt_logprobs": 1,
            "n": 1,
            "temperature": 0.0,
            "max_tokens": 1,
        }
    )  # fmt: skip: atroposlib's get_logprobs
    reply = {"choices": [{"index": 0, "finish_reason": "length", "token_ids": [2], "logprobs": None}],
             "prompt_logprobs": [None, {"17": {"logprob": -3.0, "rank": 4, "decoded_token": None},
                                        "1": {"logprob": -0.2, "rank": 1, "decoded_token": None}},
                                 {"42": {"logprob": -1.0, "rank": 1, "decoded_token": None}}]}  # fmt: skip
    out = to_atropos(reply, request)
    assert out["prompt_logprobs"] == [None, {"17": -3.0, "1": -0.2}, {"42": -1.0}]
    assert "logprobs" not in out  # none asked for
    with pytest.raises(UnexpectedReply, match="prompt_logprobs"):
        to_atropos({**reply, "prompt_logprobs": None}, request)


def test_an_aborted_sample_is_a_retry_not_a_short_sample():
    request = to_scale_out(atropos_body(n=2))
    reply = {"choices": [choice(0, [7], [-2.0]), choice(1, [9], [-0.5], "abort")]}
    with pytest.raises(GenerationAborted, match="choices\\[1\\]"):
        to_atropos(reply, request)


@pytest.mark.parametrize(
    ("choices", "names"),
    [
        ([], "no choices"),
        ([{**choice(0, [7], [-2.0]), "finish_reason": "error"}], "finish_reason"),
        ([{**choice(0, [7], [-2.0]), "token_ids": ["token_id:7"]}], "token_ids"),  # an older release's shape
        ([{**choice(0, [7], [-2.0]), "logprobs": None}], "logprobs"),
        ([{**choice(0, [7, 8], [-2.0, -1.0]), "token_ids": [7]}], "2 log-probs for 1 tokens"),
        ([{**choice(0, [7], [-2.0]), "token_ids": [8]}], "not the token sampled"),
    ],
)
def test_replies_of_another_shape_are_refused_by_field(choices, names):
    with pytest.raises(UnexpectedReply, match=names):
        to_atropos({"choices": choices}, to_scale_out(atropos_body()))
