"""After an optimizer step: export the weights and push them to the inference servers through the bridge.

``push_weights`` is collective over the model-parallel ranks (it runs :func:`export.export_hf_buckets`);
only the sender rank talks to the bridge, with the transport that ``weights.transport`` names:

- ``grpc``: each bucket's bytes go up the ``PushWeights`` stream; the bridge loads them into
  same-host servers through shared memory.
- ``distributed``: the stream carries only names/dtypes/shapes; the sender broadcasts each bucket on
  a process group that it shares with every server (rank 0 here, ranks 1.. on the servers). The
  group lives across pushes and is created again when the set of reachable servers changes. SGLang
  receives a bucket as one flat broadcast; vLLM (``weights.inference_engine: vllm``) one broadcast
  per tensor, on the group ``sync_group.init_vllm_sender`` joins.
- ``disk``: the sender writes ``<disk_dir>/weight_v<version>`` (safetensors, bucket-sized shards,
  written to a temporary name and renamed) and the stream names that directory.

With LoRA and ``weights.lora_sync: adapter`` only the adapters travel, as a PEFT adapter named
``policy-v<version>``: in one bucket (``grpc``) or as ``<disk_dir>/lora_v<version>`` (``disk``).

The trainer never imports the bridge package (``bridge`` is passed in: anything with the
``BridgeClient`` methods used here). If the push fails on the sender, the export still runs to its
end, so the other ranks' collectives match, and the error is raised afterwards: training may log it
and go on, because the next push carries the full weights again.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from atropos_megatron.config import ModelConfig, WeightsConfig
from atropos_megatron.logs import FirstTimeInfo
from atropos_megatron.trainer import parallel
from atropos_megatron.weights import sync_group
from atropos_megatron.weights.export import (
    WeightBucket,
    export_adapter_tensors,
    export_hf_buckets,
    is_export_sender,
    pack_buckets,
    served_lora,
)
from atropos_megatron.weights.peft_adapter import peft_config, write_peft_adapter
from atropos_megatron.weights.safetensors_io import ShardedSafetensorsWriter

logger = logging.getLogger(__name__)

KEEP_DISK_VERSIONS = 2
ADAPTER_PREFIX = "policy-v"
"""A pushed LoRA adapter's name on the servers: ``policy-v<weight_version>``."""
GROUP_TIMEOUT_S = 300.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class _Group:
    """The ``distributed`` transport's process group and the servers it was created with."""

    group: dist.ProcessGroup | sync_group.VllmSender
    members: tuple[str, ...]

    def send(self, bucket: WeightBucket) -> None:
        """Broadcast ``bucket`` as the servers receive it (the bridge announced its tensors)."""
        if isinstance(self.group, sync_group.VllmSender):
            for _, tensor in bucket.named_tensors():  # vLLM: one broadcast per tensor, in order
                self.group.broadcast(tensor)
        else:  # SGLang's flattened bucket
            dist.broadcast(bucket.data, src=0, group=self.group)


class WeightPusher:
    """Pushes the trainer's weights after each step; keeps the ``distributed`` group between pushes."""

    def __init__(
        self,
        cfg: WeightsConfig,
        model: ModelConfig,
        bridge: Any,
        *,
        hf_config: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            bridge: the sender's ``BridgeClient`` (None on other ranks: they only take part in the export).
            hf_config: ``config.json`` content written beside ``disk`` pushes (so the directory is a
                loadable HF checkpoint); optional.
            dtype: cast exported tensors to this dtype (default: the parameters' own).
        """
        self.cfg = cfg
        self.model = model
        self.bridge = bridge
        self.hf_config = hf_config
        self.dtype = dtype
        self._group: _Group | None = None
        self._push_log = FirstTimeInfo()

    @property
    def sends_adapters(self) -> bool:
        """Whether pushes carry the LoRA adapters alone (``weights.lora_sync: adapter``)."""
        return self.model.lora.enabled and self.cfg.lora_sync == "adapter"

    def push(self, chunks, *, weight_version: str, progress: Callable[[int], object] | None = None):
        """Export ``chunks`` and push them as ``weight_version``. Collective; returns the bridge's answer
        (``PushWeightsResponse``) on the sender and None elsewhere."""
        if self.sends_adapters:
            return self._push_adapter(chunks, weight_version)
        device = self._bucket_device()
        buckets = export_hf_buckets(
            chunks,
            self.model,
            bucket_bytes=self.cfg.bucket_bytes,
            dtype=self.dtype,
            device=device,
            progress=progress,
        )
        if not is_export_sender():
            for _ in buckets:  # collective: take part, send nothing
                pass
            return None
        return self.send(buckets, weight_version=weight_version)

    def send(self, buckets: Iterator[WeightBucket], *, weight_version: str):
        """Push ready-made buckets (the sender's half of :meth:`push`; also usable without Megatron).

        ``buckets`` is exhausted even when the push fails, so a collective producer stays in step.
        """
        buckets = iter(buckets)
        started = time.monotonic()
        send = {"grpc": self._push_grpc, "distributed": self._push_distributed, "disk": self._push_disk}
        try:
            response = send[self.cfg.transport](buckets, weight_version)
        finally:
            for _ in buckets:  # after a failure: finish the export so every rank's collectives match
                pass
        self._log_push(f"weights {weight_version}", response.buckets, response.bytes, started, response)
        return response

    def _log_push(self, what: str, buckets: int, nbytes: int, started: float, response) -> None:
        """One line per push: INFO the first time, DEBUG after, WARNING when a server missed it."""
        updated = sum(server.updated for server in response.servers)
        level = self._push_log.level() if updated == len(response.servers) else logging.WARNING
        logger.log(
            level,
            "%s pushed (%s): %d bucket(s), %.1f MB in %.2f s; %d/%d server(s) updated%s",
            what,
            self.cfg.transport,
            buckets,
            nbytes / 1e6,
            time.monotonic() - started,
            updated,
            len(response.servers),
            "" if level != logging.INFO else " (later pushes at DEBUG)",
        )

    def _push_adapter(self, chunks, version: str):
        """The LoRA adapters alone, as the new adapter ``policy-v<version>`` (collective export)."""
        tensors = list(export_adapter_tensors(chunks, self.model.lora, dtype=self.dtype))
        if not is_export_sender():
            return None
        name = f"{ADAPTER_PREFIX}{version}"
        moved = sum(t.numel() * t.element_size() for _, t in tensors)
        lora = served_lora(self.model.lora)
        config = peft_config(lora, base_model=self.model.hf_path or self.model.dist_checkpoint)
        started = time.monotonic()
        if self.cfg.transport == "disk":
            root = Path(self.cfg.disk_dir)
            final, partial = root / f"lora_v{version}", root / f".lora_v{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            write_peft_adapter(partial, lora, dict(tensors), base_model=config["base_model_name_or_path"])
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            stream = self.bridge.open_weight_push(
                version, transport="disk", disk_path=str(final.resolve()), lora_name=name, lora_config=config
            )
            response = stream.finish()
            _prune_versions(root, keep=final, pattern="lora_v*")
        else:  # grpc: the whole adapter in one bucket, loaded with one call
            buckets = pack_buckets(tensors, bucket_bytes=max(moved, 1))
            del tensors
            response = self._push_grpc(buckets, version, lora_name=name, lora_config=config)
        self._log_push(f"LoRA adapter {name}", 1, moved, started, response)
        return response

    def close(self) -> None:
        if self._group is not None:
            sync_group.destroy_group(self._group.group)
            self._group = None

    # -- transports -----------------------------------------------------------------------------

    def _push_grpc(self, buckets: Iterator[WeightBucket], version: str, **lora):
        """``lora``: ``lora_name`` and ``lora_config`` of an adapter push (its one bucket)."""
        stream = self.bridge.open_weight_push(version, transport="grpc", **lora)
        try:
            for bucket in buckets:
                stream.send_bucket(bucket.index, _specs(bucket), memoryview(bucket.data.numpy()))
        except BaseException:
            stream.cancel()
            raise
        return stream.finish()

    def _push_distributed(self, buckets: Iterator[WeightBucket], version: str):
        servers = [s for s in self.bridge.status().servers if s.healthy]
        members = tuple(s.url for s in servers)
        init = self._group is None or self._group.members != members
        vllm = self.cfg.inference_engine == "vllm"
        group_name = sync_group.VLLM_GROUP_NAME if vllm else self.cfg.group_name
        group_fields: dict[str, Any] = {"group_name": group_name, "init": init}
        if init:
            self.close()
            group_fields.update(
                master_address=_master_address(members),
                master_port=self.cfg.master_port or parallel.free_port(""),
                backend=self._backend(),
                world_size=1 + sum(max(s.tp_size, 1) for s in servers),
            )
        stream = self.bridge.open_weight_push(version, transport="distributed", group=group_fields)
        try:
            if init:
                group = _join_group(stream, group_fields, vllm=vllm)
                self._group = _Group(group, members)
            for bucket in buckets:
                stream.send_bucket(bucket.index, _specs(bucket))
                self._group.send(bucket)
        except BaseException:
            stream.cancel()
            self.close()  # a failed broadcast leaves the group unusable
            raise
        return stream.finish()

    def _push_disk(self, buckets: Iterator[WeightBucket], version: str):
        root = Path(self.cfg.disk_dir)
        final = root / f"weight_v{version}"
        partial = root / f".weight_v{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with ShardedSafetensorsWriter(partial, max_shard_bytes=self.cfg.bucket_bytes) as writer:
            for bucket in buckets:
                for name, tensor in bucket.named_tensors():
                    writer.add(name, tensor)
        if self.hf_config is not None:
            (partial / "config.json").write_text(json.dumps(self.hf_config, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        stream = self.bridge.open_weight_push(version, transport="disk", disk_path=str(final.resolve()))
        response = stream.finish()
        _prune_versions(root, keep=final)
        return response

    # -- helpers --------------------------------------------------------------------------------

    def _backend(self) -> str:
        return self.cfg.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")

    def _bucket_device(self) -> torch.device:
        if self.cfg.transport == "distributed" and self._backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _specs(bucket: WeightBucket) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, str(t.dtype).removeprefix("torch."), t.shape) for t in bucket.tensors]


def _join_group(stream, fields: dict[str, Any], *, vllm: bool = False):
    """Join the weight group as rank 0 while the bridge makes the servers join theirs (vLLM's group
    with ``vllm``).

    The rendezvous blocks until every server is in; if the bridge refuses the push meanwhile, the
    stream's error is raised at once instead of waiting for the rendezvous to time out.
    """
    result: dict[str, Any] = {}

    def join() -> None:
        try:
            if vllm:
                result["group"] = sync_group.init_vllm_sender(
                    backend=fields["backend"],
                    master_address=fields["master_address"],
                    master_port=fields["master_port"],
                    world_size=fields["world_size"],
                    timeout_s=GROUP_TIMEOUT_S,
                )
                return
            result["group"] = sync_group.init_custom_process_group(
                backend=fields["backend"],
                init_method=f"tcp://{fields['master_address']}:{fields['master_port']}",
                world_size=fields["world_size"],
                rank=0,
                group_name=fields["group_name"],
                timeout_s=GROUP_TIMEOUT_S,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=join, name="weight-group-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        if thread.is_alive() and stream.done():
            stream.finish()  # raises the bridge's refusal
            raise RuntimeError("the bridge ended the push before the servers joined the weight group")
    if "error" in result:
        raise result["error"]
    return result["group"]


def _master_address(server_urls: tuple[str, ...]) -> str:
    """This host as the servers should reach it: loopback when they all run here, else its FQDN."""
    hosts = {urlparse(url).hostname for url in server_urls}
    return "127.0.0.1" if hosts <= set(_LOOPBACK) else socket.getfqdn()


def _prune_versions(root: Path, *, keep: Path, pattern: str = "weight_v*") -> None:
    """Delete all but the newest ``KEEP_DISK_VERSIONS`` pushed directories (servers read the newest)."""
    versions = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    for old in versions[:-KEEP_DISK_VERSIONS]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
