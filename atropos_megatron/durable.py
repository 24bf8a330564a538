"""Writes that survive a crash: atomic replacement and the fsyncs that make a rename durable.

A rename is atomic but not durable until its directory is synced, and a file's bytes are not durable
until the file is. The bridge's spool and the trainer's checkpoints promise "on disk" to each other
(exactly-once training rests on it), so both write through here. No torch, no grpc: any part may
import this.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old or the new content, and the new one
    is on disk when this returns."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: str | Path) -> None:
    """Make the entries of ``directory`` (a rename, a new or deleted file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (files already synced cost almost nothing)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(directory)
