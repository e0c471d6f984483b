"""Host-to-device copies that do not block the engine: pinned staging and non-blocking copies on CUDA.

``to_device`` is for the small per-pass tensors (token ids, positions, lengths): one pinned, non-blocking copy,
ordered on the current stream before the kernels that read it, so the host queues a pass without waiting for the
device. ``upload`` is for adapters, copied by a loader thread while the engine runs: a side stream, waited for by
that thread only, into memory allocated on the engine's stream (so freeing it later is ordered after the engine's
last use). On the cpu both are plain copies.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a cpu tensor) on ``device``; on CUDA through pinned memory, without a host sync."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def upload(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor on ``device`` in ``dtype`` holding ``t`` (cpu); always a copy, never a view of ``t``.

    The dtype is converted on the host first (a bfloat16 adapter moves half the bytes of a float32 one)."""
    host = t.to(dtype=dtype, copy=True)
    if device.type != "cuda":
        return host
    pinned = host.pin_memory()
    out = torch.empty(host.shape, dtype=dtype, device=device)  # allocated on the engine's (current) stream
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    stream = _side_streams[device]
    stream.wait_stream(torch.cuda.current_stream(device))  # ``out`` may reuse memory the engine just freed
    with torch.cuda.stream(stream):
        out.copy_(pinned, non_blocking=True)
    stream.synchronize()  # this (loader) thread waits for its copy; the engine's stream never does
    return out
