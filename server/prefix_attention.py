"""Per-row prefix injection inside attention: each row's virtual-token keys/values are prepended per layer.

The model calls ``prefix_attention`` for every layer (registered under ``ATTENTION_NAME``); the forward pass
passes a ``PrefixContext`` as the ``ptserve_prefix`` keyword, which transformers forwards down to attention.
Prefix K/V are used as given (no RoPE, no dropout: DESIGN decision 1); the context's mask says which prefix slots
and which tokens each row may see, so rows never see each other's prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.hf_compat import register_attention

ATTENTION_NAME = "ptserve_prefix"


@dataclass
class PrefixContext:
    keys: torch.Tensor  # [layers, B, kv_heads, P_max, head_dim]; rows' prefixes left-padded to P_max
    values: torch.Tensor  # [layers, B, kv_heads, P_max, head_dim]
    mask: torch.Tensor  # [B, 1, T_q | 1, P_max + T_k] bool, True = may attend


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, T_q, head_dim]
    key: torch.Tensor,  # [B, kv_heads, T_k, head_dim]
    value: torch.Tensor,  # [B, kv_heads, T_k, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ptserve_prefix: PrefixContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    mask = attention_mask
    is_causal = False
    if ptserve_prefix is not None:
        layer = module.layer_idx
        key = torch.cat([ptserve_prefix.keys[layer], key], dim=2)
        value = torch.cat([ptserve_prefix.values[layer], value], dim=2)
        mask = ptserve_prefix.mask
    elif mask is None:
        is_causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None  # [B, T_q, heads, head_dim]


register_attention(ATTENTION_NAME, prefix_attention)
