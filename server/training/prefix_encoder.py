"""The trainable prefix: THUDM/PEFT ``PrefixEncoder``, optionally reparameterised by an MLP.

Its state dict uses THUDM's names (``embedding.weight``, ``trans.0.*``, ``trans.2.*``) and its forward is
``ptserve.adapters_store.thudm.prefix_from_encoder``, the formula the THUDM importer materialises with.
"""

from __future__ import annotations

import torch
from torch import nn

from ptserve.adapters_store.thudm import prefix_from_encoder


class PrefixEncoder(nn.Module):
    """P virtual tokens -> flat prefix K/V [P, layers * 2 * kv_heads * head_dim] (PEFT's
    ``prompt_embeddings``).

    Without projection the flat K/V are the parameters. With projection (P-Tuning v2's reparameterisation) an
    embedding [P, hidden] goes through Linear(hidden, projection_hidden) -> Tanh -> Linear(., width); it often
    trains more stably on small data, and is materialised to plain K/V when saved.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        prefix_width: int,
        hidden_size: int,
        projection_hidden: int | None = None,
        init_std: float = 1.0,
    ):
        super().__init__()
        self.projection = projection_hidden is not None
        if self.projection:
            self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(hidden_size, projection_hidden),
                nn.Tanh(),
                nn.Linear(projection_hidden, prefix_width),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, prefix_width)
        nn.init.normal_(self.embedding.weight, std=init_std)

    @torch.no_grad()
    def start_from(self, flat: torch.Tensor) -> None:
        """Start training from these K/V ([P, width]; ``prefix_init.token_kv``). A reparameterised prefix has no
        such starting point (its K/V are an MLP's output), so it refuses."""
        if self.projection:
            raise ValueError("a reparameterised prefix (prefix_projection) starts random: use prefix_init='random'")
        self.embedding.weight.copy_(flat.to(self.embedding.weight))

    def forward(self) -> torch.Tensor:  # [P, width]
        if not self.projection:
            return self.embedding.weight
        trans = {
            f"prefix_encoder.trans.{i}.{p}": getattr(self.trans[i], p)
            for i in (0, 2)
            for p in ("weight", "bias")
        }
        return prefix_from_encoder(self.embedding.weight, trans)

    @torch.no_grad()
    def materialise(self) -> torch.Tensor:
        """Plain K/V to save or serve: [P, width] float32 on cpu."""
        return self.forward().detach().float().cpu().contiguous()
