"""The GRPO training loop: batch in, update, weights out, acknowledge, log, checkpoint.

Per step, on every rank of the job (launched by torchrun or srun)::

    rank 0 asks the bridge for a batch ──broadcast──▶ every rank plans its micro-batches
    old log-probs (recomputed or the inference engine's) + reference log-probs (if KL is on)
    GRPO loss forward/backward ─▶ optimizer step (Megatron DDP + distributed optimizer)
    export the weights ─▶ bridge ─▶ inference servers (weight_version = step)
    rank 0 acknowledges the batch, logs the step; a checkpoint every N steps and on SIGTERM

Exactly once: a batch is acknowledged only after its update is applied and pushed, and every
checkpoint is reported to the bridge once it is durable (``commit_checkpoint``); the bridge keeps
each batch until a checkpoint holds it. A trainer killed outright (SIGKILL, a lost node) resumes from
its last checkpoint and registers at that step, and the bridge serves again, same ids and order, the
batches trained since; a batch already in the checkpoint's ``batch_history`` (its acknowledgement was
lost) is acknowledged, not trained twice. The trainer never imports the bridge: rank 0 receives a
client object with ``register_run`` / ``next_batch`` / ``ack`` / ``commit_checkpoint`` /
``open_weight_push``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import types
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from atropos_megatron.config import ModelConfig, TrainConfig, save_config
from atropos_megatron.data.batching import MicroBatch, build_rollouts, plan_micro_batches, split_into_updates
from atropos_megatron.trainer import checkpoint, parallel
from atropos_megatron.trainer.grpo_step import (
    SUMMED_METRICS,
    gather_loss_metrics,
    grpo_loss_pass,
    token_logprobs_pass,
)
from atropos_megatron.trainer.model import build_model, check_model_layout, padded_vocab_size
from atropos_megatron.trainer.optimizer import build_train_state, optimizer_step, zero_grads
from atropos_megatron.trainer.step import on_model_device

logger = logging.getLogger(__name__)

CATCH_UP = "catch-up-push"
"""What rank 0 hands every rank instead of a batch when the weights must be pushed again first."""
EXIT_PREEMPTED = 143
"""Exit status after a SIGTERM/SIGINT stop with its checkpoint written (128 + SIGTERM)."""

_BATCH_FIELDS = (
    "batch_id", "step", "seq_lens", "input_ids", "labels", "loss_mask", "scores", "group_index",
    "advantages", "inference_logprobs", "ref_logprobs", "routed_experts", "fetched_unix_s",
)  # fmt: skip


def resolve_model(model: ModelConfig) -> tuple[ModelConfig, int | None]:
    """The architecture to build, from ``model.hf_path``'s config.json or ``model.dist_checkpoint``'s
    sidecar (else the config itself), and the padded vocabulary a Megatron checkpoint fixes."""
    from atropos_megatron.weights.hf_architectures import resolve_architecture

    if model.hf_path is not None:
        return resolve_architecture(model), None
    if model.dist_checkpoint is not None:
        from atropos_megatron.weights.dist_checkpoint import read_checkpoint_info

        info = read_checkpoint_info(model.dist_checkpoint)
        if info.model is None:
            return model, info.padded_vocab  # another tool's checkpoint: the config's architecture
        kept = {
            "dtype": model.dtype,
            "dist_checkpoint": model.dist_checkpoint,
            "hf_path": None,
            "lora": model.lora,
        }
        return replace(info.model, **kept), info.padded_vocab
    return model, None


class Trainer:
    """One rank's part of a GRPO run. ``setup()``, then ``run()`` (or ``train_on(batch)`` per step)."""

    def __init__(self, cfg: TrainConfig, *, bridge: Any | None = None) -> None:
        """
        Args:
            bridge: rank 0's ``BridgeClient`` (None elsewhere, and in tests that feed batches directly).
        """
        self.cfg = cfg
        self.bridge = bridge
        self._stop_signal: int | None = None
        self._pid = os.getpid()  # forked helpers inherit the signal handler; only this process stops
        # A batch handed out to this run's previous life and never acknowledged (it died mid-step)
        # is asked for again first, so that no batch the bridge gave out is lost.
        self._redeliver = True

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the job, build actor (and reference), load weights or resume (collective)."""
        from atropos_megatron.trainer.megatron_patches import te_available

        cfg = self.cfg
        if cfg.model.lora.enabled and te_available():
            logger.warning(
                "LoRA: the model is built on Megatron's local layer spec although Transformer Engine is "
                "present (TE fuses the norms into the linear layers the adapters wrap): PyTorch SDPA attention"
            )
        self.layout = parallel.init_distributed(cfg.parallel, seed=cfg.seed)
        self.model, fixed_vocab = resolve_model(cfg.model)
        check_model_layout(self.model, cfg.parallel)
        # A LoRA run records its base (path + fingerprint) in each checkpoint and checks it on resume.
        self.lora_base = checkpoint.LoraBase.of(cfg.model) if cfg.model.lora.enabled else None
        self.padded_vocab = fixed_vocab or padded_vocab_size(
            self.model.vocab_size, self.model.make_vocab_size_divisible_by, 1
        )
        # initialize=True even before loading weights: Megatron marks how each matrix is split over
        # TP only while initialising, and the weight export needs those marks.
        chunks = build_model(
            self.model,
            cfg.parallel,
            padded_vocab=self.padded_vocab,
            moe_aux_loss_coef=self._moe_aux_loss_coef(),
            moe_z_loss_coef=cfg.grpo.moe_z_loss_coef,
        )
        self._load_initial_weights(chunks)
        # LoRA: adapters on the loaded base, before DDP (it buckets only what needs gradients), so the
        # optimizer holds only adapters; the reference is the base itself with the adapters off.
        self.lora = self._install_lora(chunks)
        self.fused_linear = self._choose_fused_linear()
        lora_dropout = cfg.model.lora.enabled and cfg.model.lora.dropout > 0
        # One update per batch and nothing random in the forward: the loss pass computes pi_old itself.
        self.on_policy_loss_pass = cfg.grpo.updates_per_batch == 1 and not lora_dropout
        if cfg.grpo.old_logprobs == "auto":
            logger.info(
                "old log-probs: %s (grpo.old_logprobs: auto)",
                "the loss pass's own, detached (one update per batch: exact; no extra forward)"
                if self.on_policy_loss_pass
                else "recomputed before the update (updates_per_batch > 1 or LoRA dropout)",
            )
        needs_copy = cfg.grpo.kl_coef > 0 and not self.lora
        self.reference = self._build_reference(chunks) if needs_copy else None
        self.state = build_train_state(
            chunks, self.model, cfg.optimizer, total_steps=cfg.steps * cfg.grpo.updates_per_batch
        )
        self.router_stats = self._watch_routers()
        self.routing_replay = self._install_routing_replay()
        self.progress = checkpoint.Progress(
            step=0, weight_version="0", layout=(self.layout.tp, self.layout.pp, self.layout.dp)
        )
        self.checkpoint_dir = Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")
        if cfg.checkpoint.load:
            path = checkpoint.resolve(self.checkpoint_dir, cfg.checkpoint.load)
            if path is None:
                self._log(f"no checkpoint under {self.checkpoint_dir} yet: starting fresh")
            else:
                restored = checkpoint.load(
                    path,
                    chunks=self.state.chunks,
                    optimizer=self.state.optimizer,
                    scheduler=self.state.scheduler,
                    model=self.model,
                    lora_base=self.lora_base,
                )
                self.progress = replace(restored, layout=(self.layout.tp, self.layout.pp, self.layout.dp))
                self._log(f"resumed from {path} at step {self.progress.step}")

    def _moe_aux_loss_coef(self) -> float:
        """``grpo.moe_aux_loss_coef``, or the model's own coefficient when it is null (0 for dense)."""
        configured = self.cfg.grpo.moe_aux_loss_coef
        if not self.model.moe.enabled:
            return 0.0
        return self.model.moe.router_aux_loss_coef if configured is None else configured

    def _watch_routers(self):
        """MoE models: routing metrics per step (``trainer/moe_metrics.py``); None for dense ones."""
        if not self.model.moe.enabled:
            return None
        from atropos_megatron.trainer.moe_metrics import RouterStats

        parallel_cfg = self.cfg.parallel
        self._log(
            f"MoE: {self.model.moe.num_experts} experts, top-{self.model.moe.router_topk}, "
            f"{len(self.model.moe_layers)} of {self.model.num_layers} layers; EP={parallel_cfg.expert_parallel_size} "
            f"({parallel_cfg.moe_token_dispatcher} dispatcher); aux-loss coefficient {self._moe_aux_loss_coef():g}, "
            f"z-loss {self.cfg.grpo.moe_z_loss_coef:g}"
        )
        counts_tokens = parallel_cfg.sequence_parallel or self.layout.tp_rank == 0
        return RouterStats(self.state.chunks, self.model, counts_tokens=counts_tokens)

    def _install_routing_replay(self):
        """``grpo.routing_replay``: the actor's routers take the engine's experts where batches carry them."""
        if not self.cfg.grpo.routing_replay:
            return None
        if not self.model.moe.enabled:
            raise ValueError("grpo.routing_replay needs a mixture-of-experts model (model.moe.num_experts=0)")
        from atropos_megatron.trainer.routing_replay import RoutingReplay

        parallel_cfg = self.cfg.parallel
        replay = RoutingReplay(
            self.state.chunks,
            num_experts=self.model.moe.num_experts,
            tp_rank=self.layout.tp_rank,
            tp_size=self.layout.tp,
            sequence_parallel=parallel_cfg.sequence_parallel,
            recompute_full=parallel_cfg.recompute == "full",
        )
        self._log("MoE routing replay: tokens whose batch carries the engine's experts are routed to them")
        return replay

    def _load_initial_weights(self, chunks: list[torch.nn.Module]) -> None:
        if self.model.dist_checkpoint is not None:
            from atropos_megatron.weights.dist_checkpoint import load_model

            load_model(chunks, self.model.dist_checkpoint)
        elif self.model.hf_path is not None:
            from atropos_megatron.weights.hf_checkpoint import load_hf_weights
            from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint

            load_hf_weights(
                chunks,
                SafetensorsCheckpoint(self.model.hf_path),
                self.model,
                padded_vocab=self.padded_vocab,
                tp_rank=self.layout.tp_rank,
                tp_size=self.layout.tp,
            )

    def _choose_fused_linear(self) -> str:
        """``grpo.fused_linear``, with what it means for this run's micro-batches said once in the log."""
        from atropos_megatron.kernels.fused_linear_grpo import use_fused_linear

        mode, tokens = self.cfg.grpo.fused_linear, self.cfg.data.micro_batch_tokens
        local_vocab = self.padded_vocab // self.layout.tp
        logits_mib = tokens * local_vocab * 4 / 2**20
        if mode == "never":
            how = "from the model's logits over every token"
        elif use_fused_linear(mode, tokens, local_vocab):
            how = "from hidden states, trained tokens only, in chunks (logits computed twice)"
        else:
            how = "from hidden states, trained tokens only, in one piece"
        self._log(
            f"loss and log-probs {how} (grpo.fused_linear: {mode}; a full micro-batch's fp32 logits: "
            f"{logits_mib:,.0f} MiB)"
        )
        return mode

    def _install_lora(self, chunks: list[torch.nn.Module]) -> bool:
        """Install ``model.lora``'s adapters and freeze the base; whether LoRA is on."""
        lora = self.cfg.model.lora
        if not lora.enabled:
            return False
        from atropos_megatron.trainer.lora import apply_lora, trainable_parameters

        apply_lora(chunks, lora, self.model, seed=self.cfg.seed)
        if lora.adapter:  # continue training an existing adapter
            from atropos_megatron.weights.lora_state import load_adapter_state
            from atropos_megatron.weights.peft_adapter import check_same_adapters

            found, tensors = _read_start_adapter(lora.adapter)
            check_same_adapters(found, lora, source=lora.adapter)
            load_adapter_state(chunks, tensors)
            self._log(f"LoRA adapters start from {lora.adapter}")
        trained = sum(p.numel() for _, p in trainable_parameters(chunks))
        total = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        self._log(
            f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {', '.join(lora.target_modules)}: "
            f"{trained:,} of {total:,} parameters train on this rank ({trained / total:.2%}); base frozen"
        )
        return True

    def _build_reference(self, actor: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """A frozen copy of the actor's initial weights, same layout."""
        reference = build_model(self.model, self.cfg.parallel, padded_vocab=self.padded_vocab)
        for ref_chunk, chunk in zip(reference, actor, strict=True):
            ref_chunk.load_state_dict(chunk.state_dict())
            ref_chunk.requires_grad_(False)
            ref_chunk.eval()
            if self.cfg.grpo.reference_offload and torch.cuda.is_available():
                ref_chunk.to("cpu")
        return reference

    # -- one step ------------------------------------------------------------------------------------

    def train_on(self, batch: Any) -> dict[str, float]:
        """One training step on ``batch`` (every rank passes the same batch). Collective.

        The batch is one optimizer update, or ``grpo.updates_per_batch`` updates on consecutive
        mini-batches of whole groups, each measured against the policy from before the first
        (PPO's pi_old). Returns the step's metrics on global rank 0 (loss terms over all ranks and
        updates, the last update's optimizer metrics, batch statistics) and the optimizer metrics
        alone elsewhere.
        """
        cfg = self.cfg
        rollouts, stats = build_rollouts(batch, cfg.grpo)
        minis = split_into_updates(rollouts, cfg.grpo.updates_per_batch)
        plans = [
            [
                on_model_device(mb)
                for mb in plan_micro_batches(
                    mini, data=cfg.data, grpo=cfg.grpo, dp_rank=self.layout.dp_rank, dp_size=self.layout.dp
                )
            ]
            for mini in minis
        ]
        source = self._old_logprobs_source(rollouts)
        use_inference = source == "inference"
        for plan, mini in zip(plans, minis, strict=True):  # all before the first update
            if source != "loss_pass":  # else the loss pass takes its own log-probs as pi_old
                self._attach_old_logprobs(plan, recompute=source == "recompute")
            if cfg.grpo.kl_coef > 0:
                self._attach_ref_logprobs(plan, mini)
        per_micro_batch: list[dict[str, Any]] = []
        for update, plan in enumerate(plans):
            zero_grads(self.state)
            records = grpo_loss_pass(
                self.state.chunks,
                plan,
                cfg=cfg.grpo,
                vocab_size=self.model.vocab_size,
                fused_linear=self.fused_linear,
            )
            if use_inference and update > 0:
                # rollout/* then compares the engine with this pass's policy, which has moved since
                # sampling after the first update: only the first mini-batch measures the engine.
                records = [{k: v for k, v in r.items() if not k.startswith("rollout/")} for r in records]
            per_micro_batch += records
            metrics = optimizer_step(self.state)
        loss_metrics = gather_loss_metrics(per_micro_batch)
        if self.router_stats is not None:
            metrics.update(self.router_stats.step_metrics())  # collective
        if self.routing_replay is not None:
            metrics.update(self.routing_replay.step_metrics())  # collective
        self.progress = replace(
            self.progress,
            step=self.progress.step + 1,
            consumed_sequences=self.progress.consumed_sequences + stats.sequences,
            batch_history=(*self.progress.batch_history, batch.batch_id),
        )
        if loss_metrics is None:
            return metrics
        for name in SUMMED_METRICS:  # each update's loss is a whole mini-batch's: report their mean
            if name in loss_metrics:
                loss_metrics[name] /= len(plans)
        metrics.update(loss_metrics)
        metrics.update(stats.as_metrics())
        metrics["grpo/updates"] = len(plans)
        metrics["grpo/old_logprobs_from_inference"] = float(use_inference)
        metrics["grpo/old_logprobs_recomputed"] = float(source == "recompute")
        return metrics

    def _old_logprobs_source(self, rollouts) -> str:
        """Where pi_old comes from this step (``grpo.old_logprobs``): ``inference``, ``recompute`` (a
        forward before the update) or ``loss_pass`` (its own log-probs, detached: exact on-policy)."""
        mode = self.cfg.grpo.old_logprobs
        sent = {r.inference_logprobs is not None for r in rollouts}
        if mode == "inference" and sent == {True}:
            return "inference"
        # Mixed senders would need pi_old in place of the missing inference log-probs before the pass.
        if mode == "auto" and self.on_policy_loss_pass and len(sent) == 1:
            return "loss_pass"
        return "recompute"

    def _attach_old_logprobs(self, micro_batches: list[MicroBatch], *, recompute: bool) -> None:
        if recompute:
            logprobs = token_logprobs_pass(
                self.state.chunks,
                micro_batches,
                vocab_size=self.model.vocab_size,
                kernel=self.cfg.grpo.kernel,
                fused_linear=self.fused_linear,
            )
        else:
            logprobs = [mb["inference_logprobs"] for mb in micro_batches]
        if logprobs is None:  # not the last pipeline stage: the loss is not computed here
            return
        for mb, old in zip(micro_batches, logprobs, strict=True):
            mb["old_logprobs"] = old
            if "inference_logprobs" in mb:
                # Sequences sent without inference log-probs count as matching (importance weight 1).
                has = mb["has_inference_logprobs"]
                mb["inference_logprobs"] = torch.where(has, mb["inference_logprobs"], old)

    def _attach_ref_logprobs(self, micro_batches: list[MicroBatch], rollouts) -> None:
        from_env = self.cfg.grpo.env_ref_logprobs
        if from_env and all(r.ref_logprobs is not None for r in rollouts):
            computed = [mb["env_ref_logprobs"] for mb in micro_batches]
        else:
            computed = self._reference_pass(micro_batches)
        if computed is None:
            return
        for mb, ref in zip(micro_batches, computed, strict=True):
            if from_env and "env_ref_logprobs" in mb:
                ref = torch.where(mb["has_env_ref_logprobs"], mb["env_ref_logprobs"], ref)
            mb["ref_logprobs"] = ref

    def _reference_pass(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor] | None:
        if self.lora:
            from atropos_megatron.trainer.lora import adapters_disabled

            with adapters_disabled(self.state.chunks):  # the frozen base is the reference model
                return token_logprobs_pass(
                    self.state.chunks,
                    micro_batches,
                    vocab_size=self.model.vocab_size,
                    kernel=self.cfg.grpo.kernel,
                    fused_linear=self.fused_linear,
                )
        offload = self.cfg.grpo.reference_offload and torch.cuda.is_available()
        if offload:
            for chunk in self.reference:
                chunk.to(torch.cuda.current_device())
        try:
            return token_logprobs_pass(
                self.reference,
                micro_batches,
                vocab_size=self.model.vocab_size,
                kernel=self.cfg.grpo.kernel,
                fused_linear=self.fused_linear,
            )
        finally:
            if offload:
                for chunk in self.reference:
                    chunk.to("cpu")

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (collective)."""
        started = time.monotonic()
        path = checkpoint.save(
            self.checkpoint_dir,
            self.progress,
            chunks=self.state.chunks,
            optimizer=self.state.optimizer,
            scheduler=self.state.scheduler,
            model=self.model,
            padded_vocab=self.padded_vocab,
            keep_last=self.cfg.checkpoint.keep_last,
            hf_files=self._hf_side_files(),
            lora_base=self.lora_base,
        )
        self._log(f"checkpoint {path} written in {time.monotonic() - started:.1f} s")
        if self.bridge is not None:
            try:  # the bridge may now delete the batches this checkpoint holds
                self.bridge.commit_checkpoint(self.progress.step, checkpoint_path=str(path))
            except Exception as exc:  # noqa: BLE001 - the next registration reports the checkpoint again
                logger.warning("could not report checkpoint %s to the bridge: %s", path, exc)
        return path

    def _hf_side_files(self) -> list[Path]:
        """HF config + tokenizer to keep in each checkpoint (from the HF model or the seed checkpoint)."""
        from atropos_megatron.weights.dist_checkpoint import HF_CONFIG_DIR
        from atropos_megatron.weights.hf_checkpoint import side_files

        if self.model.hf_path:
            return side_files(self.model.hf_path)
        if self.model.dist_checkpoint and (Path(self.model.dist_checkpoint) / HF_CONFIG_DIR).is_dir():
            return side_files(Path(self.model.dist_checkpoint) / HF_CONFIG_DIR)
        return []

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train until ``cfg.steps`` or a stop signal; returns the process exit status."""
        from atropos_megatron.trainer.run_output import RunOutput
        from atropos_megatron.weights.transfer import WeightPusher

        cfg = self.cfg
        rank0 = self.layout.rank == 0
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        output = RunOutput(cfg, start_step=self.progress.step) if rank0 else None
        pusher = None
        if cfg.weights.inference_servers or cfg.weights.bridge_agents:
            pusher = WeightPusher(cfg.weights, self.model, self.bridge if rank0 else None)
        last_saved = self.progress.step if cfg.checkpoint.load else -1
        try:
            if rank0:
                save_config(cfg, Path(cfg.logging.run_dir) / "config.yaml")
                self._register()
            if pusher is not None:
                # The servers start from the HF weights; after a resume (or a dtype cast) they must serve ours.
                self._push(pusher, output)
            while self.progress.step < cfg.steps and not self._stop_agreed():
                started = time.monotonic()
                batch = self._receive_batch(pushing=pusher is not None)
                if batch is None:
                    break
                if batch == CATCH_UP:
                    self._log(
                        f"an inference server is behind and no batch comes: pushing step {self.progress.step} again"
                    )
                    self._push(pusher, output)
                    continue
                waited = time.monotonic()
                metrics = self.train_on(batch)
                computed = time.monotonic()
                self._push(pusher, output)
                synced = time.monotonic()
                if rank0:
                    self._ack(batch.batch_id)
                    metrics.update(_timings(batch, metrics, started, waited, computed, synced))
                    output.log_step(self.progress.step, metrics)
                interval = cfg.checkpoint.save_interval_steps
                if interval and self.progress.step % interval == 0:
                    self.save_checkpoint()
                    last_saved = self.progress.step
            if last_saved != self.progress.step:
                self.save_checkpoint()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if pusher is not None:
                pusher.close()
            if output is not None:
                output.close()
        if self._stop_signal is not None:
            self._log(
                f"stopped by signal {self._stop_signal} at step {self.progress.step}; checkpoint written"
            )
            return EXIT_PREEMPTED
        self._log(f"done: {self.progress.step} steps")
        return 0

    def _register(self) -> None:
        cfg = self.cfg
        response = self.bridge.register_run(
            run_name=Path(cfg.logging.run_dir).name,
            batch_size=cfg.data.batch_size,
            max_token_len=cfg.data.max_token_len,
            starting_step=self.progress.step,
            num_steps=cfg.steps,
            checkpoint_dir=str(self.checkpoint_dir),
            save_checkpoint_interval=cfg.checkpoint.save_interval_steps,
            vocab_size=self.model.vocab_size,
            committed_step=self.progress.step,  # the model is the checkpoint's (or fresh: 0)
            # Routing replay: the bridge shapes the engine's routings as [tokens, layers, top-k].
            num_hidden_layers=self.model.num_layers if self.routing_replay else 0,
            num_experts_per_tok=self.model.moe.router_topk if self.routing_replay else 0,
        )
        if response.replayed_batches:
            logger.info(
                "the bridge serves %d batches again first: trained after step %d but not in a checkpoint, "
                "or handed out and never acknowledged",
                response.replayed_batches,
                self.progress.step,
            )

    def _receive_batch(self, *, pushing: bool) -> Any | None:
        """Rank 0 polls the bridge until a batch comes (or a stop signal); every rank gets it.

        Returns the batch, None to stop, or ``CATCH_UP`` when, with no batch in sight, an inference
        server is paused waiting for this trainer's weights (it was restarted): with one server no
        batch would come before it has them, so the caller pushes them first (``pushing``: there are
        servers to push to). Waiting is never silent: every ``data.wait_report_s`` without a batch,
        one line says for how long and why (the bridge's named stalls), and one more when batches
        come again.
        """
        message: list[Any] = [None]
        if self.layout.rank == 0:
            report_s = self.cfg.data.wait_report_s
            since = time.monotonic()
            next_report = since + report_s if report_s > 0 else float("inf")
            reported = False
            while self._stop_signal is None:
                try:
                    batch = self.bridge.next_batch(
                        wait_s=self.cfg.data.batch_wait_s, redeliver_unacked=self._redeliver
                    )
                except Exception:
                    if self._stop_signal is None:
                        raise
                    break  # Slurm stops the whole job at once: the bridge may be gone already
                if batch is None:
                    now = time.monotonic()
                    report = now >= next_report
                    status = self._bridge_status() if pushing or report else None  # one call for both
                    if pushing and status is not None and status.servers_behind:
                        message[0] = CATCH_UP
                        break
                    if report:
                        logger.warning(_waiting_line(now - since, status))
                        reported = True
                        next_report = now + report_s
                    continue
                if reported:
                    logger.info(
                        "a batch came after %.0f s of waiting; training goes on", time.monotonic() - since
                    )
                    reported = False
                self._redeliver = False
                if batch.batch_id in self.progress.batch_history:
                    logger.warning(
                        "batch %s is already in this model (its acknowledgement was lost); acknowledging "
                        "it instead of training it again",
                        batch.batch_id,
                    )
                    self._ack(batch.batch_id)
                    continue
                message[0] = _to_payload(batch)
                break
        dist.broadcast_object_list(message, src=0)
        return message[0]

    def _bridge_status(self) -> Any | None:
        """The bridge's status (servers behind, named stalls), or None when it cannot be read now."""
        try:
            return self.bridge.status()
        except Exception as exc:  # noqa: BLE001 - a status that fails now is asked again next poll
            logger.warning("could not read the bridge's status: %s", exc)
            return None

    def _ack(self, batch_id: str) -> None:
        try:
            self.bridge.ack(batch_id, trained_step=self.progress.step)
        except Exception as exc:
            if self._stop_signal is None:
                raise
            # The checkpoint written next records the batch as trained (progress.batch_history): the
            # bridge redelivers it after the restart and the resumed run acknowledges it unseen.
            logger.warning("could not acknowledge batch %s while stopping: %s", batch_id, exc)

    def _push(self, pusher, output) -> None:
        if pusher is None:
            return
        version = str(self.progress.step)
        try:
            response = pusher.push(self.state.chunks, weight_version=version)
        except Exception as exc:  # noqa: BLE001 - the next push carries the full weights again
            logger.error("weight push %s failed: %s (training goes on; the next push retries)", version, exc)
            if output is not None:
                output.count("weights/push_failures")
            return
        self.progress = replace(self.progress, weight_version=version)
        if (
            output is not None and response is not None
        ):  # expected with retract / in_place: counted, not logged
            skipped = sum(server.cache_flushes_skipped for server in response.servers)
            output.set_total("weights/cache_flushes_skipped", skipped)

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if os.getpid() != self._pid:
            # A forked helper, signalled with the whole process group (Slurm, supervisors): Megatron
            # forks one writer per checkpoint save and waits until each has reported, so a writer that
            # died here would hang the save that this very signal asks for. The trainer decides.
            return
        if self._stop_signal is None:
            logger.warning("signal %d: finishing this step, writing a checkpoint, then stopping", signum)
        self._stop_signal = signum
        if self.bridge is not None:
            self.bridge.stop_waiting()  # under Slurm the bridge stops with us: do not wait for it

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (collective, so that every rank leaves the loop together)."""
        flag = torch.tensor([0 if self._stop_signal is None else self._stop_signal], dtype=torch.int64)
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and self._stop_signal is None:
            self._stop_signal = int(flag)
        return bool(int(flag))

    def _log(self, message: str) -> None:
        if self.layout.rank == 0:
            logger.info(message)


def _read_start_adapter(path: str):
    """``model.lora.adapter``'s LoRA config and PEFT-named tensors: a PEFT directory, or an
    adapter-only checkpoint (``convert hf-to-mcore --adapter``, or a LoRA run's checkpoint)."""
    from atropos_megatron.weights.peft_adapter import ADAPTER_CONFIG, read_peft_adapter

    if (Path(path) / ADAPTER_CONFIG).is_file():
        adapter = read_peft_adapter(path)
        return adapter.lora, adapter.tensors
    from atropos_megatron.weights.lora_checkpoint import read_adapter_checkpoint

    checkpoint = read_adapter_checkpoint(path)  # every rank reads the whole adapters: megabytes
    return checkpoint.info.lora, checkpoint.tensors


def _waiting_line(waited_s: float, status: Any | None) -> str:
    """One line for a person: how long rank 0 has waited for a batch, and what it waits on."""
    head = f"no batch for {waited_s:.0f} s"
    if status is None:
        return f"{head}: the bridge's status could not be read"
    named = list(getattr(status, "stalls", ()))
    if not named:
        return f"{head}: the bridge names no stall yet (see `atropos-megatron status`)"
    return f"{head}: " + "; ".join(f"{stall.code}: {stall.message}" for stall in named)


def _to_payload(batch: Any) -> types.SimpleNamespace:
    """The batch as plain data, so that other ranks unpickle no bridge class (nor import grpc)."""
    groups = tuple(
        types.SimpleNamespace(**{f.name: getattr(g, f.name) for f in fields(g)}) for g in batch.groups
    )
    return types.SimpleNamespace(**{name: getattr(batch, name) for name in _BATCH_FIELDS}, groups=groups)


def _timings(batch, metrics, started, waited, computed, synced) -> dict[str, float]:
    tokens = metrics.get("batch/tokens", 0)
    return {
        "time/wait_s": waited - started,
        "time/compute_s": computed - waited,
        "time/sync_s": synced - computed,
        "time/step_s": synced - started,
        "perf/tokens_per_s": tokens / max(computed - waited, 1e-9),
        "bridge/batch_latency_s": max(0.0, time.time() - batch.fetched_unix_s),
        "memory/peak_gib": _peak_memory_gib(),
    }


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    from atropos_megatron.weights.convert import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def train(cfg: TrainConfig) -> int:
    """``atropos-megatron train``: this rank's whole run, from joining the job to leaving it."""
    bridge = None
    if parallel.detect_dist_env().rank == 0:
        # The CLI's entry point may know the bridge; the loop above only sees the client object.
        from atropos_megatron.bridge.client import BridgeClient

        bridge = BridgeClient(
            cfg.bridge.address,
            token=cfg.bridge.auth_token,
            tls_ca=cfg.bridge.tls_ca,
            timeout_s=cfg.bridge.request_timeout_s,
            reconnect_s=cfg.bridge.reconnect_s,
            max_message_bytes=cfg.bridge.max_message_bytes,
        )
    trainer = Trainer(cfg, bridge=bridge)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        if bridge is not None:
            bridge.close()
        parallel.shutdown()
