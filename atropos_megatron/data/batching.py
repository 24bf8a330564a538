"""One Atropos batch -> per-sequence training tensors -> this data-parallel rank's micro-batches.

Every rank runs the same pure functions on the same batch, so every rank arrives at the same plan
without further communication: which sequences each data-parallel rank trains on (balanced by tokens),
how they are cut into micro-batches by a token budget, and each token's aggregation weight, computed
from the counts of the *whole* batch so that the partial losses of all micro-batches and ranks add up
to the loss of the batch (`algo/reduce.py`).

Two micro-batch shapes:

- packed (default, THD): each micro-batch is one row ``[1, s]`` of up to ``micro_batch_tokens``
  tokens holding sequences back to back; ``cu_seqlens`` (int32, Megatron's ``PackedSeqParams``) marks
  where each starts, the row's padding tail being one more segment. Attention runs per segment (TE's
  varlen attention, or ``trainer.attention`` on the local spec), and RoPE restarts at each segment's
  start, so a packed sequence computes exactly what it would alone. Position ids restart per
  sequence too.
- padded: one sequence per row, rows padded to the longest sequence of the rank's share.

All micro-batches of one rank have one shape ``[b, s]``, which pipeline parallelism requires.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atropos_megatron.algo.advantages import group_advantages
from atropos_megatron.algo.overrides import sequence_temperatures, token_advantages, zeroed_sequences
from atropos_megatron.algo.reduce import aggregation_key, aggregation_weights
from atropos_megatron.config import DataConfig, GRPOConfig

MicroBatch = dict[str, Any]
"""Tensors ``[b, s]`` (``tokens``, ``position_ids``, ``labels``, ``loss_mask``, ``advantages``,
``weights``, ``temperature``; ``inference_logprobs`` and ``env_ref_logprobs`` with bool masks
``has_inference_logprobs`` / ``has_env_ref_logprobs`` when any sequence sent them; ``routed_experts``
int16 ``[b, s, layers, k]``, -1 where unknown and -2 on padding, when any sequence has the engine's routing and
``grpo.routing_replay`` is on), packed micro-batches' ``cu_seqlens`` (int32 ``[segments + 1]``,
``b`` = 1), ``max_seqlen`` (int) and ``sequence_ids`` (int64 ``[b, s]``, the sequence's index in the
row, -1 on padding), ``trained_tokens`` (int) and ``aggregation`` (``algo.reduce.aggregation_key`` of
the config the ``weights`` were made for)."""

_OPTIONAL = {"inference_logprobs": "inference_logprobs", "ref_logprobs": "env_ref_logprobs"}
"""Rollout field -> micro-batch key (the environment's reference log-probs are only a candidate)."""


@dataclass(frozen=True, eq=False)
class Rollout:
    """One label-aligned sequence, ready for the loss (all tensors ``[L]``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    """fp32 token advantages: the group-relative ones, or the environment's; 0 where not trained."""
    temperature: float
    """The temperature the sequence was sampled at (its log-probs are computed at it)."""
    inference_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    group: int = 0
    """Index of the sequence's group in the batch."""
    routed_experts: torch.Tensor | None = None
    """int16 ``[L, layers, k]``: the experts the inference engine routed each input token to (MoE
    models, ``grpo.routing_replay``); -1 rows where it is not known."""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class BatchStats:
    """What the batch says about the policy before any update (logged per step)."""

    sequences: int
    groups: int
    tokens: int
    trained_tokens: int
    reward_mean: float
    reward_std: float
    advantage_mean: float
    advantage_std: float
    advantage_abs_mean: float
    zero_advantage_groups: int
    """Groups whose sequences all got advantage 0 (equal scores): they teach nothing."""

    def as_metrics(self) -> dict[str, float]:
        return {
            "batch/sequences": self.sequences,
            "batch/groups": self.groups,
            "batch/tokens": self.tokens,
            "batch/trained_tokens": self.trained_tokens,
            "reward/mean": self.reward_mean,
            "reward/std": self.reward_std,
            "advantage/mean": self.advantage_mean,
            "advantage/std": self.advantage_std,
            "advantage/abs_mean": self.advantage_abs_mean,
            "batch/zero_advantage_groups": self.zero_advantage_groups,
        }


def build_rollouts(batch: Any, cfg: GRPOConfig) -> tuple[list[Rollout], BatchStats]:
    """Advantages, temperatures and per-token arrays of every sequence of an Atropos batch.

    Args:
        batch: the bridge's ``EncodedBatch`` (or anything with its fields: numpy ``seq_lens``,
            ``input_ids``, ``labels``, ``loss_mask``, ``scores``, ``group_index``, the optional
            ``advantages`` / ``inference_logprobs`` / ``ref_logprobs`` and ``groups``).
        cfg: advantage normalisation and the default temperature.
    """
    seq_lens = np.asarray(batch.seq_lens, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(seq_lens)])
    scores = torch.as_tensor(np.asarray(batch.scores), dtype=torch.float32)
    group_index = torch.as_tensor(np.asarray(batch.group_index), dtype=torch.int64)
    sequence_adv = group_advantages(
        scores, group_index, normalize_std=cfg.advantage_normalization == "group_std", eps=cfg.advantage_eps
    )

    def tokens_of(name: str, i: int, dtype) -> torch.Tensor | None:
        values = getattr(batch, name, None)
        if values is None:
            return None
        return torch.as_tensor(np.asarray(values[offsets[i] : offsets[i + 1]]), dtype=dtype)

    rollouts: list[Rollout] = []
    zero_groups = 0
    for g, info in enumerate(batch.groups):
        members = torch.nonzero(group_index == g).flatten().tolist()
        extras = json.loads(info.overrides_json or "{}")
        temperatures = sequence_temperatures(
            len(members),
            overrides=extras.get("overrides"),
            generation_params=extras.get("generation_params"),
            group_overrides=extras.get("group_overrides"),
            default=cfg.temperature,
        )
        zeroed = zeroed_sequences(len(members), extras.get("overrides"))
        group_has_signal = False
        for j, i in enumerate(members):
            loss_mask = tokens_of("loss_mask", i, torch.bool)
            env_adv = tokens_of("advantages", i, torch.float32) if info.has_advantages else None
            advantages = token_advantages(
                sequence_adv[i : i + 1],
                loss_mask[None],
                env_advantages=env_adv[None] if env_adv is not None else None,
                zeroed=zeroed[j : j + 1],
            )[0]
            group_has_signal |= bool(advantages.any())
            rollouts.append(
                Rollout(
                    input_ids=tokens_of("input_ids", i, torch.int64),
                    labels=tokens_of("labels", i, torch.int64),
                    loss_mask=loss_mask,
                    advantages=advantages,
                    temperature=float(temperatures[j]),
                    inference_logprobs=tokens_of("inference_logprobs", i, torch.float32)
                    if info.has_inference_logprobs
                    else None,
                    ref_logprobs=tokens_of("ref_logprobs", i, torch.float32)
                    if info.has_ref_logprobs
                    else None,
                    group=g,
                    routed_experts=_routed_experts(batch, offsets, i) if cfg.routing_replay else None,
                )
            )
        zero_groups += not group_has_signal
    return rollouts, _stats(rollouts, scores, len(batch.groups), zero_groups)


def _routed_experts(batch: Any, offsets: np.ndarray, i: int) -> torch.Tensor | None:
    """Sequence ``i``'s rows of the batch's ``routed_experts`` ``[T, layers, k]``; None if all unknown."""
    routed = getattr(batch, "routed_experts", None)
    if routed is None:
        return None
    rows = torch.as_tensor(np.asarray(routed[offsets[i] : offsets[i + 1]]), dtype=torch.int16)
    return rows if bool((rows >= 0).any()) else None


def _stats(rollouts: list[Rollout], scores: torch.Tensor, groups: int, zero_groups: int) -> BatchStats:
    trained = torch.cat([r.advantages[r.loss_mask] for r in rollouts]) if rollouts else torch.zeros(0)
    return BatchStats(
        sequences=len(rollouts),
        groups=groups,
        tokens=sum(r.length for r in rollouts),
        trained_tokens=int(trained.numel()),
        reward_mean=float(scores.mean()) if scores.numel() else 0.0,
        reward_std=float(scores.std(unbiased=False)) if scores.numel() else 0.0,
        advantage_mean=float(trained.mean()) if trained.numel() else 0.0,
        advantage_std=float(trained.std(unbiased=False)) if trained.numel() else 0.0,
        advantage_abs_mean=float(trained.abs().mean()) if trained.numel() else 0.0,
        zero_advantage_groups=zero_groups,
    )


def split_into_updates(rollouts: Sequence[Rollout], updates: int) -> list[list[Rollout]]:
    """Whole groups in ``updates`` consecutive mini-batches (as even as the group count allows; none
    empty unless there are fewer groups than updates). GRPO compares a group's sequences with each
    other, so a group is never split."""
    groups = sorted({r.group for r in rollouts})
    position = {g: i * updates // max(len(groups), 1) for i, g in enumerate(groups)}
    minis: list[list[Rollout]] = [[] for _ in range(updates)]
    for rollout in rollouts:
        minis[position[rollout.group]].append(rollout)
    return [mini for mini in minis if mini]


def assign_to_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Sequence indices per data-parallel rank, balanced by tokens (longest first to the lightest rank).

    Deterministic: ties go to the lower rank and equal lengths keep their order.
    """
    loads = [0] * num_ranks
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(share) for share in shares]


def plan_micro_batches(
    rollouts: Sequence[Rollout],
    *,
    data: DataConfig,
    grpo: GRPOConfig,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of ``rollouts`` (the whole batch, as every rank sees it).

    A rank left without sequences (a batch smaller than the data-parallel size) gets one micro-batch
    with nothing trained, so that its collectives still match the other ranks'.
    """
    masks = [r.loss_mask for r in rollouts]
    global_tokens = int(sum(int(m.sum()) for m in masks))
    global_sequences = sum(bool(m.any()) for m in masks)
    share = [rollouts[i] for i in assign_to_ranks([r.length for r in rollouts], dp_size)[dp_rank]]
    if not share:
        batches = [_empty_micro_batch(data.pad_to_multiple_of, packed=data.packing)]
    else:
        # The only reader of grpo.loss_aggregation: the weights carry it to the loss.
        weights = [
            aggregation_weights(
                r.loss_mask[None],
                grpo.loss_aggregation,
                global_tokens=global_tokens,
                global_sequences=global_sequences,
                norm_length=grpo.loss_norm_length or data.max_token_len,
            )[0]
            for r in share
        ]
        batches = _packed(share, weights, data) if data.packing else _padded(share, weights, data)
    for mb in batches:
        mb["aggregation"] = aggregation_key(grpo)
    return batches


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _packed(share: list[Rollout], weights: list[torch.Tensor], data: DataConfig) -> list[MicroBatch]:
    """As few micro-batches of at most ``micro_batch_tokens`` tokens as first-fit decreasing needs, one THD
    row each, with the sequences then spread evenly over them (longest first, to the lightest one that
    has room): all rows are padded to the longest (pipeline parallelism needs one shape), so even rows
    waste almost nothing where first-fit would leave one short row padded to a full one."""
    order = sorted(range(len(share)), key=lambda i: (-share[i].length, i))
    capacity = data.micro_batch_tokens
    fill: list[int] = []
    for i in order:  # first-fit decreasing: how many micro-batches are needed
        target = next((b for b, used in enumerate(fill) if used + share[i].length <= capacity), None)
        if target is None:
            fill.append(0)
            target = len(fill) - 1
        fill[target] += share[i].length
    bins: list[list[int]] = [[] for _ in fill]
    fill = [0] * len(bins)
    for i in order:
        room = [b for b in range(len(bins)) if fill[b] + share[i].length <= capacity]
        if not room:  # the even spread found no room where first-fit did: one more micro-batch
            bins.append([])
            fill.append(0)
            room = [len(bins) - 1]
        target = min(room, key=lambda b: (fill[b], b))
        bins[target].append(i)
        fill[target] += share[i].length
    row_len = _round_up(max(fill), data.pad_to_multiple_of)
    return [_layout([row], share, weights, row_len, packed=True) for row in bins if row]


def _padded(share: list[Rollout], weights: list[torch.Tensor], data: DataConfig) -> list[MicroBatch]:
    """One sequence per row, rows as long as the longest sequence of the share."""
    row_len = _round_up(max(r.length for r in share), data.pad_to_multiple_of)
    rows = [[i] for i in sorted(range(len(share)), key=lambda i: (-share[i].length, i))]
    return _micro_batches(rows, share, weights, row_len, data)


def _micro_batches(rows: list[list[int]], share, weights, row_len: int, data: DataConfig) -> list[MicroBatch]:
    """Rows (sequence indices into ``share``) grouped into micro-batches of ``micro_batch_tokens``;
    the last one is filled with empty rows so that every micro-batch has the same shape."""
    rows_per_batch = max(1, data.micro_batch_tokens // row_len)
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start : start + rows_per_batch]
        chunk += [[] for _ in range(rows_per_batch - len(chunk))]
        batches.append(_layout(chunk, share, weights, row_len, packed=False))
    return batches


def _layout(
    rows: list[list[int]], share: list[Rollout], weights: list[torch.Tensor], row_len: int, *, packed: bool
) -> MicroBatch:
    """Place the sequences of each row (given by index into ``share``) into ``[b, row_len]`` tensors."""
    b = len(rows)
    out: MicroBatch = {
        "tokens": torch.zeros(b, row_len, dtype=torch.int64),
        "position_ids": torch.zeros(b, row_len, dtype=torch.int64),
        "labels": torch.zeros(b, row_len, dtype=torch.int64),
        "loss_mask": torch.zeros(b, row_len, dtype=torch.bool),
        "advantages": torch.zeros(b, row_len),
        "weights": torch.zeros(b, row_len),
        "temperature": torch.ones(b, row_len),
    }
    for field, key in _OPTIONAL.items():
        if any(getattr(share[i], field) is not None for row in rows for i in row):
            out[key] = torch.zeros(b, row_len)
            out[f"has_{key}"] = torch.zeros(b, row_len, dtype=torch.bool)
    routed = [share[i].routed_experts for row in rows for i in row if share[i].routed_experts is not None]
    if routed:
        # -2: no token here (padding); -1: a token whose routing the engine did not report.
        out["routed_experts"] = torch.full((b, row_len, *routed[0].shape[1:]), -2, dtype=torch.int16)
    edges = [0]  # packed (one row): where each sequence ends
    if packed:  # several sequences per row: the loss's sequence-level terms need to tell them apart
        out["sequence_ids"] = torch.full((b, row_len), -1, dtype=torch.int64)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            seq, end = share[i], start + share[i].length
            span = slice(start, end)
            out["tokens"][r, span] = seq.input_ids
            out["position_ids"][r, span] = torch.arange(seq.length)
            out["labels"][r, span] = seq.labels
            out["loss_mask"][r, span] = seq.loss_mask
            out["advantages"][r, span] = seq.advantages
            out["weights"][r, span] = weights[i]
            out["temperature"][r, span] = seq.temperature
            for field, key in _OPTIONAL.items():
                if key in out and getattr(seq, field) is not None:
                    out[key][r, span] = getattr(seq, field)
                    out[f"has_{key}"][r, span] = True
            if routed:
                out["routed_experts"][r, span] = -1 if seq.routed_experts is None else seq.routed_experts
            if packed:
                out["sequence_ids"][r, span] = len(edges) - 1
                edges.append(end)
            start = end
        out["position_ids"][r, start:] = torch.arange(row_len - start)
    if packed:  # the padding tail is one more segment: it attends to itself only
        edges += [row_len] if edges[-1] < row_len else []
        out.update(_thd_fields(edges))
    out["trained_tokens"] = int(out["loss_mask"].sum())
    return out


def _thd_fields(edges: list[int]) -> MicroBatch:
    lengths = [stop - start for start, stop in zip(edges[:-1], edges[1:], strict=True)]
    return {"cu_seqlens": torch.tensor(edges, dtype=torch.int32), "max_seqlen": max(lengths)}


def _empty_micro_batch(length: int, *, packed: bool) -> MicroBatch:
    empty = {
        "tokens": torch.zeros(1, length, dtype=torch.int64),
        "position_ids": torch.arange(length)[None],
        "labels": torch.zeros(1, length, dtype=torch.int64),
        "loss_mask": torch.zeros(1, length, dtype=torch.bool),
        "advantages": torch.zeros(1, length),
        "weights": torch.zeros(1, length),
        "temperature": torch.ones(1, length),
        "trained_tokens": 0,
    }
    return {**empty, **_thd_fields([0, length])} if packed else empty
