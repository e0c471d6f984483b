"""The dtype the trainer's attention runs in under bf16 autocast: measured on the CPU, not assumed.

Under autocast every matmul of a training step runs in bf16, and so does attention (``scaled_dot_product_attention``
is on autocast's bf16 list). On a CPU with AVX512-BF16 but no AMX (an AMD EPYC Zen 4, torch 2.13) the matmuls get
~2x faster while ATen's CPU flash attention in bf16 is slower than in float32, its backward ~4x slower: a prefix
step took 0.81x of float32's time with bf16 attention and 0.56x with float32 attention (``bench_train_step``,
issue 14). Which side wins depends on the CPU and torch's kernels, so the trainer times one forward + backward of
attention at its own shapes in both dtypes before it starts and keeps the faster (float32 only when clearly
faster: it costs two casts per layer). GPUs keep bf16: their fused attention kernels are bf16-native.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ptserve.adapters_store.fingerprint import BackboneFingerprint

# float32 is chosen only below this share of bf16's time: two casts per layer, and timing noise on a busy machine.
CLEARLY_FASTER = 0.9
REPEATS = 3


@dataclass(frozen=True)
class AttentionChoice:
    dtype: torch.dtype | None  # what attention computes in; None = the forward's own (autocast's bf16, or float32)
    reason: str
    ms: dict[str, float] = field(default_factory=dict)  # forward + backward per dtype name, where measured

    def record(self) -> dict:
        """What ``training.json`` holds."""
        return {"dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None, "reason": self.reason,
                "ms": self.ms}


def choose(ms: dict[str, float], shape: str) -> AttentionChoice:
    """float32 attention when its measured time is clearly below bf16's, else autocast's bf16."""
    faster = ms["float32"] < CLEARLY_FASTER * ms["bfloat16"]
    verdict = "float32" if faster else "bf16"
    reason = (f"cpu attention forward+backward ({shape}): bf16 {ms['bfloat16']:.1f} ms, "
              f"float32 {ms['float32']:.1f} ms -> {verdict}")
    return AttentionChoice(torch.float32 if faster else None, reason, ms)


def time_attention(
    fp: BackboneFingerprint, batch: int, tokens: int, prefix: int, dtype: torch.dtype, repeats: int = REPEATS
) -> float:
    """Best-of-``repeats`` milliseconds of one masked attention forward + backward on the CPU at a training
    step's shapes: q [B, heads, T, D], k/v [B, kv_heads, P + T, D], a boolean mask over P + T."""
    gen = torch.Generator().manual_seed(0)
    heads = fp.hidden_size // fp.head_dim
    q = torch.randn(batch, heads, tokens, fp.head_dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(batch, fp.num_kv_heads, prefix + tokens, fp.head_dim, generator=gen).to(dtype)
            .requires_grad_() for _ in range(2))
    mask = torch.rand(batch, 1, 1, prefix + tokens, generator=gen) > 0.1
    mask[..., 0] = True  # no row without a key to attend to
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up: kernels' first call per shape pays for set-up
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != fp.num_kv_heads)
        out.sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best * 1000


@functools.lru_cache(maxsize=32)  # --search trains many times at the same shapes: measured once per shape
def attention_dtype_for(
    fp: BackboneFingerprint, device: torch.device, bf16: bool, batch: int, tokens: int, prefix: int
) -> AttentionChoice:
    """The dtype of the trainer's attention: the forward's own unless a bf16 run on the CPU measures float32
    attention as clearly faster at this shape (``tokens`` = the longest training row, special tokens included)."""
    if not bf16:
        return AttentionChoice(None, "float32 training: attention in float32")
    if device.type != "cpu":
        return AttentionChoice(None, f"bf16 on {device.type}: its fused attention kernels are bf16-native")
    with torch.autocast("cpu", enabled=False):
        ms = {name: time_attention(fp, batch, tokens, prefix, dtype)
              for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    heads = fp.hidden_size // fp.head_dim
    return choose(ms, f"batch {batch}, {heads} heads of {fp.head_dim}, {tokens} tokens + {prefix} virtual")
