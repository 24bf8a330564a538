"""A cheap fingerprint of a model directory's weights, so that LoRA adapters resume on their own base.

An adapter-only checkpoint is worthless on any base but the one it was trained on, and a base is
named by a path that may later hold something else (a re-download, another revision, a fine-tune
written over it). Hashing 140 GB of weights on every save and resume is not affordable, so the
fingerprint reads, per weight file, its name and size and ``SAMPLES`` blocks spread evenly over it
(the first and the last included), and small files (``config.json``, ``metadata.json``) whole. Two
different weight sets agree in every sampled block only if they are the same model in practice;
it is a check against mix-ups, not a proof against tampering.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.distcp", "*.pt", ".metadata")
WHOLE_FILES = ("config.json", "metadata.json")
SAMPLES = 16
BLOCK_BYTES = 4096


def fingerprint_directory(path: str | Path) -> str:
    """``sha256:<hex>`` over the weight files directly in ``path`` (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` holds no weight file.
    """
    path = Path(path)
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"{path} holds no weight files ({', '.join(WEIGHT_PATTERNS)})")
    digest = hashlib.sha256()
    for name in WHOLE_FILES:
        if (path / name).is_file():
            digest.update(f"{name}\0".encode())
            digest.update((path / name).read_bytes())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            for offset in sample_offsets(size):
                handle.seek(offset)
                digest.update(handle.read(BLOCK_BYTES))
    return f"sha256:{digest.hexdigest()}"


def sample_offsets(size: int) -> list[int]:
    """Start of each sampled block of a ``size``-byte file: evenly spaced, first and last block included."""
    last = max(size - BLOCK_BYTES, 0)
    if last == 0:
        return [0]
    return sorted({round(i * last / (SAMPLES - 1)) for i in range(SAMPLES)})
