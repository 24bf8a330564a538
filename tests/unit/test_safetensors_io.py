"""Our safetensors reader/writer against the reference ``safetensors`` library, both ways."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from atropos_megatron.weights.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointFormatError,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.fp32": torch.randn(3, 4, 2, generator=gen),
        "c.fp16": torch.randn(11, generator=gen).to(torch.float16),
        "d.int64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(2.5),
    }


def test_reads_what_the_reference_library_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / SINGLE_FILE)
    checkpoint = SafetensorsCheckpoint(tmp_path)
    assert set(checkpoint.entries) == set(tensors)
    for name, tensor in checkpoint.iter_tensors():
        assert tensor.dtype == tensors[name].dtype
        assert torch.equal(tensor, tensors[name]), name
    assert checkpoint.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_sharded_writer_output_loads_with_the_reference_library(tmp_path):
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=100) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for shard in shards:
        loaded.update(load_file(tmp_path / shard))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not list(tmp_path.glob("*.partial"))
    # and our own reader follows the index
    assert set(SafetensorsCheckpoint(tmp_path).entries) == set(tensors)


def test_one_shard_is_named_like_save_pretrained_and_has_no_index(tmp_path):
    with ShardedSafetensorsWriter(tmp_path) as writer:
        writer.add("x", torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]


def test_non_contiguous_tensors_are_written_by_value(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    with ShardedSafetensorsWriter(tmp_path) as writer:
        writer.add("t", base.t())
        writer.add("row", base[1])
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["row"], base[1])


def test_keep_filter_skips_tensors(tmp_path):
    save_file(_tensors(), tmp_path / SINGLE_FILE)
    names = [name for name, _ in SafetensorsCheckpoint(tmp_path).iter_tensors(lambda n: n.startswith("b"))]
    assert names == ["b.fp32"]


def test_missing_directory_and_bin_checkpoints_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SafetensorsCheckpoint(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="PyTorch pickles are not read"):
        SafetensorsCheckpoint(tmp_path)


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        SafetensorsCheckpoint(tmp_path)


def test_truncated_and_corrupt_files_are_errors(tmp_path):
    save_file({"x": torch.ones(100)}, tmp_path / SINGLE_FILE)
    data = (tmp_path / SINGLE_FILE).read_bytes()
    (tmp_path / SINGLE_FILE).write_bytes(data[:-10])
    with pytest.raises(CheckpointFormatError, match="claims bytes"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointFormatError, match="header length"):
        SafetensorsCheckpoint(tmp_path)
    header = b"{not json"
    (tmp_path / SINGLE_FILE).write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointFormatError, match="unreadable header"):
        SafetensorsCheckpoint(tmp_path)
