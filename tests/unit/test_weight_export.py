"""The pure parts of the weight export: gathering TP shards, and packing tensors into byte buckets.

The multi-rank export itself is checked in tests/distributed/test_weight_export.py.
"""

from __future__ import annotations

import pytest
import torch

from atropos_megatron.weights.export import WeightBucket, pack_buckets
from atropos_megatron.weights.megatron_shards import gather_shards, shard_tensor

# Full shapes of a tiny GPT's kinds of parameter: (full shape, partition_dim, partition_stride).
PARAMS = {
    "column (qkv)": ((24, 8), 0, 1),
    "vocab (embedding)": ((32, 8), 0, 1),
    "row (linear_proj)": ((8, 16), 1, 1),
    "strided (SwiGLU fc1)": ((32, 8), 0, 2),
    "replicated (norm)": ((8,), None, 1),
}


def _param(full_shape, dim, stride, tp_size):
    shape = list(full_shape)
    param = torch.nn.Parameter(torch.empty(0))
    if dim is not None:
        shape[dim] //= tp_size
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    param.data = torch.empty(shape)
    return param


@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("kind", list(PARAMS))
def test_gather_shards_inverts_shard_tensor(kind, tp_size):
    full_shape, dim, stride = PARAMS[kind]
    param = _param(full_shape, dim, stride, tp_size)
    full = torch.randn(full_shape)
    shards = [shard_tensor(full, param, tp_rank=r, tp_size=tp_size) for r in range(tp_size)]
    assert all(shard.shape == param.shape for shard in shards)
    assert torch.equal(gather_shards(shards, param, tp_size=tp_size), full)


def test_gather_shards_regroups_gate_and_up():
    gate, up = torch.arange(0.0, 8.0), torch.arange(10.0, 18.0)
    param = _param((16, 1), 0, 2, 2)
    # Rank r holds [gate_r; up_r] (Megatron's strided fc1 split).
    shards = [torch.tensor([0.0, 1, 2, 3, 10, 11, 12, 13]), torch.tensor([4.0, 5, 6, 7, 14, 15, 16, 17])]
    full = gather_shards([s.unsqueeze(1) for s in shards], param, tp_size=2)
    assert torch.equal(full.squeeze(1), torch.cat([gate, up]))


def test_gather_shards_rejects_a_wrong_count_or_shape():
    param = _param((8, 2), 0, 1, 2)
    with pytest.raises(ValueError, match="expected 2 shards"):
        gather_shards([torch.ones(4, 2)], param, tp_size=2)
    with pytest.raises(ValueError, match="differ in shape"):
        gather_shards([torch.ones(4, 2), torch.ones(3, 2)], param, tp_size=2)


def _tensors(*specs):
    gen = torch.Generator().manual_seed(0)
    return [(f"t{i}", torch.randn(shape, generator=gen).to(dtype)) for i, (shape, dtype) in enumerate(specs)]


def test_buckets_respect_the_byte_bound_and_round_trip_bit_exact():
    named = _tensors(*[((5, 3), torch.float32)] * 7, ((2,), torch.float32))  # 60 bytes each, then 8
    buckets = list(pack_buckets(iter(named), bucket_bytes=130))
    assert [len(b.tensors) for b in buckets] == [2, 2, 2, 2]
    assert [b.index for b in buckets] == [0, 1, 2, 3]
    assert all(b.nbytes <= 130 for b in buckets)
    _check_round_trip(buckets, named)


def test_a_dtype_change_starts_a_bucket():
    named = _tensors(
        ((4,), torch.float32), ((4,), torch.bfloat16), ((3,), torch.bfloat16), ((4,), torch.float32)
    )
    buckets = list(pack_buckets(named, bucket_bytes=1 << 20))
    assert [[s.name for s in b.tensors] for b in buckets] == [["t0"], ["t1", "t2"], ["t3"]]
    assert [{s.dtype for s in b.tensors} for b in buckets] == [
        {torch.float32},
        {torch.bfloat16},
        {torch.float32},
    ]
    _check_round_trip(buckets, named)


def test_a_tensor_bigger_than_a_bucket_travels_alone():
    named = _tensors(
        ((2,), torch.float32), ((100,), torch.float32), ((2,), torch.float32), ((2,), torch.float32)
    )
    buckets = list(pack_buckets(named, bucket_bytes=64))
    assert [[s.name for s in b.tensors] for b in buckets] == [["t0"], ["t1"], ["t2", "t3"]]
    assert buckets[1].nbytes == 400
    _check_round_trip(buckets, named)


def test_every_bucket_has_its_own_buffer():
    named = _tensors(*[((16,), torch.float32)] * 6)
    buckets = list(pack_buckets(named, bucket_bytes=128))
    assert len(buckets) == 3
    pointers = [b.data.untyped_storage().data_ptr() for b in buckets]
    assert len(set(pointers)) == len(pointers)
    _check_round_trip(buckets, named)  # earlier buckets were not overwritten by later ones


def test_odd_shapes_and_empty_input():
    named = [("scalar", torch.tensor(3.5)), ("empty", torch.empty(0, 4)), ("int", torch.arange(3))]
    buckets = list(pack_buckets(named, bucket_bytes=1024))
    _check_round_trip(buckets, named)
    assert list(pack_buckets([], bucket_bytes=8)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(pack_buckets(named, bucket_bytes=0))


def test_non_contiguous_tensors_are_packed_by_value():
    base = torch.arange(12.0).reshape(3, 4)
    named = [("transposed", base.t()), ("strided", base[:, ::2])]
    _check_round_trip(list(pack_buckets(named, bucket_bytes=1024)), named)


def _check_round_trip(buckets: list[WeightBucket], named: list[tuple[str, torch.Tensor]]) -> None:
    got = [pair for bucket in buckets for pair in bucket.named_tensors()]
    assert [name for name, _ in got] == [name for name, _ in named]
    for (_, out), (_, expected) in zip(got, named, strict=True):
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert torch.equal(out, expected)
    for bucket in buckets:
        assert bucket.data.dtype == torch.uint8 and bucket.data.is_contiguous()
        assert bucket.nbytes == sum(spec.nbytes for spec in bucket.tensors)
        offsets = [spec.offset for spec in bucket.tensors]
        assert offsets == [sum(s.nbytes for s in bucket.tensors[:i]) for i in range(len(offsets))]
        assert len({spec.dtype for spec in bucket.tensors}) == 1
