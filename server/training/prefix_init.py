"""Where a trained prefix starts: random (PEFT's and THUDM's N(0, 1)) or the backbone's own keys and values.

``tokens`` (the default on an encoder since issue 14) starts every virtual token as the keys and values, in every
layer, of one real token of the training texts, read off a forward pass of the frozen backbone. At step 0 the
model then sees P more real tokens rather than P random vectors of unit scale in each layer's key/value space,
so the head starts on features close to the backbone's own and the prefix only has to move from there. Prompt
tuning starts from vocabulary embeddings for the same reason (Lester et al. 2021, section 3.2); P-Tuning v2's
deep prefix has no embedding to start from, so the starting point is taken per layer.
"""

from __future__ import annotations

import torch

from ptserve.server.backbone import Backbone
from ptserve.server.engine import encoder_forward

PREFIX_INITS = ("random", "tokens")


class _Record:
    """Duck-types the cache's ``write_prompt``: keeps each layer's token keys and values of one pass."""

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def write_prompt(self, layer: int, slots: slice, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[layer], self.values[layer] = key.detach().float(), value.detach().float()  # [B, H, T, D]


@torch.no_grad()
def token_kv(
    bb: Backbone,
    token_ids: list[tuple[int, ...]],  # training texts, special tokens included
    num_virtual_tokens: int,
    seed: int,
    max_texts: int = 64,
) -> torch.Tensor:
    """[P, layers * 2 * kv_heads * head_dim] float32 cpu (PEFT's flat layout, ``resident.prefix_kv``'s input):
    virtual token i = the K/V, in every layer, of a real token drawn (seeded, without replacement) from the
    first ``max_texts`` texts. Special tokens are drawn too: they are as much the backbone's as words are."""
    fp, g = bb.fingerprint, torch.Generator().manual_seed(seed)
    rows = [token_ids[int(i)] for i in torch.randperm(len(token_ids), generator=g)[:max_texts]]
    if not rows:
        raise ValueError("a prefix initialised from tokens needs training texts")
    empty = torch.zeros(fp.num_layers, 2, len(rows), fp.num_kv_heads, 0, fp.head_dim, device=bb.device,
                        dtype=bb.dtype)
    record = _Record(fp.num_layers)
    encoder_forward(bb, rows, empty, [0] * len(rows), record=record)
    keys = torch.stack(record.keys)  # [L, B, H, T, D]
    values = torch.stack(record.values)
    places = [(b, t) for b, r in enumerate(rows) for t in range(len(r))]
    while len(places) < num_virtual_tokens:  # fewer real tokens than virtual ones: draw again
        places += places
    pick = torch.randperm(len(places), generator=g)[:num_virtual_tokens].tolist()
    b_idx = torch.tensor([places[i][0] for i in pick])
    t_idx = torch.tensor([places[i][1] for i in pick])
    k = keys[:, b_idx, :, t_idx]  # [P, L, H, D] (advanced indices first)
    v = values[:, b_idx, :, t_idx]
    flat = torch.stack([k, v], dim=2)  # [P, L, 2, H, D]: resident.prefix_kv's view
    return flat.reshape(num_virtual_tokens, -1).cpu().contiguous()
