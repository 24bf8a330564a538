"""Read and write HuggingFace safetensors checkpoints one tensor at a time, with bounded memory.

The format is small enough to handle directly (an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}``, then raw bytes), and doing so keeps memory predictable:

- Reading uses plain ``readinto`` into a fresh tensor instead of mmap. A memory map's touched pages
  count towards the process's resident memory until the whole file is unmapped, so streaming a 140 GB
  checkpoint through mmap looks like holding all of it.
- Writing streams each tensor's bytes straight from its storage; ``safetensors.torch.save_file``
  first turns every tensor of the file into a ``bytes`` copy.

Files written here are ordinary safetensors files (``transformers`` and ``safetensors`` load them);
sharded checkpoints get HF's ``model-0000i-of-0000n.safetensors`` names and
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_HEADER_LIMIT = 100 * 1024**2  # a header larger than this is corrupt (HF's own limit)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointFormatError(ValueError):
    """A safetensors file or index that is missing, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range (absolute offsets in the file)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsCheckpoint:
    """The tensors of an HF checkpoint directory (sharded with an index, or one file), read lazily.

    Only headers are read on construction; :meth:`read` and :meth:`iter_tensors` read tensor data.

    Raises:
        FileNotFoundError: the directory, the index or a shard it names does not exist, or the
            directory has no safetensors files (a ``.bin`` checkpoint gets a hint: those are pickles).
        CheckpointFormatError: a corrupt header or an index that disagrees with its shards.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / INDEX_FILE
        weight_map = _read_index(index) if index.is_file() else None
        self.entries: dict[str, TensorEntry] = {}
        for file in self._files(weight_map):
            for entry in read_header(file):
                if entry.name in self.entries:
                    raise CheckpointFormatError(f"tensor {entry.name!r} is stored in two files")
                self.entries[entry.name] = entry
        for name, file in (weight_map or {}).items():
            entry = self.entries.get(name)
            if entry is None or entry.file.name != file:
                raise CheckpointFormatError(f"{index}: {name!r} is not in {file}")

    def _files(self, weight_map: dict[str, str] | None) -> list[Path]:
        if weight_map is not None:
            index = self.directory / INDEX_FILE
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            return files
        hint = ""
        if any(self.directory.glob("*.bin")):
            hint = (
                " (found .bin files: PyTorch pickles are not read, since unpickling runs code; "
                "re-save with save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"no *.safetensors files in {self.directory}{hint}")

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into fresh memory."""
        if name not in self.entries:
            raise KeyError(f"{name!r} is not in the checkpoint at {self.directory}")
        return _read_entry(self.entries[name])

    def iter_tensors(self, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order (sequential reads), skipping names ``keep`` rejects unread."""
        for entry in sorted(self.entries.values(), key=lambda e: (e.file, e.start)):
            if keep is None or keep(entry.name):
                yield entry.name, _read_entry(entry)


def read_header(file: Path) -> list[TensorEntry]:
    """The tensor entries of one safetensors file, validated against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointFormatError(f"{file} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise CheckpointFormatError(f"{file}: header length {header_len} is corrupt")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(f"{file}: unreadable header ({exc})") from None
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise CheckpointFormatError(f"{file}: {name!r} has unsupported dtype {info.get('dtype')!r}")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        expected = _numel(shape) * dtype.itemsize
        if end - begin != expected or data_start + end > size or begin < 0:
            raise CheckpointFormatError(
                f"{file}: {name!r} claims bytes [{begin}, {end}) for shape {list(shape)} {info['dtype']} "
                f"({expected} bytes) in a file of {size} bytes"
            )
        entries.append(TensorEntry(name, file, dtype, shape, data_start + begin, data_start + end))
    return entries


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{index}: not a safetensors index ({exc!r})") from None
    return weight_map


def _read_entry(entry: TensorEntry) -> torch.Tensor:
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        view = memoryview(buffer.numpy())
        read = 0
        while read < entry.nbytes:
            count = handle.readinto(view[read:])
            if not count:
                raise CheckpointFormatError(f"{entry.file}: truncated while reading {entry.name!r}")
            read += count
    return buffer.view(entry.dtype).reshape(entry.shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class ShardedSafetensorsWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` (one tensor may exceed it).

    Tensors wait in memory only until their shard is full; :meth:`close` names the shards the way
    ``save_pretrained`` does and writes the index. Use as a context manager; on an exception the
    partial shards are left for the caller's cleanup (write into a temporary directory).
    """

    def __init__(self, directory: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors here")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, tensor))
        self._pending_bytes += nbytes

    def close(self) -> list[Path]:
        """Write the last shard, rename shards to their final names, write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        final: list[Path] = []
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            name = SINGLE_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / name)
            final.append(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return final

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors.partial"
        write_file(path, self._pending)
        self._shards.append((path, [name for name, _ in self._pending]))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0


def write_file(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """One safetensors file, each tensor's bytes written from its own storage (contiguous copies only
    for non-contiguous tensors, one at a time)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for _, tensor in tensors:
            if tensor.numel():
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
