"""Rollout routing replay: MoE layers send each token to the experts the inference engine chose.

The engine and the trainer compute router logits in different kernels and precisions, so near-ties
between experts can be broken differently: the trainer then scores a token with experts that did not
produce it, and the PPO ratio measures that mismatch rather than the policy change. With
``grpo.routing_replay`` the trainer takes the engine's top-k expert ids (SGLang's
``return_routed_experts``, captured by the bridge: ``weights.capture_routed_experts``) for every token
that has them, and keeps its own router's choice for tokens that do not. The routing *weights* are
still the trainer's own: its router's scores of the chosen experts (so the router keeps its gradient),
normalised as the model's routing prescribes.

Megatron's router asks ``router.router_replay.get_replay_topk(...)`` for its top-k when that attribute
is set; :class:`RouterTargets` is that object, one per MoE layer of the actor. Its targets come from
each micro-batch's ``routed_experts`` (``[b, s, num_layers, k]``, -1 where unknown, -2 on padding), laid out in the
router's token order: position-major ``[s, b]``, and under sequence parallelism only this TP rank's
slice of the positions. With full activation recomputation the backward pass routes each micro-batch
again; the targets of every forward are queued for it in order (Megatron's schedules run backward in
forward order per model chunk).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from atropos_megatron.weights.export import unwrap_chunk
from atropos_megatron.weights.megatron_shards import iter_routers

PADDING = -2
"""``routed_experts`` of a position that holds no token (-1: a token whose routing is unknown)."""


class RouterTargets:
    """One router's replay targets: the current micro-batch's, and those its recompute will need."""

    def __init__(self, router: torch.nn.Module, layer: int, owner: RoutingReplay) -> None:
        self.router = router
        self.layer = layer
        self.owner = owner
        self.current: torch.Tensor | None = None
        self.for_backward: deque[torch.Tensor | None] = deque()

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        """Megatron's hook: ``(probs, indices)`` of the top-k, replaced by the targets where known."""
        own_probs, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.owner.in_forward:
            target = self.current
        else:  # a recompute in backward
            target = self.for_backward.popleft() if self.for_backward else None
        if target is None:
            return own_probs, own
        target = target.to(own.device)
        if target.shape != own.shape:
            raise ValueError(
                f"routed_experts for layer {self.layer} has {tuple(target.shape)} rows x k where the router "
                f"routes {tuple(own.shape)}: the batch's routings do not match its tokens"
            )
        known = (target >= 0).all(dim=-1, keepdim=True)
        indices = torch.where(known, target, own)
        if self.router.training and self.owner.in_forward:
            self.owner.count(known, target, own)
        return scores.gather(1, indices), indices


class RoutingReplay:
    """Replay targets for every MoE router of this rank's actor chunks (see the module docstring)."""

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        *,
        num_experts: int,
        tp_rank: int,
        tp_size: int,
        sequence_parallel: bool,
        recompute_full: bool,
    ) -> None:
        self.num_experts = num_experts
        self.tp_rank, self.tp_size, self.sequence_parallel = tp_rank, tp_size, sequence_parallel
        self.recompute_full = recompute_full
        self.in_forward = False
        self.targets: list[RouterTargets] = []
        # [routed tokens, replayed tokens, replayed tokens whose engine experts equal the trainer's own],
        # on the routers' device until step_metrics (no host sync per layer)
        self.counts: torch.Tensor | None = None
        for chunk in chunks:
            module = unwrap_chunk(chunk)
            for layer, router in iter_routers(module):
                router.router_replay = RouterTargets(router, layer, self)
                self.targets.append(router.router_replay)
            module.routing_replay = self  # found by step.forward_step

    def begin_forward(self, routed: torch.Tensor | None, *, for_backward: bool) -> None:
        """Targets for the micro-batch about to run forward (``routed``: ``[b, s, layers, k]`` or None)."""
        self.in_forward = True
        if routed is not None and int(routed.max()) >= self.num_experts:
            raise ValueError(
                f"routed_experts names expert {int(routed.max())}, but the model has {self.num_experts}"
            )
        for target in self.targets:
            rows = None if routed is None else self._router_rows(routed[:, :, target.layer])
            target.current = rows
            if for_backward and self.recompute_full:
                target.for_backward.append(rows)

    def end_forward(self) -> None:
        self.in_forward = False
        for target in self.targets:
            target.current = None

    def reset(self) -> None:
        """Drop queued targets (a pass that ended early, or one without backward)."""
        for target in self.targets:
            target.for_backward.clear()

    def _router_rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[b, s, k]`` -> the router's ``[s_local * b, k]``: position-major, this rank's SP slice."""
        rows = per_token.transpose(0, 1)  # [s, b, k]
        if self.sequence_parallel and self.tp_size > 1:
            rows = rows.chunk(self.tp_size, dim=0)[self.tp_rank]
        return rows.reshape(-1, rows.shape[-1]).long()

    def count(self, known: torch.Tensor, target: torch.Tensor, own: torch.Tensor) -> None:
        same = (target.sort(dim=-1).values == own.sort(dim=-1).values).all(dim=-1, keepdim=True)
        tokens = (target > PADDING).all(dim=-1)  # padding positions are no tokens
        counts = torch.stack([tokens.sum(), known.sum(), (same & known).sum()]).double()
        self.counts = counts if self.counts is None else self.counts + counts

    def step_metrics(self) -> dict[str, float]:
        """``moe/replayed_token_share`` (of the loss pass's tokens, padding excluded) and
        ``moe/replay_same_experts`` (of those, the ones whose engine experts equal the router's own
        choice) since the last call. Collective."""
        counts = torch.zeros(3, dtype=torch.float64) if self.counts is None else self.counts
        self.counts = None
        if counts.device.type == "cpu" and dist.get_backend() == "nccl":
            counts = counts.cuda()  # a rank that replayed nothing still joins the NCCL reduction
        dist.all_reduce(counts)
        routed, replayed, same = counts.tolist()
        if routed == 0:
            return {}
        metrics = {"moe/replayed_token_share": replayed / routed}
        if replayed:
            metrics["moe/replay_same_experts"] = same / replayed
        return metrics
