"""Per-row prefix injection inside attention: each row's virtual-token keys/values are prepended per layer.

The model calls ``prefix_attention`` for every layer (registered under ``ATTENTION_NAME``); the engine passes
one of two contexts as a keyword argument, which transformers forwards down to attention:

- ``ptserve_prefix`` (``PrefixContext``): the rows' prefixes are concatenated in front of this call's keys and
  values (encoders, decoder prefill and training). With ``cache`` set, the call's keys/values are also written
  into the rows' slots of a ``SlotKVCache`` so decoding can continue from them.
- ``ptserve_cache`` (``CacheContext``): decode steps. The new token's key/value are written into the rows' slots
  and attention reads a window of the slot buffer that already holds each row's prefix and earlier tokens.

Prefix K/V are used as given (no RoPE, no dropout: DESIGN decision 1). The context's mask says which prefix slots
and which tokens each row may see, so rows never see each other's prefix or tokens.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ptserve.server.hf_compat import register_attention

if TYPE_CHECKING:
    from ptserve.server.generation.kv_cache import SlotKVCache

ATTENTION_NAME = "ptserve_prefix"


@dataclass
class PrefixContext:
    keys: torch.Tensor  # [layers, B, kv_heads, P_max, head_dim]; rows' prefixes left-padded to P_max
    values: torch.Tensor  # [layers, B, kv_heads, P_max, head_dim]
    mask: torch.Tensor  # [B, 1, T_q | 1, P_max + T_k] bool, True = may attend
    cache: "SlotKVCache | None" = None  # decoder prefill: also store this call's K/V ...
    slots: slice | None = None  # ... in these cache slots (one per row), token columns [0, T_k)
    # Attention's own dtype, when not the query's (the output comes back in the query's): the trainer's bf16
    # autocast on CPUs whose bf16 attention is slower than float32's (``training.attention_dtype``).
    compute_dtype: torch.dtype | None = None


@dataclass
class CacheContext:
    cache: "SlotKVCache"
    slots: slice  # the B rows' slots, contiguous
    write_pos: torch.Tensor  # [B, T_q] token columns (0-based, after the prefix area) to write new K/V at
    window: slice  # buffer columns attention reads: [prefix_cap - P_max, prefix_cap + T_max)
    mask: torch.Tensor  # [B, 1, T_q, window length] bool


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, T_q, head_dim]
    key: torch.Tensor,  # [B, kv_heads, T_k, head_dim]
    value: torch.Tensor,  # [B, kv_heads, T_k, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ptserve_prefix: PrefixContext | None = None,
    ptserve_cache: CacheContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    mask, is_causal, layer = attention_mask, False, getattr(module, "layer_idx", 0)
    compute_dtype = None
    if ptserve_cache is not None:
        c = ptserve_cache
        c.cache.write(layer, c.slots, c.write_pos, key, value)
        key, value = c.cache.read(layer, c.slots, c.window)
        mask = c.mask
    elif ptserve_prefix is not None:
        p = ptserve_prefix
        if p.cache is not None:
            p.cache.write_prompt(layer, p.slots, key, value)
        key = torch.cat([p.keys[layer], key], dim=2)
        value = torch.cat([p.values[layer], value], dim=2)
        mask, compute_dtype = p.mask, p.compute_dtype
    elif mask is None:
        is_causal = bool(getattr(module, "is_causal", False)) and query.shape[2] > 1
    out_dtype = query.dtype
    recast = compute_dtype is not None and compute_dtype != out_dtype
    if recast:  # autocast off inside, or it would cast the inputs straight back to its own dtype
        query, key, value = query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype)
    with torch.autocast(query.device.type, enabled=False) if recast else nullcontext():
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling,
            dropout_p=dropout if module.training else 0.0, enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.to(out_dtype).transpose(1, 2).contiguous(), None  # [B, T_q, heads, head_dim]


register_attention(ATTENTION_NAME, prefix_attention)
