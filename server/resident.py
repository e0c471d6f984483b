"""Adapters resident on the engine's device, laid out for gathering into a batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptserve.adapters_store.format import Adapter, AdapterConfig
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.server.transfer import to_device, upload


@dataclass(frozen=True)
class ResidentAdapter:
    id: str
    version: int
    config: AdapterConfig
    kv: torch.Tensor  # [layers, 2, kv_heads, P, head_dim] on the device, in the backbone's dtype
    head: dict[str, torch.Tensor]  # classifier tensors on the device (empty for generate adapters)

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + sum(
            t.numel() * t.element_size() for t in self.head.values()
        )


def prefix_kv(prompt_embeddings: torch.Tensor, fp: BackboneFingerprint) -> torch.Tensor:
    """PEFT flat layout [P, L*2*H*D] -> [L, 2, H, P, D] (slot 2l = key of layer l, 2l+1 = value)."""
    p = prompt_embeddings.shape[0]
    kv = prompt_embeddings.view(p, fp.num_layers, 2, fp.num_kv_heads, fp.head_dim)
    return kv.permute(1, 2, 3, 0, 4).contiguous()


def make_resident(
    adapter: Adapter, adapter_id: str, version: int, fp: BackboneFingerprint,
    device: torch.device, dtype: torch.dtype,
) -> ResidentAdapter:
    # ``upload`` always copies (on the cpu a no-op ``to`` would keep the decoded blob's buffers, and the heap
    # around them, alive) and on CUDA copies from pinned memory on a side stream, so loading never stalls the engine.
    kv = upload(prefix_kv(adapter.prompt_embeddings.to(torch.float32), fp), device, dtype)
    # Heads stay float32 on the device: they are tiny and it keeps logits comparable across dtypes.
    head = {k: upload(v, device, torch.float32) for k, v in adapter.head_tensors().items()}
    return ResidentAdapter(adapter_id, version, adapter.config, kv, head)


def gather_prefixes(
    adapters: list[ResidentAdapter], fp: BackboneFingerprint, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One adapter per row, prefixes left-padded to P_max: [layers, 2, B, kv_heads, P_max, head_dim].

    One copy per distinct adapter (rows sharing an adapter are filled together); pad slots are zeros and masked.
    """
    p_max = max(a.num_virtual_tokens for a in adapters)
    kv = torch.zeros(fp.num_layers, 2, len(adapters), fp.num_kv_heads, p_max, fp.head_dim, device=device, dtype=dtype)
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(adapters):
        groups.setdefault(id(a), []).append(i)
    for members in groups.values():
        a = adapters[members[0]]
        kv[:, :, to_device(torch.tensor(members), device), :, p_max - a.num_virtual_tokens:] = a.kv.unsqueeze(2)
    return kv
