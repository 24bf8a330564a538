"""SGLang's weight-payload wire format: flattened buckets, ForkingPickler + base64, a safe unpickler.

``POST /update_weights_from_tensor`` carries ``serialized_named_tensors``: one base64 string per SGLang
TP rank, each a ``multiprocessing`` ForkingPickler dump (what SGLang's
``MultiprocessingSerializer.serialize(obj, output_str=True)`` produces). A tensor pickles as a handle to
shared memory (CPU: a ``/dev/shm`` file under the ``file_system`` strategy; CUDA: an IPC handle), not as
its bytes, so the producer must keep its tensors alive until the server has answered.
``POST /load_lora_adapter_from_tensors`` carries adapters the same way (:func:`decode_lora_tensors`).

The trainer side (encode) and the reference server (decode) share this module, so the two cannot
drift. Decoding never uses plain ``pickle.loads``: :class:`SafeUnpickler` admits only the exact globals
that ForkingPickler emits for CPU tensors (``file_system`` strategy), CUDA tensors, and plain metadata.
This module deliberately imports only torch and the standard library (no transformers, fastapi,
grpc or megatron).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import pickle
import types
from collections.abc import Sequence

import torch
import torch.multiprocessing
from torch.multiprocessing.reductions import init_reductions

logger = logging.getLogger(__name__)

FLATTENED_BUCKET = "flattened_bucket"
DIRECT_FORMATS = (None, "direct")

# (module, name) pairs that ForkingPickler emits for the payloads SGLang clients send, found by
# recording ``find_class`` while loading real payloads (torch 2.13): CPU tensors under the file_system
# strategy go through rebuild_tensor -> rebuild_typed_storage -> rebuild_storage_filename(UntypedStorage),
# CUDA tensors through rebuild_cuda_tensor(TypedStorage). Everything else is refused: in particular
# ``rebuild_storage_fd`` (needs the producer's multiprocessing authkey), anything reaching
# ``torch.load``/``torch.serialization`` (arbitrary pickles inside), and every builtin.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.multiprocessing.reductions", "rebuild_tensor"),
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
        ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch.nn.parameter", "Parameter"),
        ("types", "SimpleNamespace"),
        ("collections", "OrderedDict"),
    }
)


class PayloadError(ValueError):
    """A weight payload that cannot be decoded (bad base64, bad pickle, bad bucket metadata)."""


class UnsafePayloadError(PayloadError):
    """A pickle that names a global outside the allow-list; nothing from it was executed."""


def _is_torch_dtype(module: str, name: str) -> bool:
    # dtypes pickle as globals of the torch module (``torch.float32``); they are values, not callables.
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (see ``_ALLOWED_GLOBALS``) and torch dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafePayloadError(f"refused unpickling global {module}.{name}: not in the allow-list")


SHM_MANAGER_ATTEMPTS = 5


def use_file_system_sharing() -> None:
    """Make CPU tensors pickle as named shared-memory files, which any local process can open.

    The default ``file_descriptor`` strategy passes fds through a socket that needs the producer's
    multiprocessing authkey, so an unrelated server process cannot rebuild the tensor. Idempotent.

    The ``file_system`` strategy registers every segment with ``torch_shm_manager``, a helper torch
    forks and execs on first use and reads a handshake line from. That start can fail on a saturated
    machine ("no response from torch_shm_manager": the helper wrote nothing and exited; seen once in a
    full test suite beside ``stress-ng``), and a failure inside a big ``share_memory_()`` would leak
    the segment it had just created. So the helper is started here with a one-byte segment, retried;
    once it runs, it serves this process for good.
    """
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")
    for attempt in range(1, SHM_MANAGER_ATTEMPTS + 1):
        try:
            torch.empty(1, dtype=torch.uint8).share_memory_()
            return
        except RuntimeError as exc:
            if "torch_shm_manager" not in str(exc) or attempt == SHM_MANAGER_ATTEMPTS:
                raise
            logger.warning("starting torch_shm_manager failed (attempt %d): %s; retrying", attempt, exc)


def bucket_metadata(tensors: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> list[types.SimpleNamespace]:
    """SGLang's flattened-bucket metadata for tensors laid out back to back in this order, no padding.

    Each entry is ``SimpleNamespace(name, shape, dtype, start_idx, end_idx, numel)`` (SimpleNamespace,
    because SGLang's unpickler admits it and would refuse a class of ours). Offsets index the uint8
    buffer, i.e. they are bytes; ``numel`` counts those bytes too, as SGLang's multi-dtype bucket does.
    """
    metadata: list[types.SimpleNamespace] = []
    offset = 0
    for name, shape, dtype in tensors:
        size = torch.Size(shape).numel() * dtype.itemsize
        metadata.append(
            types.SimpleNamespace(
                name=name,
                shape=torch.Size(shape),
                dtype=dtype,
                start_idx=offset,
                end_idx=offset + size,
                numel=size,
            )
        )
        offset += size
    return metadata


def flatten_tensors(
    named: Sequence[tuple[str, torch.Tensor]],
) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """Concatenate tensors' bytes (in order, no padding) into one uint8 tensor, plus their metadata
    (:func:`bucket_metadata`). Tensors of any dtype may be mixed; all must be on one device."""
    parts = [tensor.detach().contiguous().reshape(-1).view(torch.uint8) for _, tensor in named]
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return flat, bucket_metadata([(name, tensor.shape, tensor.dtype) for name, tensor in named])


def unflatten_tensors(flat: torch.Tensor, metadata) -> list[tuple[str, torch.Tensor]]:
    """Views into ``flat`` for each metadata entry (duck-typed: name, shape, dtype, start_idx, end_idx).

    Raises :class:`PayloadError` on a non-uint8 buffer, an out-of-range or misaligned slice, or a slice
    whose byte count does not match ``shape`` x ``dtype``.
    """
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise PayloadError("flattened_tensor must be a 1-D uint8 tensor")
    out: list[tuple[str, torch.Tensor]] = []
    for index, meta in enumerate(metadata):
        try:
            name, shape, dtype = meta.name, torch.Size(meta.shape), meta.dtype
            start, end = int(meta.start_idx), int(meta.end_idx)
        except (AttributeError, TypeError, ValueError) as exc:
            raise PayloadError(f"metadata entry {index} is malformed: {exc}") from exc
        if not isinstance(name, str) or not isinstance(dtype, torch.dtype):
            raise PayloadError(f"metadata entry {index}: name must be str and dtype a torch.dtype")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= end <= flat.numel():
            raise PayloadError(f"{name}: bytes [{start}, {end}) outside the bucket of {flat.numel()} bytes")
        if end - start != shape.numel() * itemsize:
            raise PayloadError(f"{name}: {end - start} bytes cannot hold {list(shape)} {dtype}")
        if start % itemsize:
            raise PayloadError(f"{name}: offset {start} is not a multiple of {dtype}'s size {itemsize}")
        out.append((name, flat[start:end].view(dtype).view(shape)))
    return out


def serialize_payload(obj) -> str:
    """ForkingPickler dump + base64 (SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``).

    CPU tensors in ``obj`` cross processes only under :func:`use_file_system_sharing`; the caller must
    keep them alive until the receiving server has answered.
    """
    from multiprocessing.reduction import ForkingPickler

    init_reductions()  # registers torch's tensor reducers with ForkingPickler (import does it too)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def deserialize_payload(data: str | bytes):
    """Decode base64 (strict) or take raw pickle bytes, then load with :class:`SafeUnpickler`.

    Raises :class:`UnsafePayloadError` for a refused global and :class:`PayloadError` for anything else
    malformed; never executes code outside the allow-list.
    """
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"payload is not valid base64: {exc}") from exc
    if not isinstance(data, bytes | bytearray):
        raise PayloadError(f"payload must be a base64 string or bytes, got {type(data).__name__}")
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as exc:  # truncated pickle, missing shm file, bad reduce arguments, ...
        raise PayloadError(f"payload could not be unpickled: {type(exc).__name__}: {exc}") from exc


def encode_tensor_update(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    load_format: str | None = FLATTENED_BUCKET,
    tp_size: int = 1,
) -> list[str]:
    """The ``serialized_named_tensors`` value of ``/update_weights_from_tensor``: one entry per TP rank.

    ``flattened_bucket``: each entry is ``{"flattened_tensor": uint8, "metadata": [SimpleNamespace]}``;
    ``None``/``"direct"``: a list of ``(name, tensor)``. Every rank gets the same payload (full,
    unsharded HF tensors; SGLang shards them itself).

    Lifetime: the pickles reference shared memory, not copies. A CPU tensor's pickle holds a reference
    of its own (the receiver drops it), so ``named`` may be freed once this returns (checked in
    tests/unit/test_sglang_wire.py); the string is then good for one receiver. CUDA tensors pickle as
    IPC handles without such a reference: keep ``named`` alive until the server has answered.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if load_format == FLATTENED_BUCKET:
        flat, metadata = flatten_tensors(named)
        entry = serialize_payload({"flattened_tensor": flat, "metadata": metadata})
    elif load_format in DIRECT_FORMATS:
        entry = serialize_payload([(name, tensor.detach()) for name, tensor in named])
    else:
        raise ValueError(f"load_format must be one of None, 'direct', {FLATTENED_BUCKET!r}: {load_format!r}")
    return [entry] * tp_size


def decode_tensor_update(entry: str | bytes, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One rank's entry of ``serialized_named_tensors`` -> ``[(name, tensor)]``, validated."""
    payload = deserialize_payload(entry)
    if load_format == FLATTENED_BUCKET:
        if not isinstance(payload, dict) or set(payload) != {"flattened_tensor", "metadata"}:
            raise PayloadError("a flattened_bucket payload must be {'flattened_tensor', 'metadata'}")
        if not isinstance(payload["metadata"], list | tuple):
            raise PayloadError("flattened_bucket metadata must be a list")
        return unflatten_tensors(payload["flattened_tensor"], payload["metadata"])
    if load_format in DIRECT_FORMATS:
        if not isinstance(payload, list | tuple):
            raise PayloadError("a direct payload must be a list of (name, tensor) pairs")
        named: list[tuple[str, torch.Tensor]] = []
        for item in payload:
            if (
                not isinstance(item, tuple | list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], torch.Tensor)
            ):
                raise PayloadError("a direct payload must be a list of (name, tensor) pairs")
            named.append((item[0], item[1]))
        return named
    raise PayloadError(f"unsupported load_format {load_format!r} (None, 'direct' or {FLATTENED_BUCKET!r})")


def decode_lora_tensors(entry: str | bytes, load_format: str | None) -> dict[str, torch.Tensor]:
    """One rank's entry of ``/load_lora_adapter_from_tensors``'s ``serialized_named_tensors`` -> tensors.

    Not the weight update's shape: without a bucket the payload is a dict ``{name: tensor}`` (SGLang
    0.5.23 ``TpModelWorker.load_lora_adapter_from_tensors`` takes any other ``load_format`` than
    ``flattened_bucket`` as that dict); ``flattened_bucket`` is the weight update's bucket.
    """
    if load_format == FLATTENED_BUCKET:
        return dict(decode_tensor_update(entry, FLATTENED_BUCKET))
    if load_format not in DIRECT_FORMATS:
        raise PayloadError(
            f"unsupported load_format {load_format!r} (None, 'direct' or {FLATTENED_BUCKET!r})"
        )
    payload = deserialize_payload(entry)
    if not isinstance(payload, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in payload.items()
    ):
        raise PayloadError("a LoRA tensor payload must be a dict {name: tensor} (or a flattened_bucket)")
    return payload
