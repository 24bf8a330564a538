"""The base fingerprint that LoRA checkpoints record: stable for the same weights, different for others."""

from __future__ import annotations

import shutil

import pytest

from atropos_megatron.weights.fingerprint import BLOCK_BYTES, SAMPLES, fingerprint_directory, sample_offsets


def _model_dir(path, payload: bytes):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "model.safetensors").write_bytes(payload)
    (path / "README.md").write_text("a model card")
    return path


def test_same_weights_anywhere_give_the_same_fingerprint_and_other_weights_another(tmp_path):
    payload = bytes(range(256)) * 4096  # 1 MiB
    base = _model_dir(tmp_path / "base", payload)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    (copy / "README.md").write_text("edited card")  # not a weight file: ignored
    assert fingerprint_directory(base) == fingerprint_directory(copy)
    assert fingerprint_directory(base).startswith("sha256:")

    changed = bytearray(payload)
    changed[sample_offsets(len(payload))[5] + 7] ^= 1  # one bit inside a sampled block
    assert fingerprint_directory(_model_dir(tmp_path / "changed", bytes(changed))) != fingerprint_directory(
        base
    )
    (copy / "config.json").write_text('{"model_type": "llama"}')
    assert fingerprint_directory(copy) != fingerprint_directory(base)


def test_samples_cover_the_first_and_last_block_and_small_files_whole():
    size = 10 * 2**20
    offsets = sample_offsets(size)
    assert len(offsets) == SAMPLES and offsets[0] == 0 and offsets[-1] == size - BLOCK_BYTES
    assert sample_offsets(100) == [0]


def test_a_directory_without_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no weight files"):
        fingerprint_directory(tmp_path)
