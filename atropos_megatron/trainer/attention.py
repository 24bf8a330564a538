"""Core attention for Megatron's local layer spec: PyTorch SDPA, per packed sequence or per padded row.

Megatron's own ``DotProductAttention`` (the local spec's) materialises ``[b, heads, s, s]`` scores,
takes no packed sequences (``PackedSeqParams``: it asserts they are None) and so needed a
block-diagonal mask to pack, whose cost grows with the row length squared. This module is what the
trainer's local spec uses instead (``trainer.model.build_layer_spec``):

- **THD** (packed micro-batches, ``qkv_format="thd"``): ``query`` ``[t, heads, d]`` holds the
  sequences back to back; each segment of ``cu_seqlens`` gets its own causal SDPA call, so no token
  sees another sequence and no ``[t, t]`` mask exists. Transformer Engine's attention consumes the
  same ``PackedSeqParams`` on GPUs, so both specs share one batching path.
- **padded** rows ``[s, b, heads, d]`` (``data.packing: false``, weight checks): one causal SDPA call
  (or the given boolean mask, True = masked, Megatron's convention).

Grouped-query attention uses SDPA's ``enable_gqa`` (no repeated keys). The scale is Megatron's
(``softmax_scale``, default ``1/sqrt(d)``). Features of ``DotProductAttention`` that SDPA cannot
express here (attention dropout, sliding windows, softmax offsets, attention bias) are refused
when the layer is built, naming the setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.utils import is_layer_window_attention


class SDPAttention(DotProductAttention):
    """``DotProductAttention``'s interface and partitioning, with the scores computed by SDPA."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):  # fmt: skip
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)  # fmt: skip
        unsupported = {
            "attention_dropout": self.attention_dropout.p != 0,
            "window_size": is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number
            ),
            "softmax_type": config.softmax_type != "vanilla",
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise ValueError(f"the SDPA core attention does not support {', '.join(refused)}")
        self.gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,  # noqa: ARG002 - causal unless a mask is given, as in Megatron's
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("the SDPA core attention takes no attention_bias")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(
                    f"packed sequences must be in THD format, got {packed_seq_params.qkv_format!r}"
                )
            return self._packed(query, key, value, packed_seq_params)
        return self._rows(query, key, value, attention_mask)

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        """``[t, heads, d]`` -> ``[t, heads * d]``, each sequence of ``cu_seqlens`` on its own."""
        bounds = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        kv_bounds = (
            params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        )
        if kv_bounds is not bounds and not torch.equal(bounds, kv_bounds):
            raise ValueError("the SDPA core attention needs the same cu_seqlens for queries and keys")
        edges = bounds.tolist()
        if edges[0] != 0 or edges[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {edges} do not cover the {query.shape[0]} packed tokens")
        lengths = [stop - start for start, stop in zip(edges[:-1], edges[1:], strict=True)]
        out = attend_per_sequence(query, key, value, lengths, scale=self.softmax_scale, gqa=self.gqa)
        return out.reshape(query.shape[0], self.hidden_size_per_partition)

    def _rows(self, query, key, value, attention_mask) -> torch.Tensor:
        """``[s, b, heads, d]`` -> ``[s, b, heads * d]``, every row causal (or under the mask)."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask.bool()
        out = F.scaled_dot_product_attention(  # [b, heads, s, d]: causal, or under the mask
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale, enable_gqa=self.gqa
        )
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)


def attend_per_sequence(query, key, value, lengths: list[int], *, scale: float | None, gqa: bool):
    """Causal SDPA over each sequence of a packed ``[t, heads, d]`` row (``lengths`` sum to ``t``) on
    its own; ``[t, heads, d]`` out. Inputs are cut by ``split``, not slicing: its backward is one
    concatenation, not a zero-filled ``[t, ...]`` gradient per sequence."""
    outputs = []
    for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths), strict=True):
        if q.shape[0]:  # [len, heads, d] -> [1, heads, len, d] and back
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def use_sdpa_core_attention(spec):
    """``spec`` (a layer spec, or a block spec's layers) with ``SDPAttention`` as core attention."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    for layer in layers:
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
