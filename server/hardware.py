"""What the device computes fast, and the choices that follow: the backbone's dtype and torch's CPU threads.

The decisions (``choose_dtype``, ``choose_threads``) are plain functions of what was detected, so both answers
are tested on any machine; ``cpu_features`` and ``cpu_budget`` ask torch and the OS (never /proc/cpuinfo).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

# CPU features with which oneDNN runs bfloat16 matmuls natively (AMX tiles; AVX512 dot products), as named by
# ``torch.cpu.get_capabilities()``. Without them oneDNN emulates bf16 and float32 is faster.
FAST_BF16_FEATURES = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "float32" | "bfloat16" | "float16"
    reason: str  # one line for the start-up log, /readyz and ptserve_build_info


def choose_dtype(requested: str, device_type: str, features: Mapping[str, bool]) -> DtypeChoice:
    """The backbone's dtype. ``requested`` is the setting ("auto" or a dtype name); ``features`` what
    ``cpu_features`` (cpu) or ``cuda_features`` (cuda) reported."""
    if requested != "auto":
        return DtypeChoice(requested, f"{requested} set by PTSERVE_DTYPE")
    if device_type == "cuda":
        if features.get("cuda_bf16", True):
            return DtypeChoice("bfloat16", "auto: cuda computes bfloat16 natively")
        return DtypeChoice("float32", "auto: this cuda device has no bfloat16")
    fast = [name for name in FAST_BF16_FEATURES if features.get(name)]
    if fast and features.get("onednn"):
        return DtypeChoice("bfloat16", f"auto: cpu has {'+'.join(fast)} (oneDNN bfloat16 matmul)")
    if fast:
        return DtypeChoice("float32", f"auto: cpu has {'+'.join(fast)} but torch runs without oneDNN")
    return DtypeChoice("float32", "auto: cpu has no amx_bf16 or avx512_bf16 (bfloat16 would be emulated)")


def cpu_features() -> dict[str, bool]:
    """The CPU features torch detected (``torch.cpu.get_capabilities``, torch >= 2.6; older builds answer
    through ``torch.cpu._is_*_supported``), plus whether oneDNN is built in and enabled."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        found = {name: bool(caps().get(name, False)) for name in FAST_BF16_FEATURES}
    else:  # pragma: no cover - torch < 2.6
        found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                 "amx_bf16": torch.cpu._is_amx_tile_supported()}
    found["onednn"] = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return found


def cuda_features(device: torch.device) -> dict[str, bool]:
    return {"cuda_bf16": torch.cuda.is_bf16_supported()} if torch.cuda.is_available() else {}


def pick_dtype(requested: str, device: torch.device) -> DtypeChoice:
    features = cuda_features(device) if device.type == "cuda" else cpu_features()
    return choose_dtype(requested, device.type, features)


# --- threads ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadsChoice:
    threads: int
    reason: str


def choose_threads(requested: int, cpus: int) -> ThreadsChoice:
    """torch intra-op threads for the server. ``requested`` > 0 is taken as given; 0 means the rule: one thread
    per usable CPU but one, which is left to the API (event loop, tokenising, JSON). An OpenMP parallel region
    ends at a barrier, so one engine thread preempted by the API stalls every other one: on the 2-core Xeon two
    threads beside a busy API served fewer requests/s than one (docs/design.md, "Threads")."""
    if requested > 0:
        return ThreadsChoice(requested, f"{requested} set by PTSERVE_THREADS")
    threads = max(1, cpus - 1)
    return ThreadsChoice(threads, f"rule: usable cpus ({cpus}) - 1 for the API, at least 1")


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cpus, quota)) if quota else max(1, cpus)


def _cgroup_cpu_quota(path: Path) -> int | None:
    """``cpu.max`` reads "max 100000" (no quota) or "QUOTA PERIOD"; the quota rounded up to whole CPUs."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))
