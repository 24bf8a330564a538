"""SGLang's weight-payload format: flattened buckets, ForkingPickler + base64, the allow-list unpickler."""

from __future__ import annotations

import base64
import collections
import io
import os
import pickle
import subprocess
import sys
import types
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from atropos_megatron import sglang_wire
from atropos_megatron.sglang_wire import PayloadError, UnsafePayloadError


@pytest.fixture
def file_system_sharing():
    previous = torch.multiprocessing.get_sharing_strategy()
    sglang_wire.use_file_system_sharing()
    sglang_wire.use_file_system_sharing()  # idempotent
    yield
    torch.multiprocessing.set_sharing_strategy(previous)


def mixed_tensors():
    return [
        ("a.weight", torch.randn(3, 5)),
        ("b.weight", torch.randn(7, dtype=torch.float64).to(torch.bfloat16)),
        ("c.bias", torch.arange(3, dtype=torch.float16)),
        ("d.count", torch.arange(4, dtype=torch.int64).view(2, 2).t()),  # non-contiguous
    ]


def test_flatten_is_bytes_back_to_back_with_running_offsets():
    named = mixed_tensors()
    flat, meta = sglang_wire.flatten_tensors(named)
    sizes = [t.numel() * t.element_size() for _, t in named]
    assert flat.dtype == torch.uint8 and flat.numel() == sum(sizes)
    assert [m.start_idx for m in meta] == [0, 60, 74, 80]
    assert [m.end_idx - m.start_idx for m in meta] == sizes
    assert [(m.name, tuple(m.shape), m.dtype, m.numel) for m in meta] == [
        (n, tuple(t.shape), t.dtype, t.numel() * t.element_size())
        for n, t in named  # bytes, as SGLang
    ]
    for (name, got), (_, want) in zip(sglang_wire.unflatten_tensors(flat, meta), named, strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (dict(end_idx=10_000), "outside the bucket"),
        (dict(start_idx=1, end_idx=61), "not a multiple"),
        (dict(end_idx=56), "cannot hold"),
        (dict(dtype="float32"), "torch.dtype"),
    ],
)
def test_unflatten_rejects_bad_metadata(change, error):
    flat, meta = sglang_wire.flatten_tensors(mixed_tensors())
    meta[0] = types.SimpleNamespace(**{**vars(meta[0]), **change})
    with pytest.raises(PayloadError, match=error):
        sglang_wire.unflatten_tensors(flat, meta)
    with pytest.raises(PayloadError, match="uint8"):
        sglang_wire.unflatten_tensors(flat.view(torch.int32), meta)


@pytest.mark.parametrize("load_format", ["flattened_bucket", None, "direct"])
def test_encode_decode_roundtrip(file_system_sharing, load_format):
    named = mixed_tensors()
    entries = sglang_wire.encode_tensor_update(named, load_format=load_format, tp_size=2)
    assert len(entries) == 2 and entries[0] == entries[1] and isinstance(entries[0], str)
    decoded = sglang_wire.decode_tensor_update(entries[0], load_format)
    assert [n for n, _ in decoded] == [n for n, _ in named]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(decoded, named, strict=True))


def test_payload_crosses_processes_after_the_producer_dropped_its_tensors(file_system_sharing):
    named = [("w", torch.randn(4, 3)), ("b", torch.arange(5, dtype=torch.int64))]
    expected = [(n, t.tolist()) for n, t in named]
    entry = sglang_wire.encode_tensor_update(named)[0]
    del named
    code = (
        "import sys; from atropos_megatron import sglang_wire\n"
        "out = sglang_wire.decode_tensor_update(sys.stdin.read(), 'flattened_bucket')\n"
        "print(repr([(n, t.tolist()) for n, t in out]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], input=entry, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == repr(expected)


def recorded_globals(obj) -> set[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    Recorder(io.BytesIO(buffer.getvalue())).load()
    return seen


def test_allow_list_covers_what_forking_pickler_emits(file_system_sharing):
    payloads = [
        {"flattened_tensor": torch.zeros(8, dtype=torch.uint8), "metadata": sglang_wire.flatten_tensors(mixed_tensors())[1]},
        [(n, t) for n, t in mixed_tensors()],
        collections.OrderedDict(p=torch.nn.Parameter(torch.ones(2))),
        [("empty", torch.empty(0))],
    ]  # fmt: skip
    for payload in payloads:
        for module, name in recorded_globals(payload):
            assert (module, name) in sglang_wire._ALLOWED_GLOBALS or sglang_wire._is_torch_dtype(module, name)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


class _Plain:  # an ordinary class: importable, but not in the allow-list
    pass


def test_malicious_and_foreign_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "system": pickle.dumps(_Exploit(marker)),
        "builtins.eval": pickle.dumps(_Eval()),
        "_rebuild_tensor_v2": pickle.dumps(torch.ones(2)),  # torch.save-style tensor: a torch.load path
        "test_sglang_wire._Plain": pickle.dumps(_Plain()),
    }
    for refused, data in cases.items():
        with pytest.raises(UnsafePayloadError, match=refused):
            sglang_wire.deserialize_payload(base64.b64encode(data).decode())
        with pytest.raises(UnsafePayloadError):
            sglang_wire.deserialize_payload(data)  # raw bytes take the same path
    assert not marker.exists()


def test_fd_passing_tensors_are_refused():
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    try:
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(torch.ones(3))
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    with pytest.raises(UnsafePayloadError, match="rebuild_storage_fd"):
        sglang_wire.deserialize_payload(buffer.getvalue())


def test_malformed_payloads_are_payload_errors(file_system_sharing):
    with pytest.raises(PayloadError, match="base64"):
        sglang_wire.deserialize_payload("not base64!!")
    with pytest.raises(PayloadError, match="unpickled"):
        sglang_wire.deserialize_payload(base64.b64encode(b"\x80\x04garbage").decode())
    direct = sglang_wire.serialize_payload({"not": "a list"})
    with pytest.raises(PayloadError, match="direct payload"):
        sglang_wire.decode_tensor_update(direct, None)
    with pytest.raises(PayloadError, match="flattened_bucket payload"):
        sglang_wire.decode_tensor_update(direct, "flattened_bucket")
    with pytest.raises(ValueError, match="load_format"):
        sglang_wire.encode_tensor_update([], load_format="custom")
