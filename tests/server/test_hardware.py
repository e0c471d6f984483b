"""Device-dependent choices: the dtype rule on both answers (fast bf16 or not, whatever this machine has), the
threads rule, the CPU budget from affinity and cgroup quota, and start-up calibration on a real (tiny) backbone."""
from __future__ import annotations

import math
import os

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.calibrate import measure_pass_cost
from ptserve.server.cost_model import DEFAULT_OVERHEAD_TOKENS, MAX_OVERHEAD_TOKENS
from ptserve.server.engine import Engine
from ptserve.server.hardware import (
    _cgroup_cpu_quota, choose_dtype, choose_threads, cpu_budget, cpu_features, pick_dtype,
)
from tests.factories import save_tiny_encoder

AMX = {"amx_bf16": True, "avx512_bf16": True, "onednn": True}
AVX512_BF16 = {"amx_bf16": False, "avx512_bf16": True, "onednn": True}
PLAIN = {"amx_bf16": False, "avx512_bf16": False, "onednn": True}  # e.g. the AMD EPYC of earlier sessions


@pytest.mark.parametrize("features,dtype,why", [
    (AMX, "bfloat16", "amx_bf16+avx512_bf16"),
    (AVX512_BF16, "bfloat16", "avx512_bf16"),
    (PLAIN, "float32", "no amx_bf16 or avx512_bf16"),
    ({}, "float32", "no amx_bf16 or avx512_bf16"),
    ({**AMX, "onednn": False}, "float32", "without oneDNN"),
])
def test_auto_on_cpu_is_bfloat16_only_with_fast_bf16_matmul(features, dtype, why):
    choice = choose_dtype("auto", "cpu", features)
    assert choice.dtype == dtype and why in choice.reason and choice.reason.startswith("auto")


def test_auto_on_cuda_and_explicit_settings():
    assert choose_dtype("auto", "cuda", {"cuda_bf16": True}).dtype == "bfloat16"
    assert choose_dtype("auto", "cuda", {"cuda_bf16": False}).dtype == "float32"
    for dtype in ("float32", "bfloat16", "float16"):
        for device, features in (("cpu", AMX), ("cpu", PLAIN), ("cuda", {"cuda_bf16": True})):
            choice = choose_dtype(dtype, device, features)
            assert choice.dtype == dtype and "PTSERVE_DTYPE" in choice.reason


def test_this_machine_is_asked_through_torch():
    features = cpu_features()
    assert set(features) == {"amx_bf16", "avx512_bf16", "onednn"} and all(isinstance(v, bool) for v in features.values())
    caps = torch.cpu.get_capabilities()
    assert features["amx_bf16"] == bool(caps.get("amx_bf16")) and features["avx512_bf16"] == bool(caps.get("avx512_bf16"))
    choice = pick_dtype("auto", torch.device("cpu"))
    assert choice == choose_dtype("auto", "cpu", features)


def test_the_backbone_says_its_dtype_and_why():
    bb = load_backbone("minilm", device="cpu", dtype="auto")
    expected = choose_dtype("auto", "cpu", cpu_features())
    assert str(bb.dtype) == f"torch.{expected.dtype}" and bb.dtype_reason == expected.reason
    assert next(bb.model.parameters()).dtype == bb.dtype
    forced = load_backbone("minilm", device="cpu", dtype="float32")
    assert forced.dtype == torch.float32 and forced.dtype_reason == "float32 set by PTSERVE_DTYPE"


def test_threads_rule():
    assert choose_threads(0, 2).threads == 1  # a 2-core machine: one core is the API's
    assert choose_threads(0, 8).threads == 7
    assert choose_threads(0, 1).threads == 1
    assert choose_threads(3, 2).threads == 3 and "PTSERVE_THREADS" in choose_threads(3, 2).reason
    assert "rule" in choose_threads(0, 4).reason


def test_cgroup_quota(tmp_path):
    f = tmp_path / "cpu.max"
    assert _cgroup_cpu_quota(tmp_path / "missing") is None
    f.write_text("max 100000\n")
    assert _cgroup_cpu_quota(f) is None
    f.write_text("150000 100000\n")
    assert _cgroup_cpu_quota(f) == 2  # 1.5 CPUs: rounded up
    f.write_text("50000 100000\n")
    assert _cgroup_cpu_quota(f) == 1
    f.write_text("garbage\n")
    assert _cgroup_cpu_quota(f) is None
    assert 1 <= cpu_budget() <= os.cpu_count()


@pytest.fixture(scope="module")
def tiny_engine(minilm, tmp_path_factory) -> Engine:
    folder = save_tiny_encoder("bert", tmp_path_factory.mktemp("bert"), minilm.path)
    return Engine(load_backbone(str(folder), device="cpu", dtype="float32"))


def test_calibration_on_a_real_backbone(tiny_engine):
    cost = measure_pass_cost(tiny_engine, max_batch_size=64, max_batch_tokens=16384, budget_s=0.2)
    assert cost.calibration_s < 10
    if cost.source == "measured":
        assert 0 <= cost.overhead_tokens <= MAX_OVERHEAD_TOKENS
        assert cost.per_token_s > 0 and cost.fixed_s >= 0 and cost.r2 >= 0.8
    else:  # a machine too busy for a line is allowed: the default, with the reason
        assert cost.overhead_tokens == DEFAULT_OVERHEAD_TOKENS and cost.source.startswith("fallback")
        assert math.isnan(cost.per_token_s) or cost.r2 < 0.8


def test_calibration_that_cannot_finish_in_time_falls_back(tiny_engine):
    cost = measure_pass_cost(tiny_engine, max_batch_size=64, max_batch_tokens=16384, budget_s=0.0, cap_s=0.0)
    assert cost.overhead_tokens == DEFAULT_OVERHEAD_TOKENS and "took over" in cost.source
