"""The trainer's attention dtype under bf16 autocast (issue 14): measured per CPU and shape, float32 only when
clearly faster; computed in that dtype inside the prefixed attention, the output back in the forward's dtype."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ptserve.server.prefix_attention import PrefixContext, prefix_attention
from ptserve.server.training.attention_dtype import CLEARLY_FASTER, attention_dtype_for, choose, time_attention
from ptserve.server.training.classify import PrefixClassifier, TrainConfig, tokenize


def test_float32_only_when_clearly_faster():
    assert choose({"bfloat16": 100.0, "float32": 80.0}, "s").dtype == torch.float32
    assert choose({"bfloat16": 100.0, "float32": 100.0 * CLEARLY_FASTER + 1}, "s").dtype is None  # within noise
    slower = choose({"bfloat16": 50.0, "float32": 120.0}, "batch 16")
    assert slower.dtype is None
    assert "bf16 50.0 ms" in slower.reason and "float32 120.0 ms" in slower.reason and "batch 16" in slower.reason
    assert slower.record() == {"dtype": None, "reason": slower.reason, "ms": {"bfloat16": 50.0, "float32": 120.0}}
    assert choose({"bfloat16": 100.0, "float32": 10.0}, "s").record()["dtype"] == "float32"


def test_nothing_is_measured_without_bf16_or_off_the_cpu(minilm):
    fp = minilm.fingerprint
    assert attention_dtype_for(fp, torch.device("cpu"), False, 16, 64, 16).ms == {}
    gpu = attention_dtype_for(fp, torch.device("cuda"), True, 16, 64, 16)  # a device object needs no GPU
    assert gpu.dtype is None and gpu.ms == {} and "cuda" in gpu.reason


def test_a_bf16_cpu_run_measures_both_dtypes_at_its_shape(minilm):
    choice = attention_dtype_for(minilm.fingerprint, torch.device("cpu"), True, 4, 24, 4)
    assert set(choice.ms) == {"bfloat16", "float32"}
    assert all(math.isfinite(ms) and ms > 0 for ms in choice.ms.values())
    assert choice.dtype == (torch.float32 if choice.ms["float32"] < CLEARLY_FASTER * choice.ms["bfloat16"] else None)
    assert "batch 4" in choice.reason and "24 tokens + 4 virtual" in choice.reason
    assert time_attention(minilm.fingerprint, 2, 8, 2, torch.float32, repeats=1) > 0


class _Layer(torch.nn.Module):
    layer_idx = 0


def test_attention_computes_in_the_context_dtype_and_returns_the_query_dtype():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen).bfloat16()
    k, v = (torch.randn(2, 4, 5, 8, generator=gen).bfloat16() for _ in range(2))
    pk, pv = (torch.randn(1, 2, 4, 3, 8, generator=gen) for _ in range(2))  # [layers, B, kv_heads, P, D] float32
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[1, ..., 0] = False  # row 1 has a shorter prefix
    layer = _Layer().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = prefix_attention(layer, q, k, v, None, ptserve_prefix=PrefixContext(pk, pv, mask,
                                                                                     compute_dtype=torch.float32))
        plain, _ = prefix_attention(layer, q, k, v, None, ptserve_prefix=PrefixContext(pk, pv, mask))
    ref = F.scaled_dot_product_attention(q.float(), torch.cat([pk[0], k.float()], 2), torch.cat([pv[0], v.float()], 2),
                                         attn_mask=mask)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 4, 8)
    assert torch.equal(out, ref.bfloat16().transpose(1, 2))  # float32 attention, rounded once at the end
    assert plain.dtype == torch.bfloat16 and not torch.equal(plain, out)  # autocast's own: bf16 inputs


def test_float32_attention_under_autocast_trains_the_prefix(minilm):
    model = PrefixClassifier(minilm, 2, TrainConfig(virtual_tokens=4)).train()
    ids = tokenize(minilm, ["a short text", "another, somewhat longer text to pad the other"], 4, None)
    model.attention_dtype = torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    F.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    grad = model.prefix.embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        exact = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids)
    assert (mixed - exact).abs().max() < 0.05 * exact.abs().max() + 1e-3  # bf16 matmuls, float32 attention
