"""Classification heads applied per row after the prefixed forward pass (kinds named in ptserve.adapters_store.heads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptserve.server.resident import ResidentAdapter
from ptserve.server.transfer import to_device


# Each head: (pooled [B, H] or None, first [B, H], head tensors, mean [B, H] or None) -> logits [B, C].
def _pooler_linear(pooled: torch.Tensor, first: torch.Tensor, head: dict, mean=None) -> torch.Tensor:
    return F.linear(pooled, head["classifier.weight"], head["classifier.bias"])


def _cls_mlp(pooled: torch.Tensor, first: torch.Tensor, head: dict, mean=None) -> torch.Tensor:
    x = torch.tanh(F.linear(first, head["classifier.dense.weight"], head["classifier.dense.bias"]))
    return F.linear(x, head["classifier.out_proj.weight"], head["classifier.out_proj.bias"])


def _mean_linear(pooled, first: torch.Tensor, head: dict, mean: torch.Tensor) -> torch.Tensor:
    return F.linear(mean, head["classifier.weight"], head["classifier.bias"])


HEADS = {"pooler_linear": _pooler_linear, "cls_mlp": _cls_mlp, "mean_linear": _mean_linear}


def apply_heads(
    adapters: list[ResidentAdapter],  # one per row
    first: torch.Tensor,  # [B, H] last hidden state of each row's first real token
    pooled: torch.Tensor | None,  # [B, H] backbone pooler output, if the backbone has a pooler
    mean: torch.Tensor | None = None,  # [B, H] mean of each row's real-token states (mean_linear heads)
) -> list[torch.Tensor]:
    """Logits per row ([num_labels] float32 on cpu), each row through its own adapter's head; one device-to-host
    copy for the whole pass."""
    first, pooled = first.float(), (pooled.float() if pooled is not None else None)  # [B, H]
    mean = mean.float() if mean is not None else None
    groups: dict[int, list[int]] = {}
    for row, a in enumerate(adapters):
        groups.setdefault(id(a), []).append(row)
    per_group = []  # [rows of the group, num_labels] on the device
    for rows in groups.values():
        a = adapters[rows[0]]
        idx = to_device(torch.tensor(rows), first.device)
        per_group.append(HEADS[a.config.head](
            pooled.index_select(0, idx) if pooled is not None else None, first.index_select(0, idx), a.head,
            mean.index_select(0, idx) if mean is not None else None,
        ))
    flat = torch.cat([g.flatten() for g in per_group]).cpu()
    out: list[torch.Tensor | None] = [None] * len(adapters)
    at = 0
    for rows, g in zip(groups.values(), per_group):
        logits = flat[at: at + g.numel()].view(g.shape)
        at += g.numel()
        for i, row in enumerate(rows):
            out[row] = logits[i]
    return out
