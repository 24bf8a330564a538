"""Atropos groups in, validated label-aligned ``TrainingBatch`` out, and the protobuf tensors in between.

The Atropos API checks types loosely and lengths not at all, so anything an environment sends reaches
the bridge. Each group is checked here, before the trainer sees it, and is accepted or rejected whole
(GRPO compares the sequences of a group with each other). A rejection carries a named reason so that
the bridge can count it. The accepted groups are shifted to label alignment exactly as
``algo/alignment.py`` does it, but with numpy, because the bridge never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atropos_megatron.bridge.v1 import bridge_pb2

IGNORE_INDEX = -100
"""A ``masks`` entry that marks an untrained position (any other entry is the token id itself)."""

LOGPROB_TOLERANCE = 1e-4
"""The largest log-prob accepted at a trained position (a log-prob is <= 0; this allows rounding)."""

REJECTION_REASONS: tuple[str, ...] = (
    # malformed: not a dict, a required key missing, a wrong type (non-list, non-integer or boolean
    #   token, non-number score), bad env_id/generation_params/group_overrides/overrides, overrides not
    #   JSON-serializable, or an overrides list whose length is not the number of sequences.
    "malformed",
    # ragged_lengths: zero sequences; len(masks), len(scores) or an optional array's sequence count
    #   differs from len(tokens); or a per-token array's length differs from its sequence's tokens.
    "ragged_lengths",
    # too_short: a sequence with fewer than 2 tokens (nothing left to predict after the shift).
    "too_short",
    # too_long: a sequence longer than max_token_len tokens (when max_token_len is set and > 0).
    "too_long",
    # token_out_of_vocab: a token or trained mask entry < 0, >= vocab_size (when set) or beyond int32.
    "token_out_of_vocab",
    # mask_mismatch: a trained mask entry (not -100) that is not the token at its position.
    "mask_mismatch",
    # empty_completion: a sequence with no trained label after the shift (masks[1:] all -100).
    "empty_completion",
    # non_finite_score: a NaN or infinite score (after conversion to float32).
    "non_finite_score",
    # invalid_logprobs: a NaN, infinite or positive (> LOGPROB_TOLERANCE) inference or reference
    #   log-prob at a trained label position (so the 1.0 placeholder there is an error).
    "invalid_logprobs",
    # non_finite_advantages: a NaN or infinite advantage at a trained label position.
    "non_finite_advantages",
)

OPTIONAL_TOKEN_FIELDS: tuple[str, ...] = ("advantages", "inference_logprobs", "ref_logprobs")
"""Per-token float arrays a group may send (aligned with ``tokens``), in TrainingBatch order."""

_REQUIRED_FIELDS = ("tokens", "masks", "scores")
_INT32_LIMIT = int(np.iinfo(np.int32).max) + 1


@dataclass(frozen=True)
class Rejection:
    """A group the bridge refused, and why."""

    reason: str
    """One of :data:`REJECTION_REASONS`."""
    env_id: int | None
    """The group's env_id, when it sent a valid one."""
    detail: str
    """Human-readable: names the sequence, the position and the offending value."""


@dataclass(frozen=True)
class GroupInfo:
    """Per-group facts that are not tensors (mirror of the proto's ``GroupInfo``)."""

    env_id: int
    """Atropos env id, -1 when the group did not set one."""
    overrides_json: str
    """``{"generation_params": ..., "group_overrides": ..., "overrides": ...}`` as JSON, keys sorted."""
    has_advantages: bool
    has_inference_logprobs: bool
    has_ref_logprobs: bool


@dataclass(frozen=True, eq=False)
class AlignedGroup:
    """One valid group, label-aligned; its sequences packed back to back (``T`` = its tokens)."""

    info: GroupInfo
    seq_lens: np.ndarray
    """int32 ``[N]``: ``len(tokens) - 1`` per sequence."""
    input_ids: np.ndarray
    """int32 ``[T]``."""
    labels: np.ndarray
    """int32 ``[T]``."""
    loss_mask: np.ndarray
    """bool ``[T]``."""
    scores: np.ndarray
    """float32 ``[N]``."""
    advantages: np.ndarray | None
    """float32 ``[T]``, 0 where untrained; None when the group did not send the field."""
    inference_logprobs: np.ndarray | None
    ref_logprobs: np.ndarray | None


@dataclass(frozen=True, eq=False)
class EncodedBatch:
    """A numpy mirror of the proto ``TrainingBatch`` (N sequences, T tokens after the shift, G groups).

    Compares by identity (numpy arrays have no single truth value); compare fields to test equality.
    """

    batch_id: str
    step: int
    seq_lens: np.ndarray
    """int32 ``[N]``."""
    input_ids: np.ndarray
    """int32 ``[T]``."""
    labels: np.ndarray
    """int32 ``[T]``."""
    loss_mask: np.ndarray
    """bool ``[T]``."""
    scores: np.ndarray
    """float32 ``[N]``."""
    group_index: np.ndarray
    """int32 ``[N]``: 0..G-1, groups contiguous."""
    advantages: np.ndarray | None
    """float32 ``[T]`` or None when no group sent the field."""
    inference_logprobs: np.ndarray | None
    """float32 ``[T]`` or None when no group sent the field."""
    ref_logprobs: np.ndarray | None
    """float32 ``[T]`` or None when no group sent the field."""
    groups: tuple[GroupInfo, ...]
    fetched_unix_s: float
    routed_experts: np.ndarray | None = None
    """int16 ``[T, num_hidden_layers, num_experts_per_tok]``: the experts the inference engine routed
    input token i to in each layer (rollout routing replay; 0 in dense layers, -1 in sequences whose
    routing the bridge did not capture); None when no sequence has one (``bridge/routed_experts.py``)."""

    @property
    def num_sequences(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class _Invalid(Exception):
    """Internal: a check failed; :func:`align_group` turns it into a :class:`Rejection`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------------------
# Atropos groups -> EncodedBatch
# ------------------------------------------------------------------------------------------------


def encode_batch(
    groups: Sequence[Any] | None,
    *,
    batch_id: str,
    step: int,
    vocab_size: int | None,
    max_token_len: int | None,
    fetched_unix_s: float,
) -> tuple[EncodedBatch | None, list[Rejection]]:
    """Validate and pack one Atropos batch (``GET /batch``'s ``batch`` list); never raises on bad input.

    Returns the batch of the accepted groups (None when none is accepted) and the rejections, in
    input order.
    """
    if groups is None:
        return None, []
    if not isinstance(groups, list | tuple):
        return None, [Rejection("malformed", None, f"the batch is a {type(groups).__name__}, not a list")]
    accepted: list[AlignedGroup] = []
    rejections: list[Rejection] = []
    for position, group in enumerate(groups):
        result = align_group(group, vocab_size=vocab_size, max_token_len=max_token_len)
        if isinstance(result, Rejection):
            rejections.append(Rejection(result.reason, result.env_id, f"group {position}: {result.detail}"))
        else:
            accepted.append(result)
    if not accepted:
        return None, rejections
    return _pack(accepted, batch_id=batch_id, step=step, fetched_unix_s=fetched_unix_s), rejections


def validate_group(group: Any, *, vocab_size: int | None, max_token_len: int | None) -> Rejection | None:
    """The reason one Atropos group would be rejected, or None when it is valid."""
    result = align_group(group, vocab_size=vocab_size, max_token_len=max_token_len)
    return result if isinstance(result, Rejection) else None


def align_group(group: Any, *, vocab_size: int | None, max_token_len: int | None) -> AlignedGroup | Rejection:
    """Check one Atropos group and shift it to label alignment, or say why it is rejected."""
    env_id = _env_id_or_none(group)
    try:
        return _align_group(group, vocab_size=vocab_size, max_token_len=max_token_len)
    except _Invalid as invalid:
        return Rejection(invalid.reason, env_id, invalid.detail)


def _align_group(group: Any, *, vocab_size: int | None, max_token_len: int | None) -> AlignedGroup:
    if not isinstance(group, Mapping):
        raise _Invalid("malformed", f"the group is a {type(group).__name__}, not a dict")
    _check_field_types(group)
    info = _group_info(group)
    num_sequences = _check_sequence_counts(group)
    scores = _scores(group["scores"])
    token_limit = min(vocab_size, _INT32_LIMIT) if vocab_size is not None and vocab_size > 0 else _INT32_LIMIT
    length_limit = max_token_len if max_token_len is not None and max_token_len > 0 else None
    sequences = [
        _align_sequence(
            index,
            group["tokens"][index],
            group["masks"][index],
            {name: _optional_row(group, name, index) for name in OPTIONAL_TOKEN_FIELDS},
            token_limit=token_limit,
            length_limit=length_limit,
        )
        for index in range(num_sequences)
    ]
    return AlignedGroup(
        info=info,
        seq_lens=np.array([len(seq["input_ids"]) for seq in sequences], dtype=np.int32),
        input_ids=np.concatenate([seq["input_ids"] for seq in sequences]),
        labels=np.concatenate([seq["labels"] for seq in sequences]),
        loss_mask=np.concatenate([seq["loss_mask"] for seq in sequences]),
        scores=scores,
        advantages=_concatenate_optional(group, sequences, "advantages"),
        inference_logprobs=_concatenate_optional(group, sequences, "inference_logprobs"),
        ref_logprobs=_concatenate_optional(group, sequences, "ref_logprobs"),
    )


def _env_id_or_none(group: Any) -> int | None:
    """The group's env_id when it is a plain integer (for rejections of otherwise broken groups)."""
    if isinstance(group, Mapping) and type(group.get("env_id")) is int:
        return group["env_id"]
    return None


def _check_field_types(group: Mapping[str, Any]) -> None:
    for name in _REQUIRED_FIELDS:
        if name not in group:
            raise _Invalid("malformed", f"the required key {name!r} is missing")
        if not isinstance(group[name], list | tuple):
            raise _Invalid("malformed", f"{name} is a {type(group[name]).__name__}, not a list")
    for name in OPTIONAL_TOKEN_FIELDS:
        value = group.get(name)
        if value is not None and not isinstance(value, list | tuple):
            raise _Invalid("malformed", f"{name} is a {type(value).__name__}, not a list or null")
    env_id = group.get("env_id")
    if env_id is not None and (type(env_id) is not int or not -(2**63) <= env_id < 2**63):
        raise _Invalid("malformed", f"env_id is {env_id!r}, not an int64 or null")
    for name in ("generation_params", "group_overrides"):
        value = group.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise _Invalid("malformed", f"{name} is a {type(value).__name__}, not a dict or null")
    overrides = group.get("overrides")
    if overrides is None:
        return
    if not isinstance(overrides, list | tuple):
        raise _Invalid("malformed", f"overrides is a {type(overrides).__name__}, not a list or null")
    for index, override in enumerate(overrides):
        if override is not None and not isinstance(override, Mapping):
            raise _Invalid("malformed", f"overrides[{index}] is {override!r}, not a dict or null")
    if len(overrides) != len(group["tokens"]):
        raise _Invalid(
            "malformed", f"overrides has {len(overrides)} entries for {len(group['tokens'])} sequences"
        )


def _group_info(group: Mapping[str, Any]) -> GroupInfo:
    payload = {
        "generation_params": group.get("generation_params"),
        "group_overrides": group.get("group_overrides"),
        "overrides": group.get("overrides"),
    }
    try:
        overrides_json = json.dumps(payload, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise _Invalid("malformed", f"generation_params/group_overrides/overrides: {error}") from None
    env_id = group.get("env_id")
    return GroupInfo(
        env_id=-1 if env_id is None else env_id,
        overrides_json=overrides_json,
        has_advantages=group.get("advantages") is not None,
        has_inference_logprobs=group.get("inference_logprobs") is not None,
        has_ref_logprobs=group.get("ref_logprobs") is not None,
    )


def _check_sequence_counts(group: Mapping[str, Any]) -> int:
    num_sequences = len(group["tokens"])
    if num_sequences == 0:
        raise _Invalid("ragged_lengths", "the group has zero sequences")
    for name in ("masks", "scores", *OPTIONAL_TOKEN_FIELDS):
        value = group.get(name)
        if value is not None and len(value) != num_sequences:
            raise _Invalid("ragged_lengths", f"{name} has {len(value)} entries for {num_sequences} sequences")
    return num_sequences


def _scores(values: Sequence[Any]) -> np.ndarray:
    scores = _float_array(values, "scores")
    bad = ~np.isfinite(scores)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise _Invalid(
            "non_finite_score", f"sequence {index}: scores[{index}]={values[index]!r} is not finite"
        )
    return scores


def _optional_row(group: Mapping[str, Any], name: str, index: int) -> Any:
    rows = group.get(name)
    return None if rows is None else rows[index]


def _align_sequence(
    index: int,
    tokens: Any,
    masks: Any,
    optional_rows: dict[str, Any],
    *,
    token_limit: int,
    length_limit: int | None,
) -> dict[str, np.ndarray]:
    """One sequence's label-aligned arrays (``algo/alignment.py``'s shift), after every check on it."""
    where = f"sequence {index}"
    token_ids = _int_array(tokens, f"{where}: tokens")
    mask_ids = _int_array(masks, f"{where}: masks")
    length = len(token_ids)
    _check_length(mask_ids, length, f"{where}: masks")
    float_rows = {}
    for name, row in optional_rows.items():
        if row is not None:
            float_rows[name] = _float_array(row, f"{where}: {name}")
            _check_length(float_rows[name], length, f"{where}: {name}")
    if length < 2:
        raise _Invalid("too_short", f"{where} has {length} tokens, fewer than 2")
    if length_limit is not None and length > length_limit:
        raise _Invalid("too_long", f"{where} has {length} tokens, more than max_token_len={length_limit}")
    trained = mask_ids != IGNORE_INDEX
    _check_token_range(token_ids, np.ones(length, dtype=bool), token_limit, f"{where}: tokens")
    _check_token_range(mask_ids, trained, token_limit, f"{where}: masks")
    mismatch = trained & (mask_ids != token_ids)
    if mismatch.any():
        position = int(np.flatnonzero(mismatch)[0])
        raise _Invalid(
            "mask_mismatch",
            f"{where}: masks[{position}]={int(mask_ids[position])} is neither {IGNORE_INDEX} "
            f"nor tokens[{position}]={int(token_ids[position])}",
        )
    loss_mask = trained[1:]
    if not loss_mask.any():
        raise _Invalid("empty_completion", f"{where}: no trained token after the first position")
    aligned = {
        "input_ids": token_ids[:-1].astype(np.int32),
        "labels": token_ids[1:].astype(np.int32),
        "loss_mask": loss_mask,
    }
    for name, values in float_rows.items():
        shifted = values[1:]
        _check_trained_values(name, shifted, loss_mask, where)
        aligned[name] = np.where(loss_mask, shifted, np.float32(0.0))
    return aligned


def _check_length(values: np.ndarray, length: int, what: str) -> None:
    if len(values) != length:
        raise _Invalid("ragged_lengths", f"{what} has {len(values)} entries for {length} tokens")


def _check_token_range(ids: np.ndarray, checked: np.ndarray, limit: int, what: str) -> None:
    """Token ids (where ``checked``) must lie in ``[0, limit)``."""
    bad = checked & ((ids < 0) | (ids >= limit))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise _Invalid(
            "token_out_of_vocab", f"{what}[{position}]={int(ids[position])} is outside [0, {limit})"
        )


def _check_trained_values(name: str, shifted: np.ndarray, loss_mask: np.ndarray, where: str) -> None:
    """NaN/inf (and, for log-probs, positive values) at trained label positions reject the group."""
    bad = loss_mask & ~np.isfinite(shifted)
    if name == "advantages":
        reason, expectation = "non_finite_advantages", "not finite"
    else:
        reason, expectation = "invalid_logprobs", f"not a log-probability (finite, <= {LOGPROB_TOLERANCE})"
        bad |= loss_mask & (shifted > LOGPROB_TOLERANCE)
    if bad.any():
        position = int(np.flatnonzero(bad)[0]) + 1  # back to the index Atropos sent (aligned with tokens)
        raise _Invalid(
            reason,
            f"{where}: {name}[{position}]={str(shifted[position - 1])} at a trained position is {expectation}",
        )


def _int_array(values: Any, what: str) -> np.ndarray:
    """int64 array of a flat list of Python ints (booleans, floats and others are malformed)."""
    if not isinstance(values, list | tuple):
        raise _Invalid("malformed", f"{what} is a {type(values).__name__}, not a list")
    unexpected = set(map(type, values)) - {int}
    if unexpected:
        names = ", ".join(sorted(kind.__name__ for kind in unexpected))
        raise _Invalid("malformed", f"{what} holds {names} values, not integers")
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        raise _Invalid("token_out_of_vocab", f"{what} holds an integer beyond the int64 range") from None


def _float_array(values: Any, what: str) -> np.ndarray:
    """float32 array of a flat list of Python numbers (values too large for float32 become inf)."""
    if not isinstance(values, list | tuple):
        raise _Invalid("malformed", f"{what} is a {type(values).__name__}, not a list")
    unexpected = set(map(type, values)) - {int, float}
    if unexpected:
        names = ", ".join(sorted(kind.__name__ for kind in unexpected))
        raise _Invalid("malformed", f"{what} holds {names} values, not numbers")
    try:
        as_float64 = np.asarray(values, dtype=np.float64)
    except OverflowError:
        raise _Invalid("malformed", f"{what} holds an integer too large for a float") from None
    with np.errstate(over="ignore"):
        return as_float64.astype(np.float32)


def _concatenate_optional(
    group: Mapping[str, Any], sequences: list[dict[str, np.ndarray]], name: str
) -> np.ndarray | None:
    if group.get(name) is None:
        return None
    return np.concatenate([seq[name] for seq in sequences])


def _pack(accepted: list[AlignedGroup], *, batch_id: str, step: int, fetched_unix_s: float) -> EncodedBatch:
    """Concatenate accepted groups in order; optional arrays are zero for groups that lack them."""
    group_index = np.concatenate(
        [np.full(len(group.seq_lens), number, dtype=np.int32) for number, group in enumerate(accepted)]
    )

    return EncodedBatch(
        batch_id=batch_id,
        step=step,
        seq_lens=np.concatenate([group.seq_lens for group in accepted]),
        input_ids=np.concatenate([group.input_ids for group in accepted]),
        labels=np.concatenate([group.labels for group in accepted]),
        loss_mask=np.concatenate([group.loss_mask for group in accepted]),
        scores=np.concatenate([group.scores for group in accepted]),
        group_index=group_index,
        advantages=_concatenate_or_zeros(accepted, "advantages"),
        inference_logprobs=_concatenate_or_zeros(accepted, "inference_logprobs"),
        ref_logprobs=_concatenate_or_zeros(accepted, "ref_logprobs"),
        groups=tuple(group.info for group in accepted),
        fetched_unix_s=fetched_unix_s,
    )


def _concatenate_or_zeros(accepted: list[AlignedGroup], name: str) -> np.ndarray | None:
    """An optional per-token array over all groups: None when no group has it, zeros where one lacks it."""
    if all(getattr(group, name) is None for group in accepted):
        return None
    parts = []
    for group in accepted:
        values = getattr(group, name)
        parts.append(np.zeros(len(group.input_ids), dtype=np.float32) if values is None else values)
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------
# Tensors <-> protobuf
# ------------------------------------------------------------------------------------------------

# (numpy kind, itemsize) -> proto dtype. Numpy has no bfloat16, so DTYPE_BFLOAT16 is not decoded here.
_PROTO_DTYPES = {
    ("i", 4): bridge_pb2.DTYPE_INT32,
    ("i", 8): bridge_pb2.DTYPE_INT64,
    ("f", 4): bridge_pb2.DTYPE_FLOAT32,
    ("f", 2): bridge_pb2.DTYPE_FLOAT16,
    ("b", 1): bridge_pb2.DTYPE_BOOL,
    ("u", 1): bridge_pb2.DTYPE_UINT8,
    ("i", 2): bridge_pb2.DTYPE_INT16,
}
# proto dtype -> little-endian wire dtype (bool travels as uint8 and is checked to be 0 or 1).
_WIRE_DTYPES = {
    bridge_pb2.DTYPE_INT32: np.dtype("<i4"),
    bridge_pb2.DTYPE_INT64: np.dtype("<i8"),
    bridge_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    bridge_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    bridge_pb2.DTYPE_BOOL: np.dtype("u1"),
    bridge_pb2.DTYPE_UINT8: np.dtype("u1"),
    bridge_pb2.DTYPE_INT16: np.dtype("<i2"),
}


def tensor_to_proto(array: np.ndarray) -> bridge_pb2.Tensor:
    """Raw little-endian, row-major bytes of ``array``; ValueError for a dtype the proto lacks."""
    array = np.asarray(array)
    proto_dtype = _PROTO_DTYPES.get((array.dtype.kind, array.dtype.itemsize))
    if proto_dtype is None:
        raise ValueError(f"no proto dtype for numpy dtype {array.dtype}")
    wire = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return bridge_pb2.Tensor(data=wire.tobytes(), dtype=proto_dtype, shape=list(array.shape))


def tensor_from_proto(message: bridge_pb2.Tensor) -> np.ndarray:
    """A writable native-endian array; ValueError for an unknown dtype, bad shape or wrong byte length."""
    wire_dtype = _WIRE_DTYPES.get(message.dtype)
    if wire_dtype is None:
        raise ValueError(f"unsupported tensor dtype {_dtype_name(message.dtype)}")
    shape = tuple(message.shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"negative tensor shape {list(shape)}")
    expected_bytes = math.prod(shape) * wire_dtype.itemsize
    if len(message.data) != expected_bytes:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {_dtype_name(message.dtype)} needs "
            f"{expected_bytes} bytes, got {len(message.data)}"
        )
    values = np.frombuffer(message.data, dtype=wire_dtype).reshape(shape)
    if message.dtype == bridge_pb2.DTYPE_BOOL:
        if values.size and values.max() > 1:
            raise ValueError("a bool tensor holds a byte other than 0 or 1")
        return values.astype(np.bool_)
    return values.astype(wire_dtype.newbyteorder("="))


def _dtype_name(dtype: int) -> str:
    try:
        return bridge_pb2.DType.Name(dtype)
    except ValueError:
        return str(dtype)


# ------------------------------------------------------------------------------------------------
# EncodedBatch <-> TrainingBatch
# ------------------------------------------------------------------------------------------------


def batch_to_proto(batch: EncodedBatch) -> bridge_pb2.TrainingBatch:
    """The ``TrainingBatch`` message of ``batch`` (optional arrays left unset when None)."""
    message = bridge_pb2.TrainingBatch(
        batch_id=batch.batch_id,
        step=batch.step,
        num_sequences=batch.num_sequences,
        num_groups=batch.num_groups,
        seq_lens=tensor_to_proto(batch.seq_lens),
        input_ids=tensor_to_proto(batch.input_ids),
        labels=tensor_to_proto(batch.labels),
        loss_mask=tensor_to_proto(batch.loss_mask),
        scores=tensor_to_proto(batch.scores),
        group_index=tensor_to_proto(batch.group_index),
        groups=[_group_info_to_proto(info) for info in batch.groups],
        fetched_unix_s=batch.fetched_unix_s,
    )
    for name in OPTIONAL_TOKEN_FIELDS:
        values = getattr(batch, name)
        if values is not None:
            getattr(message, name).CopyFrom(tensor_to_proto(values))
    if batch.routed_experts is not None:
        message.routed_experts.CopyFrom(tensor_to_proto(batch.routed_experts))
    return message


def batch_from_proto(message: bridge_pb2.TrainingBatch) -> EncodedBatch:
    """The ``EncodedBatch`` of a ``TrainingBatch``; ValueError naming the field that is inconsistent."""
    num_sequences = message.num_sequences
    num_groups = message.num_groups
    if len(message.groups) != num_groups:
        raise ValueError(f"groups: {len(message.groups)} entries for num_groups={num_groups}")
    seq_lens = _field_tensor(message, "seq_lens", np.int32, num_sequences)
    if seq_lens.size and seq_lens.min() < 1:
        raise ValueError("seq_lens: every sequence needs at least 1 token after the shift")
    num_tokens = int(seq_lens.sum(dtype=np.int64))
    group_index = _field_tensor(message, "group_index", np.int32, num_sequences)
    _check_group_index(group_index, num_groups)
    return EncodedBatch(
        batch_id=message.batch_id,
        step=message.step,
        seq_lens=seq_lens,
        input_ids=_field_tensor(message, "input_ids", np.int32, num_tokens),
        labels=_field_tensor(message, "labels", np.int32, num_tokens),
        loss_mask=_field_tensor(message, "loss_mask", np.bool_, num_tokens),
        scores=_field_tensor(message, "scores", np.float32, num_sequences),
        group_index=group_index,
        advantages=_optional_field_tensor(message, "advantages", num_tokens),
        inference_logprobs=_optional_field_tensor(message, "inference_logprobs", num_tokens),
        ref_logprobs=_optional_field_tensor(message, "ref_logprobs", num_tokens),
        groups=tuple(_group_info_from_proto(info) for info in message.groups),
        fetched_unix_s=message.fetched_unix_s,
        routed_experts=_routed_experts_tensor(message, num_tokens),
    )


def _routed_experts_tensor(message: bridge_pb2.TrainingBatch, num_tokens: int) -> np.ndarray | None:
    """The optional int16 ``[T, L, k]`` routing table, checked (ids >= -1, L and k >= 1)."""
    if not message.HasField("routed_experts"):
        return None
    try:
        values = tensor_from_proto(message.routed_experts)
    except ValueError as error:
        raise ValueError(f"routed_experts: {error}") from None
    if values.dtype != np.int16 or values.ndim != 3 or values.shape[0] != num_tokens or 0 in values.shape[1:]:
        raise ValueError(
            f"routed_experts: {values.dtype} {list(values.shape)}, expected int16 [{num_tokens}, layers, top_k]"
        )
    if values.size and values.min() < -1:
        raise ValueError(f"routed_experts: expert id {int(values.min())} (only -1 marks a missing routing)")
    return values


def _field_tensor(message: bridge_pb2.TrainingBatch, name: str, dtype: type, length: int) -> np.ndarray:
    """A required 1-D tensor field, checked against its dtype and length."""
    if not message.HasField(name):
        raise ValueError(f"{name}: missing")
    try:
        values = tensor_from_proto(getattr(message, name))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if values.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: dtype {values.dtype}, expected {np.dtype(dtype)}")
    if values.shape != (length,):
        raise ValueError(f"{name}: shape {list(values.shape)}, expected [{length}]")
    return values


def _optional_field_tensor(
    message: bridge_pb2.TrainingBatch, name: str, num_tokens: int
) -> np.ndarray | None:
    if not message.HasField(name):
        return None
    return _field_tensor(message, name, np.float32, num_tokens)


def _check_group_index(group_index: np.ndarray, num_groups: int) -> None:
    """Groups must be numbered 0..G-1 in order, each with at least one sequence."""
    starts = np.flatnonzero(np.diff(group_index, prepend=-1))
    if not np.array_equal(group_index[starts], np.arange(num_groups)):
        raise ValueError(f"group_index: not contiguous groups numbered 0..{num_groups - 1} in order")


def _group_info_to_proto(info: GroupInfo) -> bridge_pb2.GroupInfo:
    return bridge_pb2.GroupInfo(
        env_id=info.env_id,
        overrides_json=info.overrides_json,
        has_advantages=info.has_advantages,
        has_inference_logprobs=info.has_inference_logprobs,
        has_ref_logprobs=info.has_ref_logprobs,
    )


def _group_info_from_proto(message: bridge_pb2.GroupInfo) -> GroupInfo:
    return GroupInfo(
        env_id=message.env_id,
        overrides_json=message.overrides_json,
        has_advantages=message.has_advantages,
        has_inference_logprobs=message.has_inference_logprobs,
        has_ref_logprobs=message.has_ref_logprobs,
    )
