"""Per-step routing metrics of MoE models: how evenly the routers spread the training pass's tokens.

A forward hook on each router counts, during training passes only (the old and reference log-prob
passes run in eval mode and route the same tokens again), the tokens each expert receives, the
router's mean softmax probability per expert, and the squared log-sum-exp of its logits. Once per
step the counts of every rank are summed (ranks that see the same tokens, i.e. TP ranks without
sequence parallelism, count once) and become:

- ``moe/aux_loss``: Switch Transformer's load-balancing loss ``E * sum_e f_e * P_e`` over the step's
  tokens (f_e: share of routed assignments, P_e: mean router probability), mean over MoE layers;
  1 when routing is uniform, up to E when one expert takes everything. Reported whatever
  ``grpo.moe_aux_loss_coef`` is (which weights the same loss per micro-batch in the gradient).
- ``moe/z_loss``: ST-MoE's router z-loss, the mean squared log-sum-exp of the router logits.
- ``moe/load_max_over_mean``: the busiest expert's tokens over the mean, worst MoE layer (1 = even).
- ``moe/expert_share/<e>``: expert e's share of its layer's assignments, mean over MoE layers.

Padding positions of a micro-batch are routed like tokens and counted too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from atropos_megatron.config import ModelConfig
from atropos_megatron.weights.export import unwrap_chunk
from atropos_megatron.weights.megatron_shards import iter_routers


class RouterStats:
    """Counts routing decisions of this rank's MoE layers between two :meth:`step_metrics` calls."""

    def __init__(self, chunks: Sequence[torch.nn.Module], model: ModelConfig, *, counts_tokens: bool) -> None:
        """
        Args:
            chunks: this rank's model chunks (unwrapped or wrapped by DDP).
            counts_tokens: whether this rank's routers see tokens no other counted rank sees (False on
                TP ranks > 0 without sequence parallelism: they route the same tokens as TP rank 0).
        """
        self.num_experts = model.moe.num_experts
        self.topk = model.moe.router_topk
        self.rows = {layer: row for row, layer in enumerate(model.moe_layers)}
        # Per MoE layer: tokens routed to each expert, summed router probabilities, tokens, sum of lse^2
        # (allocated on the routers' device at the first count).
        self.sums: torch.Tensor | None = None
        self.handles = []
        if not counts_tokens:
            return
        for chunk in chunks:
            for layer, router in iter_routers(unwrap_chunk(chunk)):
                self.handles.append(router.register_forward_hook(self._hook(self.rows[layer])))

    def _hook(self, row: int):
        def count(module, inputs, outputs) -> None:
            if not module.training:
                return
            with torch.no_grad():
                _, routing_map = outputs
                hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
                logits = torch.nn.functional.linear(hidden.float(), module.weight.float())
                # Sums stay on the router's device until step_metrics: no host sync per layer.
                sums = torch.cat(
                    [
                        routing_map.reshape(-1, self.num_experts).sum(0).float(),
                        torch.softmax(logits, dim=-1).sum(0),
                        torch.stack(
                            [logits.new_tensor(logits.shape[0]), torch.logsumexp(logits, -1).pow(2).sum()]
                        ),
                    ]
                ).double()
                if self.sums is None:
                    self.sums = torch.zeros(
                        len(self.rows), sums.numel(), dtype=torch.float64, device=sums.device
                    )
                self.sums[row] += sums

        return count

    def step_metrics(self) -> dict[str, float]:
        """The metrics above for the counts since the last call, then reset. Collective over the world."""
        width = 2 * self.num_experts + 2
        totals = (
            torch.zeros(len(self.rows), width, dtype=torch.float64)
            if self.sums is None
            else self.sums.clone()
        )
        if self.sums is not None:
            self.sums.zero_()
        if totals.device.type == "cpu" and dist.get_backend() == "nccl":
            totals = totals.cuda()  # a rank that counted nothing yet still joins the NCCL reduction
        dist.all_reduce(totals)
        counts, prob_sums, tokens = totals.cpu().split([self.num_experts, self.num_experts, 2], dim=1)
        seen = tokens[:, 0] > 0
        if not bool(seen.any()):
            return {}
        counts, prob_sums, tokens = counts[seen], prob_sums[seen], tokens[seen]
        token_share = counts / (tokens[:, :1] * self.topk)  # f_e
        mean_prob = prob_sums / tokens[:, :1]  # P_e
        shares = counts / counts.sum(dim=1, keepdim=True)
        metrics = {
            "moe/aux_loss": float((self.num_experts * (token_share * mean_prob).sum(dim=1)).mean()),
            "moe/z_loss": float((tokens[:, 1] / tokens[:, 0]).mean()),
            "moe/load_max_over_mean": float((counts.max(dim=1).values / counts.mean(dim=1)).max()),
        }
        for expert, share in enumerate(shares.mean(dim=0).tolist()):
            metrics[f"moe/expert_share/{expert}"] = share
        return metrics

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
