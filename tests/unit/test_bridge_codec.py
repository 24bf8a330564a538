"""The bridge's codec: Atropos groups -> validated, label-aligned batches -> protobuf and back."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from atropos_megatron.algo.alignment import align_to_labels
from atropos_megatron.bridge import codec
from atropos_megatron.bridge.codec import (
    REJECTION_REASONS,
    EncodedBatch,
    GroupInfo,
    batch_from_proto,
    batch_to_proto,
    encode_batch,
    tensor_from_proto,
    tensor_to_proto,
    validate_group,
)
from atropos_megatron.bridge.v1 import bridge_pb2

OPTIONAL = ("advantages", "inference_logprobs", "ref_logprobs")


def encode(groups, *, vocab_size=None, max_token_len=None):
    return encode_batch(
        groups,
        batch_id="b-1",
        step=7,
        vocab_size=vocab_size,
        max_token_len=max_token_len,
        fetched_unix_s=12.5,
    )


def f32(values):
    return np.array(values, dtype=np.float32)


def i32(values):
    return np.array(values, dtype=np.int32)


def assert_batches_equal(actual: EncodedBatch, expected: EncodedBatch) -> None:
    assert (actual.batch_id, actual.step, actual.fetched_unix_s) == (
        expected.batch_id,
        expected.step,
        expected.fetched_unix_s,
    )
    assert actual.groups == expected.groups
    for name in ("seq_lens", "input_ids", "labels", "loss_mask", "scores", "group_index", *OPTIONAL):
        got, want = getattr(actual, name), getattr(expected, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def small_group(env_id=0, first_token=5):
    """Two valid sequences with every optional array."""
    return {
        "tokens": [[first_token, 6, 7, 8], [first_token, 9, 10]],
        "masks": [[-100, -100, 7, 8], [-100, 9, 10]],
        "scores": [1.0, 0.0],
        "advantages": [[0.0, 0.0, 0.5, 0.5], [0.0, -0.5, -0.5]],
        "inference_logprobs": [[1.0, 1.0, -0.1, -0.2], [1.0, -0.3, -0.4]],
        "ref_logprobs": [[0.0, 0.0, -0.15, -0.25], [0.0, -0.35, -0.45]],
        "env_id": env_id,
        "generation_params": None,
        "overrides": None,
        "group_overrides": None,
    }


# ------------------------------------------------------------------------------------------------
# Hand-made batch
# ------------------------------------------------------------------------------------------------


def test_hand_made_batch_matches_hand_computed_arrays():
    group_a = {
        "tokens": [[5, 6, 7, 8], [5, 9, 10]],
        "masks": [[-100, -100, 7, 8], [-100, 9, 10]],
        "scores": [1.0, 0],
        # untrained positions hold garbage that must become 0
        "advantages": [[9.0, 9.0, 0.5, 0.5], [7.0, -0.5, -0.5]],
        "inference_logprobs": [[1.0, 1.0, -0.1, -0.2], [1.0, -0.3, -0.4]],
        "ref_logprobs": None,
        "generation_params": {"temperature": 0.7},
        "overrides": [{"set_advantage_to_zero": True}, None],
        "group_overrides": None,
        "env_id": 3,
        "messages": None,
        "images": None,
    }
    group_b = {"tokens": [[1, 2]], "masks": [[-100, 2]], "scores": [0.5], "ref_logprobs": [[0.0, -1.5]]}

    batch, rejections = encode([group_a, group_b], vocab_size=11, max_token_len=4)

    assert rejections == []
    assert (batch.batch_id, batch.step, batch.fetched_unix_s) == ("b-1", 7, 12.5)
    assert (batch.num_sequences, batch.num_groups, batch.num_tokens) == (3, 2, 6)
    expected = EncodedBatch(
        batch_id="b-1",
        step=7,
        seq_lens=i32([3, 2, 1]),
        input_ids=i32([5, 6, 7, 5, 9, 1]),
        labels=i32([6, 7, 8, 9, 10, 2]),
        loss_mask=np.array([False, True, True, True, True, True]),
        scores=f32([1.0, 0.0, 0.5]),
        group_index=i32([0, 0, 1]),
        advantages=f32([0.0, 0.5, 0.5, -0.5, -0.5, 0.0]),
        inference_logprobs=f32([0.0, -0.1, -0.2, -0.3, -0.4, 0.0]),
        ref_logprobs=f32([0.0, 0.0, 0.0, 0.0, 0.0, -1.5]),
        groups=(
            GroupInfo(
                env_id=3,
                overrides_json='{"generation_params": {"temperature": 0.7}, "group_overrides": null, '
                '"overrides": [{"set_advantage_to_zero": true}, null]}',
                has_advantages=True,
                has_inference_logprobs=True,
                has_ref_logprobs=False,
            ),
            GroupInfo(
                env_id=-1,
                overrides_json='{"generation_params": null, "group_overrides": null, "overrides": null}',
                has_advantages=False,
                has_inference_logprobs=False,
                has_ref_logprobs=True,
            ),
        ),
        fetched_unix_s=12.5,
    )
    assert_batches_equal(batch, expected)


def test_placeholders_at_untrained_positions_are_ignored():
    group = {
        "tokens": [[4, 5, 6, 7]],
        # position 0 is trained but is no label after the shift: its values are dropped too
        "masks": [[4, -100, 6, -100]],
        "scores": [0.0],
        "advantages": [[math.nan, math.inf, 0.25, math.nan]],
        "inference_logprobs": [[5.0, 1.0, -0.5, math.nan]],
        "ref_logprobs": [[math.inf, 1.0, -0.75, 1.0]],
    }
    assert validate_group(group, vocab_size=8, max_token_len=None) is None
    batch, _ = encode([group])
    np.testing.assert_array_equal(batch.loss_mask, [False, True, False])
    np.testing.assert_array_equal(batch.advantages, f32([0.0, 0.25, 0.0]))
    np.testing.assert_array_equal(batch.inference_logprobs, f32([0.0, -0.5, 0.0]))
    np.testing.assert_array_equal(batch.ref_logprobs, f32([0.0, -0.75, 0.0]))


def test_limits_are_inclusive_and_disabled_by_none_or_zero():
    group = {"tokens": [[0, 1, 99]], "masks": [[-100, 1, 99]], "scores": [1.0]}
    assert validate_group(group, vocab_size=100, max_token_len=3) is None
    assert validate_group(group, vocab_size=99, max_token_len=3).reason == "token_out_of_vocab"
    assert validate_group(group, vocab_size=100, max_token_len=2).reason == "too_long"
    assert validate_group(group, vocab_size=0, max_token_len=0) is None
    assert validate_group(group, vocab_size=None, max_token_len=None) is None


# ------------------------------------------------------------------------------------------------
# Equivalence with the torch reference
# ------------------------------------------------------------------------------------------------


def random_group(rng: np.random.Generator, env_id: int, vocab_size: int) -> dict:
    group = {"tokens": [], "masks": [], "scores": [], "env_id": env_id}
    group.update({name: [] for name in OPTIONAL})
    for _ in range(int(rng.integers(1, 5))):
        length = int(rng.integers(2, 40))
        tokens = rng.integers(0, vocab_size, size=length)
        trained = rng.random(length) < 0.6
        trained[: int(rng.integers(0, length - 1))] = False  # a prompt prefix
        trained[int(rng.integers(1, length))] = True  # at least one trained label
        masks = np.where(trained, tokens, -100)
        logprobs = np.where(trained, -rng.exponential(1.0, length), 1.0)
        advantages = np.where(trained, rng.normal(size=length), np.nan)
        group["tokens"].append(tokens.tolist())
        group["masks"].append(masks.tolist())
        group["scores"].append(float(rng.normal()))
        group["advantages"].append(advantages.tolist())
        group["inference_logprobs"].append(logprobs.tolist())
        group["ref_logprobs"].append((logprobs - rng.random(length)).tolist())
    return group


def test_every_sequence_matches_align_to_labels():
    rng = np.random.default_rng(1234)
    groups = [random_group(rng, env_id, vocab_size=500) for env_id in range(6)]

    batch, rejections = encode(groups, vocab_size=500, max_token_len=64)

    assert rejections == []
    assert batch.num_groups == 6
    ends = np.cumsum(batch.seq_lens)
    starts = ends - batch.seq_lens
    sequence = 0
    for group_number, group in enumerate(groups):
        for row in range(len(group["tokens"])):
            reference = align_to_labels(
                group["tokens"][row],
                group["masks"][row],
                **{name: group[name][row] for name in OPTIONAL},
            )
            part = slice(starts[sequence], ends[sequence])
            assert batch.group_index[sequence] == group_number
            assert batch.scores[sequence] == np.float32(group["scores"][row])
            np.testing.assert_array_equal(batch.input_ids[part], reference.input_ids.numpy())
            np.testing.assert_array_equal(batch.labels[part], reference.labels.numpy())
            np.testing.assert_array_equal(batch.loss_mask[part], reference.loss_mask.numpy())
            for name in OPTIONAL:
                np.testing.assert_array_equal(getattr(batch, name)[part], getattr(reference, name).numpy())
            sequence += 1
    assert sequence == batch.num_sequences
    assert batch.num_tokens == int(ends[-1])


# ------------------------------------------------------------------------------------------------
# Rejections
# ------------------------------------------------------------------------------------------------


def set_row(field, row, value):
    def mutate(group):
        group[field][row] = value
        return group

    return mutate


def set_item(field, row, position, value):
    def mutate(group):
        group[field][row][position] = value
        return group

    return mutate


def set_key(key, value):
    def mutate(group):
        group[key] = value
        return group

    return mutate


def delete_key(key):
    def mutate(group):
        del group[key]
        return group

    return mutate


def replace_sequence(row, tokens, masks):
    """Replace one sequence, keeping every per-token array consistent with it."""

    def mutate(group):
        trained = [mask != -100 for mask in masks]
        group["tokens"][row] = tokens
        group["masks"][row] = masks
        group["advantages"][row] = [0.25] * len(tokens)
        group["inference_logprobs"][row] = [-0.5 if t else 1.0 for t in trained]
        group["ref_logprobs"][row] = [-0.5] * len(tokens)
        return group

    return mutate


class Unserializable:
    pass


REJECTION_CASES = [
    # (reason, mutation of small_group(env_id=7), words the detail must contain, env_id reported)
    ("malformed", lambda group: [group["tokens"]], "not a dict", None),
    ("malformed", delete_key("masks"), "'masks' is missing", 7),
    ("malformed", set_key("tokens", "5 6 7"), "tokens is a str", 7),
    ("malformed", set_row("tokens", 1, "abc"), "sequence 1: tokens is a str", 7),
    ("malformed", set_item("tokens", 1, 2, 10.0), "sequence 1: tokens holds float", 7),
    ("malformed", set_item("tokens", 0, 1, True), "sequence 0: tokens holds bool", 7),
    ("malformed", set_item("masks", 0, 1, None), "sequence 0: masks holds NoneType", 7),
    ("malformed", set_item("tokens", 0, 1, [6]), "tokens holds list", 7),
    ("malformed", set_key("scores", [1.0, "high"]), "scores holds str", 7),
    ("malformed", set_item("advantages", 1, 0, "0"), "sequence 1: advantages holds str", 7),
    ("malformed", set_key("inference_logprobs", {"a": 1}), "inference_logprobs is a dict", 7),
    ("malformed", set_key("env_id", "7"), "env_id is '7'", None),
    ("malformed", set_key("env_id", 2**63), "env_id is 9223372036854775808", 2**63),
    ("malformed", set_key("generation_params", [0.7]), "generation_params is a list", 7),
    ("malformed", set_key("overrides", [{"t": Unserializable()}, None]), "not JSON serializable", 7),
    ("malformed", set_key("group_overrides", {"temperature": math.nan}), "Out of range float", 7),
    ("malformed", set_key("overrides", [None]), "overrides has 1 entries for 2 sequences", 7),
    ("malformed", set_key("overrides", [{}, 3]), "overrides[1] is 3, not a dict", 7),
    ("ragged_lengths", set_key("tokens", []), "zero sequences", 7),
    ("ragged_lengths", set_key("scores", [1.0]), "scores has 1 entries for 2 sequences", 7),
    ("ragged_lengths", set_key("masks", [[-100, -100, 7, 8]]), "masks has 1 entries for 2 sequences", 7),
    ("ragged_lengths", set_key("ref_logprobs", [[0.0] * 4]), "ref_logprobs has 1 entries", 7),
    ("ragged_lengths", set_row("masks", 1, [-100, 9]), "sequence 1: masks has 2 entries for 3 tokens", 7),
    ("ragged_lengths", set_row("advantages", 0, [0.0] * 5), "sequence 0: advantages has 5 entries", 7),
    ("too_short", replace_sequence(0, [5], [5]), "sequence 0 has 1 tokens, fewer than 2", 7),
    ("too_short", replace_sequence(1, [], []), "sequence 1 has 0 tokens", 7),
    (
        "too_long",
        replace_sequence(1, list(range(9)), [-100] + list(range(1, 9))),
        "sequence 1 has 9 tokens",
        7,
    ),
    ("token_out_of_vocab", set_item("tokens", 0, 0, 100), "sequence 0: tokens[0]=100", 7),
    ("token_out_of_vocab", set_item("tokens", 1, 0, -3), "sequence 1: tokens[0]=-3", 7),
    ("token_out_of_vocab", set_item("masks", 1, 0, 250), "sequence 1: masks[0]=250", 7),
    ("token_out_of_vocab", set_item("tokens", 0, 0, 2**70), "beyond the int64 range", 7),
    (
        "mask_mismatch",
        set_item("masks", 1, 2, 11),
        "sequence 1: masks[2]=11 is neither -100 nor tokens[2]=10",
        7,
    ),
    ("mask_mismatch", set_item("masks", 0, 0, 6), "sequence 0: masks[0]=6", 7),
    ("empty_completion", set_row("masks", 1, [5, -100, -100]), "sequence 1: no trained token", 7),
    ("non_finite_score", set_key("scores", [1.0, math.nan]), "scores[1]=nan", 7),
    ("non_finite_score", set_key("scores", [-math.inf, 0.0]), "scores[0]=-inf", 7),
    ("non_finite_score", set_key("scores", [1e39, 0.0]), "scores[0]=1e+39", 7),
    (
        "invalid_logprobs",
        set_item("inference_logprobs", 1, 2, 1.0),
        "sequence 1: inference_logprobs[2]=1.0",
        7,
    ),
    ("invalid_logprobs", set_item("inference_logprobs", 0, 3, 0.01), "inference_logprobs[3]=0.01", 7),
    ("invalid_logprobs", set_item("ref_logprobs", 0, 2, math.nan), "sequence 0: ref_logprobs[2]=nan", 7),
    ("invalid_logprobs", set_item("ref_logprobs", 1, 1, -math.inf), "ref_logprobs[1]=-inf", 7),
    ("non_finite_advantages", set_item("advantages", 1, 2, math.inf), "sequence 1: advantages[2]=inf", 7),
    ("non_finite_advantages", set_item("advantages", 0, 3, -1e300), "advantages[3]=-inf", 7),
]


def test_every_rejection_reason_has_a_case():
    assert sorted({case[0] for case in REJECTION_CASES}) == sorted(REJECTION_REASONS)
    assert len(set(REJECTION_REASONS)) == len(REJECTION_REASONS)


@pytest.mark.parametrize(("reason", "mutate", "detail", "env_id"), REJECTION_CASES)
def test_a_bad_group_is_rejected_whole_and_the_others_survive(reason, mutate, detail, env_id):
    bad = mutate(small_group(env_id=7))
    groups = [small_group(env_id=0, first_token=1), bad, small_group(env_id=2, first_token=2)]

    batch, rejections = encode(groups, vocab_size=100, max_token_len=8)

    assert [(r.reason, r.env_id) for r in rejections] == [(reason, env_id)]
    assert detail in rejections[0].detail
    assert rejections[0].detail.startswith("group 1: ")
    assert [info.env_id for info in batch.groups] == [0, 2]
    np.testing.assert_array_equal(batch.group_index, [0, 0, 1, 1])
    np.testing.assert_array_equal(batch.input_ids, [1, 6, 7, 1, 9, 2, 6, 7, 2, 9])
    assert validate_group(bad, vocab_size=100, max_token_len=8).reason == reason


def test_the_valid_small_group_is_valid():
    assert validate_group(small_group(), vocab_size=100, max_token_len=8) is None


def test_no_surviving_group_gives_no_batch():
    assert encode(None) == (None, [])
    assert encode([]) == (None, [])
    batch, rejections = encode([{"tokens": [[1]], "masks": [[1]], "scores": [0.0]}, 5])
    assert batch is None
    assert [r.reason for r in rejections] == ["too_short", "malformed"]
    batch, rejections = encode({"batch": []})
    assert batch is None
    assert [r.reason for r in rejections] == ["malformed"]


def test_garbage_never_raises():
    rng = np.random.default_rng(7)
    garbage = [None, "x", 1.5, True, -1, 2**80, [], [None], [[1, 2]], {}, {"a": 1}, math.nan, [1.0, 2.0]]
    paths = []
    for key, value in small_group().items():
        paths.append((key,))
        if isinstance(value, list):
            for row, item in enumerate(value):
                paths.append((key, row))
                if isinstance(item, list):
                    paths.extend((key, row, position) for position in range(len(item)))
    for _ in range(500):
        group = small_group(env_id=1)
        for _ in range(int(rng.integers(1, 4))):
            path = paths[int(rng.integers(len(paths)))]
            target = group
            try:
                for step in path[:-1]:
                    target = target[step]
                target[path[-1]] = copy.deepcopy(garbage[int(rng.integers(len(garbage)))])
            except (TypeError, IndexError, KeyError):
                pass  # an earlier mutation changed the structure under this path
        batch, rejections = encode([group], vocab_size=100, max_token_len=8)
        assert (batch is None) == (len(rejections) == 1)
        assert all(r.reason in REJECTION_REASONS for r in rejections)


# ------------------------------------------------------------------------------------------------
# Optional arrays across groups
# ------------------------------------------------------------------------------------------------


def test_optional_arrays_are_zero_for_groups_without_them():
    only_advantages = {**small_group(env_id=0), "inference_logprobs": None, "ref_logprobs": None}
    only_logprobs = {**small_group(env_id=1), "advantages": None, "ref_logprobs": None}
    neither = {**small_group(env_id=2), "advantages": None, "inference_logprobs": None, "ref_logprobs": None}

    batch, rejections = encode([only_advantages, only_logprobs, neither])

    assert rejections == []
    assert batch.ref_logprobs is None
    flags = [(g.has_advantages, g.has_inference_logprobs, g.has_ref_logprobs) for g in batch.groups]
    assert flags == [(True, False, False), (False, True, False), (False, False, False)]
    group_values = f32([0.0, 0.5, 0.5, -0.5, -0.5])  # small_group's advantages after the shift
    zeros = np.zeros(5, dtype=np.float32)
    np.testing.assert_array_equal(batch.advantages, np.concatenate([group_values, zeros, zeros]))
    logprobs = f32([0.0, -0.1, -0.2, -0.3, -0.4])
    np.testing.assert_array_equal(batch.inference_logprobs, np.concatenate([zeros, logprobs, zeros]))

    batch, _ = encode([neither])
    assert (batch.advantages, batch.inference_logprobs, batch.ref_logprobs) == (None, None, None)


# ------------------------------------------------------------------------------------------------
# Protobuf
# ------------------------------------------------------------------------------------------------


def mixed_batch() -> EncodedBatch:
    rng = np.random.default_rng(99)
    groups = [random_group(rng, env_id, vocab_size=1000) for env_id in range(3)]
    groups[1]["advantages"] = None
    groups[2]["overrides"] = [{"temperature": 0.5}] * len(groups[2]["tokens"])
    groups[2]["env_id"] = None
    batch, rejections = encode(groups)
    assert rejections == []
    return batch


def test_proto_round_trip_keeps_every_field():
    batch = mixed_batch()
    message = batch_to_proto(batch)
    assert (message.num_sequences, message.num_groups) == (batch.num_sequences, 3)
    assert message.HasField("advantages") and batch.advantages is not None
    assert [g.has_advantages for g in batch.groups] == [True, False, True]
    assert_batches_equal(batch_from_proto(message), batch)
    wire = message.SerializeToString()
    assert_batches_equal(batch_from_proto(bridge_pb2.TrainingBatch.FromString(wire)), batch)


def test_proto_round_trip_without_optional_arrays():
    group = {"tokens": [[3, 4, 5]], "masks": [[-100, 4, 5]], "scores": [2.0]}
    batch, _ = encode([group])
    message = bridge_pb2.TrainingBatch.FromString(batch_to_proto(batch).SerializeToString())
    assert not any(message.HasField(name) for name in OPTIONAL)
    assert_batches_equal(batch_from_proto(message), batch)


def break_tensor(field, array):
    def mutate(message):
        getattr(message, field).CopyFrom(tensor_to_proto(array))

    return mutate


BAD_MESSAGES = [
    ("seq_lens", lambda m: m.ClearField("seq_lens")),
    ("input_ids", lambda m: setattr(m.input_ids, "data", m.input_ids.data[:-4])),
    ("labels", lambda m: m.labels.CopyFrom(tensor_to_proto(tensor_from_proto(m.labels).astype(np.int64)))),
    ("loss_mask", lambda m: m.loss_mask.CopyFrom(tensor_to_proto(tensor_from_proto(m.loss_mask)[:-1]))),
    ("scores", lambda m: m.scores.CopyFrom(tensor_to_proto(tensor_from_proto(m.scores).reshape(1, -1)))),
    ("advantages", lambda m: m.advantages.CopyFrom(tensor_to_proto(np.zeros(3, np.float32)))),
    ("inference_logprobs", lambda m: setattr(m.inference_logprobs, "dtype", bridge_pb2.DTYPE_UNSPECIFIED)),
    ("groups", lambda m: m.groups.__delitem__(-1)),
    (
        "group_index",
        lambda m: m.group_index.CopyFrom(tensor_to_proto(tensor_from_proto(m.group_index)[::-1])),
    ),
    ("group_index", lambda m: m.group_index.CopyFrom(tensor_to_proto(np.zeros(m.num_sequences, np.int32)))),
    ("seq_lens", lambda m: m.seq_lens.CopyFrom(tensor_to_proto(np.zeros(m.num_sequences, np.int32)))),
]


@pytest.mark.parametrize(("field", "mutate"), BAD_MESSAGES)
def test_batch_from_proto_names_the_inconsistent_field(field, mutate):
    message = batch_to_proto(mixed_batch())
    batch_from_proto(message)  # the unbroken message decodes
    mutate(message)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        batch_from_proto(message)


@pytest.mark.parametrize(
    "array",
    [
        np.array([1, -2, 2**31 - 1], dtype=np.int32),
        np.array([[1, 2], [3, -(2**40)]], dtype=np.int64),
        np.array([0.5, -np.inf, np.nan], dtype=np.float32),
        np.array([1.5, -2.0], dtype=np.float16),
        np.array([True, False, True]),
        np.array([0, 255], dtype=np.uint8),
        np.array(3.25, dtype=np.float32),
        np.zeros((0, 4), dtype=np.int32),
        np.array([1, 258], dtype=">i4"),
    ],
    ids=lambda array: f"{array.dtype.str}{list(array.shape)}",
)
def test_tensor_round_trip(array):
    message = bridge_pb2.Tensor.FromString(tensor_to_proto(array).SerializeToString())
    assert list(message.shape) == list(array.shape)
    decoded = tensor_from_proto(message)
    assert decoded.dtype == array.dtype.newbyteorder("=")
    assert decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)


def test_tensor_bytes_are_little_endian_one_byte_per_bool():
    assert tensor_to_proto(np.array([1, 258], dtype=">i4")).data == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    message = tensor_to_proto(np.array([True, False]))
    assert (message.data, message.dtype) == (b"\x01\x00", bridge_pb2.DTYPE_BOOL)


def test_tensor_from_proto_rejects_wrong_byte_length():
    message = tensor_to_proto(np.arange(3, dtype=np.int32))
    message.data = message.data + b"\x00"
    with pytest.raises(ValueError, match="needs 12 bytes, got 13"):
        tensor_from_proto(message)
    message.shape[:] = [2, 2]
    with pytest.raises(ValueError, match="needs 16 bytes"):
        tensor_from_proto(message)


@pytest.mark.parametrize("dtype", [bridge_pb2.DTYPE_UNSPECIFIED, bridge_pb2.DTYPE_BFLOAT16, 42])
def test_tensor_from_proto_rejects_unknown_dtype(dtype):
    message = bridge_pb2.Tensor(data=b"\x00\x00", shape=[1])
    message.dtype = dtype
    with pytest.raises(ValueError, match="unsupported tensor dtype"):
        tensor_from_proto(message)


def test_tensor_from_proto_rejects_bool_bytes_other_than_0_and_1():
    with pytest.raises(ValueError, match="0 or 1"):
        tensor_from_proto(bridge_pb2.Tensor(data=b"\x01\x02", dtype=bridge_pb2.DTYPE_BOOL, shape=[2]))


def test_tensor_to_proto_rejects_dtypes_the_proto_lacks():
    with pytest.raises(ValueError, match="float64"):
        tensor_to_proto(np.zeros(2, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Import boundary
# ------------------------------------------------------------------------------------------------


def test_codec_does_not_import_torch():
    code = "import sys, atropos_megatron.bridge.codec\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_overrides_json_round_trips_to_the_sent_values():
    group = small_group()
    group["generation_params"] = {"temperature": 0.9, "max_tokens": 16}
    group["group_overrides"] = {"group_size": 2}
    group["overrides"] = [{"temperature": 0.5}, {"set_advantage_to_zero": True}]
    info = codec.align_group(group, vocab_size=None, max_token_len=None).info
    assert json.loads(info.overrides_json) == {
        "generation_params": {"temperature": 0.9, "max_tokens": 16},
        "group_overrides": {"group_size": 2},
        "overrides": [{"temperature": 0.5}, {"set_advantage_to_zero": True}],
    }
