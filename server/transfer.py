"""Host-to-device copies that do not block the engine: pinned staging and non-blocking copies on CUDA.

``to_device`` is for the small per-pass tensors (token ids, positions, lengths): one pinned, non-blocking copy,
ordered on the current stream before the kernels that read it, so the host queues a pass without waiting for the
device. ``upload`` is for adapters, copied by a loader thread while the engine runs: a side stream, waited for by
that thread only. On the cpu both are plain copies.
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

    The dtype is converted on the host first (a bfloat16 adapter moves half the bytes of a float32 one). On CUDA
    the copy runs on a side stream from pinned memory and the calling (loader) thread waits for that copy only;
    ``record_stream`` tells the allocator that the engine's stream uses the tensor, so its memory is not reused
    before the engine's work queued at its release has run."""
    host = t.to(dtype=dtype, copy=True)
    if device.type != "cuda":
        return host
    pinned = host.pin_memory()
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    stream, engine_stream = _side_streams[device], torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        out = torch.empty(host.shape, dtype=dtype, device=device)
        out.copy_(pinned, non_blocking=True)
    stream.synchronize()
    out.record_stream(engine_stream)
    return out
