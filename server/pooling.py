"""The output of embedding rows: the mean of the last hidden state over the row's real tokens, L2-normalised.

This is what all-MiniLM-L6-v2 is trained for (sentence-transformers' mean ``Pooling`` + ``Normalize``): every
real token counts, [CLS] and [SEP] included; padding columns are left out, and prefix slots never appear in the
hidden state (a prefix lives only in the keys and values). The trainer pools with this same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_states(
    hidden: torch.Tensor,  # [B, T_max, H]; row b's real tokens are columns [0, lengths[b])
    lengths: list[int],  # real tokens per row (>= 1)
) -> torch.Tensor:
    """The mean of each row's real-token states [B, H] float32 (what a ``mean_linear`` head reads). Differentiable."""
    n = torch.tensor(lengths, device=hidden.device)
    real = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < n[:, None]).to(torch.float32)  # [B, T]
    summed = (hidden.float() * real[:, :, None]).sum(dim=1)  # [B, H]
    return summed / n[:, None].to(torch.float32)


def mean_pool(
    hidden: torch.Tensor,  # [B, T_max, H]; row b's real tokens are columns [0, lengths[b])
    lengths: list[int],  # real tokens per row (>= 1)
) -> torch.Tensor:
    """Embeddings [B, H] float32 (on ``hidden``'s device), each of unit L2 norm. Differentiable."""
    return F.normalize(mean_states(hidden, lengths), p=2, dim=-1)
