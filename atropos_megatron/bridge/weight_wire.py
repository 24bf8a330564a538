"""PushWeights data messages without protobuf objects: the same bytes on the wire, fewer copies.

A ``WeightsChunk`` holding only ``data`` (field 3, length-delimited) is, on the wire, the tag byte
``0x1a``, the length as a varint, then the bytes. Building the protobuf object, serializing it,
parsing it and reading ``.data`` back each copy the payload (four copies of every weight byte), which
halved the stream's throughput. Our client writes such messages directly from the bucket's memory and
our server hands the received bytes on as a ``memoryview``; every other message still goes through
protobuf, and any protobuf client or server of the contract interoperates unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

from atropos_megatron.bridge.v1 import bridge_pb2

_DATA_TAG = 0x1A  # field number 3 << 3 | wire type 2 (length-delimited)


class DataChunk(NamedTuple):
    """The next bytes of the current bucket (a ``WeightsChunk`` whose ``data`` is set)."""

    data: bytes | memoryview


def encode_chunk(message: bridge_pb2.WeightsChunk | DataChunk) -> bytes:
    """Wire bytes of one PushWeights request message (one copy of a DataChunk's payload)."""
    if isinstance(message, DataChunk):
        return b"".join((bytes((_DATA_TAG,)), _varint(len(message.data)), message.data))
    return message.SerializeToString()


def decode_chunk(raw: bytes) -> bridge_pb2.WeightsChunk | DataChunk:
    """One received PushWeights message: a DataChunk viewing ``raw`` (no copy), or the parsed proto."""
    if raw[:1] == bytes((_DATA_TAG,)):
        length, offset = _read_varint(raw, 1)
        if offset + length == len(raw):
            return DataChunk(memoryview(raw)[offset:])
    return bridge_pb2.WeightsChunk.FromString(raw)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(raw: bytes, offset: int) -> tuple[int, int]:
    """(value, offset after it); a truncated varint gives a length that cannot match (-1)."""
    value = shift = 0
    while offset < len(raw) and shift < 64:
        byte = raw[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return value, offset
        shift += 7
    return -1, offset
