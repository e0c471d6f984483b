"""The decoder's KV cache: per layer, one buffer of slots; row r of the running batch owns slot r.

Buffer layout per layer: [slots, kv_heads, prefix_cap + max_tokens, head_dim]. A row's prefix is copied once, at
admission, right-aligned into the prefix area [prefix_cap - P, prefix_cap); its tokens follow from column
prefix_cap. Attention reads a window of the buffer for the running rows (a view, no copy), so the prefix is
shared by every step of the request instead of being copied per step. Running rows stay packed in slots
[0, B): when a row leaves, the last row moves into its slot (one copy per departure, not per step).

Invariant: outside its occupant's own columns (its prefix area and the token columns it wrote), every slot holds
zeros, and a free slot is all zeros. Attention reads a window as wide as the widest running row, so a row's
masked columns are still read, and a stale non-finite value there would poison it (NaN * 0 = NaN; +inf key
score + masked -inf = NaN). So a departing occupant's columns are zeroed: what one sequence leaves behind
(another tenant's, possibly overflowed, K/V) never reaches the next.
"""
from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self, layers: int, slots: int, kv_heads: int, head_dim: int, prefix_cap: int, max_tokens: int,
        device: torch.device, dtype: torch.dtype,
    ):
        self.slots, self.prefix_cap, self.max_tokens = slots, prefix_cap, max_tokens
        shape = (slots, kv_heads, prefix_cap + max_tokens, head_dim)
        # zeros, not empty: masked columns must hold finite values (NaN * 0 would poison the softmax)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def write_prefix(self, slot: int, kv: torch.Tensor) -> None:
        """kv: [layers, 2, kv_heads, P, head_dim] (a resident adapter's prefix)."""
        p, cap = kv.shape[3], self.prefix_cap
        for layer in range(len(self.k)):
            self.k[layer][slot, :, cap - p: cap] = kv[layer, 0]
            self.v[layer][slot, :, cap - p: cap] = kv[layer, 1]

    def write_prompt(self, layer: int, slots: slice, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value: [B, kv_heads, T, head_dim] for token columns [0, T) of rows ``slots``."""
        t, cap = key.shape[2], self.prefix_cap
        self.k[layer][slots, :, cap: cap + t] = key
        self.v[layer][slots, :, cap: cap + t] = value

    def write(self, layer: int, slots: slice, pos: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value: [B, kv_heads, T_q, head_dim] written at token columns ``pos`` [B, T_q] of each row."""
        rows = torch.arange(key.shape[0], device=key.device)[:, None]
        cols = pos + self.prefix_cap
        self.k[layer][slots][rows, :, cols] = key.transpose(1, 2)  # index result: [B, T_q, kv_heads, head_dim]
        self.v[layer][slots][rows, :, cols] = value.transpose(1, 2)

    def read(self, layer: int, slots: slice, window: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, kv_heads, window, head_dim] of rows ``slots``."""
        return self.k[layer][slots, :, window], self.v[layer][slots, :, window]

    def clear(self, slot: int, prefix_len: int, tokens: int) -> None:
        """Zero an occupant's columns: its prefix area [cap - prefix_len, cap) and token columns [0, tokens)."""
        cols = slice(self.prefix_cap - prefix_len, self.prefix_cap + tokens)
        for layer in range(len(self.k)):
            self.k[layer][slot, :, cols] = 0
            self.v[layer][slot, :, cols] = 0

    def clear_all(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()

    def move(self, src: int, dst: int, prefix_len: int, tokens: int) -> None:
        """Move the occupant of ``src`` (its prefix of ``prefix_len`` and ``tokens`` token columns) into ``dst``,
        which must have been cleared; ``src`` is left all zeros."""
        cols = slice(self.prefix_cap - prefix_len, self.prefix_cap + tokens)
        for layer in range(len(self.k)):
            self.k[layer][dst, :, cols] = self.k[layer][src, :, cols]
            self.v[layer][dst, :, cols] = self.v[layer][src, :, cols]
        self.clear(src, prefix_len, tokens)
