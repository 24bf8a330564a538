"""The full -> shard rule, on hand-made tensors (the multi-rank check is tests/distributed)."""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.trainer.model import padded_vocab_size
from atropos_megatron.weights.megatron_shards import shard_tensor


def _param(shape, *, dim=None, stride=1):
    param = torch.nn.Parameter(torch.empty(shape))
    if dim is not None:
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


def test_column_parallel_takes_contiguous_rows():
    full = torch.arange(8.0).reshape(4, 2)
    shard = shard_tensor(full, _param((2, 2), dim=0), tp_rank=1, tp_size=2)
    assert torch.equal(shard, full[2:])


def test_row_parallel_takes_contiguous_columns():
    full = torch.arange(8.0).reshape(2, 4)
    shard = shard_tensor(full, _param((2, 2), dim=1), tp_rank=0, tp_size=2)
    assert torch.equal(shard, full[:, :2])


def test_strided_swiglu_fc1_takes_gate_and_up_slices():
    gate, up = torch.arange(0.0, 4.0), torch.arange(10.0, 14.0)
    full = torch.cat([gate, up]).unsqueeze(1)  # [gate; up] as a TP=1 model holds it
    shard = shard_tensor(full, _param((4, 1), dim=0, stride=2), tp_rank=1, tp_size=2)
    assert shard.squeeze(1).tolist() == [2.0, 3.0, 12.0, 13.0]


def test_replicated_parameters_are_whole():
    full = torch.ones(3)
    assert shard_tensor(full, _param((3,)), tp_rank=1, tp_size=2) is full


def test_indivisible_dimension_is_an_error():
    with pytest.raises(ValueError, match="does not split"):
        shard_tensor(torch.ones(3, 2), _param((1, 2), dim=0), tp_rank=0, tp_size=2)


@pytest.mark.parametrize(
    ("vocab", "multiple", "tp", "padded"),
    [(256, 128, 1, 256), (256, 128, 2, 256), (100, 128, 1, 128), (151936, 128, 8, 151936), (129, 64, 2, 192)],
)
def test_padded_vocab_size_does_not_depend_on_tp(vocab, multiple, tp, padded):
    assert padded_vocab_size(vocab, multiple, tp) == padded
    assert padded_vocab_size(vocab, multiple, 1) == padded  # one checkpoint shape for every TP


def test_tp_that_does_not_divide_the_padded_vocab_is_an_error():
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by to a multiple"):
        padded_vocab_size(100, 100, 3)
