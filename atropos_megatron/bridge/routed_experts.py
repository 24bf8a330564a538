"""Rollout routing replay, the bridge's part: capture the engine's expert choices, join them to batches.

With ``weights.capture_routed_experts`` the inference proxies (``inference_proxy.py``) ask SGLang for the
experts it routed every token to (``return_routed_experts: true`` on ``/generate``; the server needs
``--enable-return-routed-experts``), take ``meta_info["routed_experts"]`` out of the response (the
environment never reads it, and it is ~2 KB per token for Qwen3-30B-A3B) and keep it here, keyed by
the sequence's full token ids: the request's ``input_ids`` + the sample's ``output_ids`` (SGLang's
``output_ids`` are the tokens through the stop condition, and its routing has exactly
``len(input_ids) + len(output_ids) - 1`` rows: the last sampled token is never fed to the model).
When a batch arrives from Atropos, each sequence's ``tokens`` are looked up again
(:func:`attach_routed_experts`): an environment that posts exactly the tokens the engine saw
(atroposlib's ``ManagedServer``, ``tokens_and_logprobs_completion``) gets its routing replayed; one that
re-tokenizes, truncates or edits them gets -1 rows (the trainer routes those tokens itself).

What is not captured: streamed responses, text prompts (no prompt ids to key by), requests with a
``routed_experts_start_len`` (partial rows), and the ``/v1`` routes (SGLang returns only the first
choice's routing there). The store is bounded by bytes; routings never claimed (groups an environment
dropped) are evicted oldest first. No HTTP and no gRPC here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atropos_megatron.bridge.codec import EncodedBatch

MISSING = -1
"""The ``routed_experts`` entry of a position whose routing the bridge does not have."""

CAPTURED_ROUTES = ("/generate",)
"""Routes whose requests ask for routed experts (SGLang's native route: per-sample routing and ids)."""


def decode_routed_experts(text: Any) -> np.ndarray | None:
    """Flat int32 ids of SGLang's ``routed_experts`` (base64 of little-endian int32), or None if malformed.

    SGLang's own decoder is ``state_capturer/routed_experts.py: extract_routed_experts_from_meta_info``.
    """
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 4:
        return None
    return np.frombuffer(raw, dtype="<i4")


def token_key(tokens: Sequence[int] | np.ndarray) -> bytes | None:
    """The store's key of a token sequence (its int32 bytes), or None for ids that are not int32."""
    try:
        array = np.asarray(tokens, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if array.ndim != 1 or (array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max)):
        return None
    return array.astype("<i4").tobytes()


class RoutedExpertsStore:
    """Routings by token sequence, in memory, at most ``max_bytes``; thread-safe.

    Each entry is int16 ``[len(tokens) - 1, num_layers * top_k]`` (the proxies do not know how the
    width splits; the join checks it against the trainer's model). Identical sequences (two samples
    that came out the same) keep one entry each, claimed oldest first.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[bytes, np.ndarray]] = OrderedDict()  # oldest first
        self._by_key: dict[bytes, deque[int]] = {}
        self._next_id = 0
        self._bytes = 0
        self.counters: Counter[str] = Counter()

    def put(self, key: bytes, routing: np.ndarray) -> bool:
        """Keep ``routing`` for the sequence ``key``, evicting the oldest entries to make room; False
        (counted as evicted) when it alone exceeds the bound."""
        nbytes = routing.nbytes + len(key)
        with self._lock:
            if nbytes > self.max_bytes:
                self.counters["evicted"] += 1  # dropped at once: larger than the whole bound
                return False
            while self._bytes + nbytes > self.max_bytes:
                self._evict_oldest()
            entry_id = self._next_id
            self._next_id += 1
            self._entries[entry_id] = (key, routing)
            self._by_key.setdefault(key, deque()).append(entry_id)
            self._bytes += nbytes
            self.counters["captured"] += 1
        return True

    def take(self, keys: Sequence[bytes | None]) -> list[np.ndarray | None]:
        """The routing of each key (None where there is none), removed from the store.

        A key asked for twice in one call gets its second entry if there is one, else the first again:
        a group may hold the same sequence twice while the engine produced it once (or the proxy saw
        it once).
        """
        out: list[np.ndarray | None] = []
        taken: dict[bytes, np.ndarray] = {}
        with self._lock:
            for key in keys:
                ids = self._by_key.get(key) if key is not None else None
                if ids:
                    entry_id = ids.popleft()
                    if not ids:
                        del self._by_key[key]
                    _, routing = self._entries.pop(entry_id)
                    self._bytes -= routing.nbytes + len(key)
                    taken[key] = routing
                out.append(taken.get(key) if key is not None else None)
        return out

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counters[name] += amount

    def snapshot(self) -> dict[str, int]:
        """Counters plus the entries and bytes held now."""
        with self._lock:
            return {**self.counters, "entries": len(self._entries), "bytes": self._bytes}

    def _evict_oldest(self) -> None:
        entry_id, (key, routing) = self._entries.popitem(last=False)
        ids = self._by_key[key]
        ids.remove(entry_id)
        if not ids:
            del self._by_key[key]
        self._bytes -= routing.nbytes + len(key)
        self.counters["evicted"] += 1


# ------------------------------------------------------------------------------------------------
# The proxy's side: requests and responses of /generate
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureRequest:
    """What the response of one rewritten ``/generate`` request is matched against."""

    prompts: list[list[int]]
    """The request's ``input_ids`` (one list per prompt)."""
    client_asked: bool
    """The client itself set ``return_routed_experts: true``: the field stays in its response."""


def ask_routed_experts(path: str, body: bytes) -> tuple[bytes, CaptureRequest | None]:
    """``body`` with ``return_routed_experts: true`` when its routing can be captured, else unchanged."""
    if path.split("?", 1)[0] not in CAPTURED_ROUTES:
        return body, None
    try:
        request = json.loads(body)
    except ValueError:
        return body, None
    if not isinstance(request, dict) or request.get("stream") or request.get("routed_experts_start_len"):
        return body, None
    ids = request.get("input_ids")
    if not isinstance(ids, list) or not ids:
        return body, None  # a text prompt: no ids to key the routing by
    prompts = ids if all(isinstance(p, list) for p in ids) else [ids]
    client_asked = request.get("return_routed_experts") is True
    request["return_routed_experts"] = True
    return json.dumps(request).encode(), CaptureRequest(prompts, client_asked)


def capture_response(capture: CaptureRequest, content: bytes, store: RoutedExpertsStore) -> bytes:
    """Store each sample's routing from a ``/generate`` response; the response without it (unless the
    client asked). Samples come prompt-major, ``n`` per prompt (SGLang's ``_handle_batch_request``)."""
    try:
        response = json.loads(content)
    except ValueError:
        return content
    samples = response if isinstance(response, list) else [response]
    if not samples or len(samples) % len(capture.prompts):
        store.count("malformed", len(samples))
        return content
    per_prompt = len(samples) // len(capture.prompts)
    changed = False
    for index, sample in enumerate(samples):
        meta = sample.get("meta_info") if isinstance(sample, dict) else None
        if not isinstance(meta, dict):
            continue
        encoded = meta.get("routed_experts") if capture.client_asked else meta.pop("routed_experts", None)
        changed |= encoded is not None and not capture.client_asked
        _store_sample(store, capture.prompts[index // per_prompt], sample.get("output_ids"), encoded)
    return json.dumps(response).encode() if changed else content


def _store_sample(store: RoutedExpertsStore, prompt: list, output_ids: Any, encoded: Any) -> None:
    if encoded is None:
        store.count("no_routing")  # aborted, or the server runs without --enable-return-routed-experts
        return
    key = token_key([*prompt, *output_ids]) if isinstance(output_ids, list) else None
    flat = decode_routed_experts(encoded)
    rows = len(key) // 4 - 1 if key is not None else 0
    if key is None or flat is None or rows <= 0 or flat.size == 0 or flat.size % rows:
        store.count("malformed")
        return
    if flat.min() < 0 or flat.max() > np.iinfo(np.int16).max:
        store.count("malformed")
        return
    store.put(key, flat.astype(np.int16).reshape(rows, -1))


# ------------------------------------------------------------------------------------------------
# The batch's side
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinResult:
    batch: EncodedBatch
    matched: int
    unmatched: int


def sequence_tokens(batch: EncodedBatch) -> list[np.ndarray]:
    """Each sequence's full tokens, back from label alignment: ``input_ids`` + the last label."""
    ends = np.cumsum(batch.seq_lens, dtype=np.int64)
    starts = ends - batch.seq_lens
    return [
        np.concatenate([batch.input_ids[s:e], batch.labels[e - 1 : e]])
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def discard_routed_experts(batch: EncodedBatch, store: RoutedExpertsStore) -> None:
    """Drop the routings of ``batch``'s sequences (a trainer that replays none would leave them held
    until evicted)."""
    store.take([token_key(tokens) for tokens in sequence_tokens(batch)])


def attach_routed_experts(
    batch: EncodedBatch, store: RoutedExpertsStore, *, num_layers: int, top_k: int
) -> JoinResult:
    """``batch`` with ``routed_experts`` int16 ``[T, num_layers, top_k]`` from the store (position i: the
    routing of input token i), -1 for sequences without one; left None when no sequence has one."""
    routings = store.take([token_key(tokens) for tokens in sequence_tokens(batch)])
    table = np.full((batch.num_tokens, num_layers, top_k), MISSING, dtype=np.int16)
    start, matched = 0, 0
    for length, routing in zip(batch.seq_lens.tolist(), routings, strict=True):
        if routing is not None and routing.shape == (length, num_layers * top_k):
            table[start : start + length] = routing.reshape(length, num_layers, top_k)
            matched += 1
        elif routing is not None:  # the engine's model is not the trainer's (layers x top_k differ)
            store.count("width_mismatch")
        start += length
    unmatched = batch.num_sequences - matched
    store.count("sequences_matched", matched)
    store.count("sequences_unmatched", unmatched)
    joined = dataclasses.replace(batch, routed_experts=table) if matched else batch
    return JoinResult(joined, matched, unmatched)
