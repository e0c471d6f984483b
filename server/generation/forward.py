"""The prefixed forward passes of a decoder LM: full prompts (prefill and training) and one-token decode steps,
and the LM head in float32 for serving."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptserve.server.backbone import Backbone
from ptserve.server.generation.kv_cache import SlotKVCache
from ptserve.server.hf_compat import decoder_parts
from ptserve.server.prefix_attention import CacheContext, PrefixContext
from ptserve.server.transfer import to_device


def decoder_forward(
    bb: Backbone,
    token_ids: list[list[int]],  # B prompts
    kv: torch.Tensor,  # [layers, 2, B, kv_heads, P_max, head_dim]; row b's prefix in the last P_b slots
    prefix_lens: list[int],  # P_b per row
    cache: SlotKVCache | None = None,  # prefill: also store the prompts' K/V ...
    slots: slice | None = None,  # ... in these slots
) -> torch.Tensor:
    """Hidden states [B, T_max, hidden] of right-padded prompts under their rows' prefixes.

    Causal within each prompt, every token sees all of its row's virtual tokens, positions start at P_b
    (DESIGN decision 1). Differentiable w.r.t. ``kv``: the trainer calls this same function.
    """
    dev, b = bb.device, len(token_ids)
    t_max, p_max = max(len(t) for t in token_ids), kv.shape[4]
    input_ids = torch.full((b, t_max), bb.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        input_ids[i, : len(ids)] = torch.tensor(ids)
    lengths, p_lens = torch.tensor([len(t) for t in token_ids]), torch.tensor(prefix_lens)
    q = torch.arange(t_max)
    causal = (q[None, :] <= q[:, None])[None] & (q[None, None, :] < lengths[:, None, None])  # [B, T_q, T_k]
    prefix_ok = (torch.arange(p_max)[None, :] >= (p_max - p_lens)[:, None])[:, None, :].expand(b, t_max, p_max)
    mask = to_device(torch.cat([prefix_ok, causal], dim=2)[:, None], dev)  # [B, 1, T_max, P_max + T_max]
    positions = (p_lens[:, None] + q[None, :]).clamp(max=bb.fingerprint.max_positions - 1)
    base, _ = decoder_parts(bb.model)
    out = base(
        input_ids=to_device(input_ids, dev), position_ids=to_device(positions, dev), use_cache=False,
        ptserve_prefix=PrefixContext(kv[:, 0], kv[:, 1], mask, cache=cache, slots=slots),
    )
    return out.last_hidden_state


def decode_forward(
    bb: Backbone,
    cache: SlotKVCache,
    last_tokens: list[int],  # B: each running row's newest token (not yet in the cache)
    cached: list[int],  # B: tokens already in each row's slot = the token column to write next
    prefix_lens: list[int],  # B
    first_slot: int = 0,  # the rows own slots [first_slot, first_slot + B)
) -> torch.Tensor:
    """Hidden state [B, hidden] of one new token per running row.

    The rows' numbers reach the device in one non-blocking copy and the masks are built there, so a step queues
    its work without waiting for the device (the only host sync of a step is reading the sampled tokens)."""
    dev, b = bb.device, len(last_tokens)
    p_max, t_end = max(prefix_lens), max(cached) + 1
    tokens, cached_t, p_lens = to_device(torch.tensor([last_tokens, cached, prefix_lens]), dev)  # 3 x [B]
    prefix_ok = torch.arange(p_max, device=dev)[None, :] >= (p_max - p_lens)[:, None]  # [B, P_max]
    token_ok = torch.arange(t_end, device=dev)[None, :] <= cached_t[:, None]  # [B, T_end]
    mask = torch.cat([prefix_ok, token_ok], dim=1)[:, None, None, :]  # [B, 1, 1, P_max + T_end]
    cap = cache.prefix_cap
    ctx = CacheContext(
        cache=cache, slots=slice(first_slot, first_slot + b), write_pos=cached_t[:, None],
        window=slice(cap - p_max, cap + t_end), mask=mask,
    )
    base, _ = decoder_parts(bb.model)
    out = base(
        input_ids=tokens[:, None], position_ids=(p_lens + cached_t)[:, None], use_cache=False, ptserve_cache=ctx,
    )
    return out.last_hidden_state[:, -1]


def lm_logits(bb: Backbone, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] -> logits [N, vocab] float32 on cpu, through the model's own head (the trainer's path)."""
    _, head = decoder_parts(bb.model)
    return head(hidden).float().cpu()


class FloatLMHead:
    """The LM head in float32 whatever the backbone's dtype: logits feed sampling, and a bfloat16 logit near 20
    is only good to 0.125. Holds a float32 copy of the head's weight when the backbone is not float32
    (vocab x hidden x 4 bytes: 2 MB for the benchmark's Llama, 2.1 GB for Llama-3-8B's 128k vocabulary)."""

    def __init__(self, bb: Backbone):
        _, head = decoder_parts(bb.model)
        self.weight = head.weight.detach().float()  # [vocab, hidden]; the same tensor when already float32
        self.bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] (backbone dtype) -> logits [N, vocab] float32 on the device."""
        return F.linear(hidden.float(), self.weight, self.bias)
