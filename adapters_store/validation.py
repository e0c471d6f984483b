"""Decode and validate adapter blobs before anything is stored, cached or put on a device.

Order matters: sizes and the raw safetensors header are checked before any tensor is materialised, names,
dtypes and shapes before values, values (finite) before the adapter is returned. Nothing is ever unpickled.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Collection

import torch
from safetensors.torch import load as st_load

from ptserve.adapters_store import untrusted_json
from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter, PayloadTooLarge
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.format import PEFT_TASK_TYPE, PREFIX_KEY, Adapter, AdapterConfig
from ptserve.adapters_store.heads import head_shapes, served_heads
from ptserve.adapters_store.untrusted_json import JSONRejected

ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 1 << 20
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128
MAX_TENSOR_DIMS = 8


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 << 20
    max_virtual_tokens: int = 256


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


def read_header(data: bytes, what: str = "adapter") -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Parse a safetensors header without touching tensor data: (metadata, name -> dtype/shape)."""
    # A safetensors header starts with '{' at byte 8; only without it do the pickle / zip magic bytes mean
    # anything (a valid header length can itself start with 0x80 or spell "PK").
    if data[8:9] != b"{" and (data[:1] == b"\x80" or data[:2] == b"PK"):
        raise InvalidAdapter(f"{what} looks like a pickle / torch.save file; only safetensors is accepted")
    if len(data) < 8:
        raise InvalidAdapter(f"{what} is truncated ({len(data)} bytes): not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise InvalidAdapter(f"{what} safetensors header claims {n} bytes; at most {MAX_HEADER_BYTES} allowed")
    if 8 + n > len(data):
        raise InvalidAdapter(f"{what} is truncated: header needs {n} bytes, file has {len(data) - 8}")
    try:
        header = untrusted_json.loads(data[8 : 8 + n])
    except JSONRejected as exc:
        raise InvalidAdapter(
            f"{what} is not a safetensors file (header is not JSON ptserve accepts: it {exc.message})"
        ) from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{what} safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidAdapter(f"{what} safetensors __metadata__ must map strings to strings")
    body = len(data) - 8 - n
    entries = {name: _tensor_entry(name, spec, body, what) for name, spec in header.items()}
    return metadata, entries


def _is_count(x: object) -> bool:
    """A JSON integer >= 0 (``true`` is not one, though Python says bool is int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_entry(name: str, spec: object, body: int, what: str) -> TensorEntry:
    """One header entry, every field type-checked before it is used: ``{"dtype": str, "shape": [int >= 0, ...],
    "data_offsets": [begin, end]}`` with the data inside the file's ``body`` bytes."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise InvalidAdapter(
            f"{what} tensor {name!r} has a malformed header entry: expected an object with exactly "
            "'dtype', 'shape' and 'data_offsets'"
        )
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str):
        raise InvalidAdapter(f"{what} tensor {name!r}: dtype must be a string, got {type(dtype).__name__}")
    if dtype not in ALLOWED_DTYPES:
        raise InvalidAdapter(f"tensor {name!r} has dtype {dtype[:32]}; allowed: {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_count(d) for d in shape):
        raise InvalidAdapter(
            f"{what} tensor {name!r}: shape must be a list of at most {MAX_TENSOR_DIMS} integers >= 0"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise InvalidAdapter(f"{what} tensor {name!r}: data_offsets must be two integers >= 0, [begin, end]")
    begin, end = offsets
    if end > body or begin > end:
        raise InvalidAdapter(f"{what} is truncated or corrupt: tensor {name!r} data lies outside the file")
    if end - begin != math.prod(shape) * ALLOWED_DTYPES[dtype]:
        raise InvalidAdapter(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} {dtype}")
    return TensorEntry(dtype, tuple(shape))


def check_config(
    config: AdapterConfig, server: BackboneFingerprint, head_kind: str | None, limits: Limits,
    serves: Collection[str] | None = None,
) -> None:
    diffs = server.differences(config.backbone)
    if diffs:
        raise BackboneMismatch("adapter was made for another backbone: " + "; ".join(diffs))
    if serves is not None and config.task not in serves:
        # stored, it would answer 422 on every use: refuse it now, with the reason
        tasks = sorted(serves)
        raise InvalidAdapter(
            f"a {config.task!r} adapter (PEFT task_type {PEFT_TASK_TYPE[config.task]}) cannot be served here: "
            f"backbone {server.model_type!r} serves only {' and '.join(map(repr, tasks))} adapters "
            f"(PEFT task_type {', '.join(PEFT_TASK_TYPE[t] for t in tasks)})"
        )
    if not 1 <= config.num_virtual_tokens <= limits.max_virtual_tokens:
        raise InvalidAdapter(f"num_virtual_tokens={config.num_virtual_tokens}; allowed 1..{limits.max_virtual_tokens}")
    if config.num_virtual_tokens >= server.max_positions > 0:
        raise InvalidAdapter(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input "
            f"(backbone has {server.max_positions} positions)"
        )
    if config.task == "classify":
        if head_kind is None:
            raise InvalidAdapter(f"backbone {server.model_type!r} serves no classification heads")
        if config.head not in served_heads(head_kind):
            raise InvalidAdapter(
                f"head {config.head!r} does not fit this backbone; expected one of "
                + ", ".join(map(repr, served_heads(head_kind)))
            )
        if not 1 <= len(config.labels) <= MAX_LABELS:
            raise InvalidAdapter(f"a classify adapter needs 1..{MAX_LABELS} labels, got {len(config.labels)}")
        if len(set(config.labels)) != len(config.labels) or any(
            not 0 < len(x) <= MAX_LABEL_CHARS for x in config.labels
        ):
            raise InvalidAdapter(f"labels must be unique non-empty strings of at most {MAX_LABEL_CHARS} chars")
    elif config.head is not None or config.labels:
        raise InvalidAdapter(f"an adapter of task {config.task!r} carries no head and no labels")


def expected_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    fp = config.backbone
    shapes = {PREFIX_KEY: (config.num_virtual_tokens, fp.prefix_width)}
    if config.task == "classify":
        shapes.update(head_shapes(config.head, len(config.labels), fp.hidden_size))
    return shapes


def check_entries(entries: dict[str, TensorEntry], wanted: dict[str, tuple[int, ...]]) -> None:
    missing, extra = sorted(set(wanted) - set(entries)), sorted(set(entries) - set(wanted))
    if missing or extra:
        raise InvalidAdapter(f"tensor names: expected {sorted(wanted)}; missing {missing}, unexpected {extra}")
    for name, shape in wanted.items():
        if entries[name].shape != shape:
            raise InvalidAdapter(f"tensor {name!r} has shape {list(entries[name].shape)}, expected {list(shape)}")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidAdapter(f"tensor {name!r} contains NaN or Inf")


def decode_blob(
    data: bytes, server: BackboneFingerprint, head_kind: str | None, limits: Limits = Limits(),
    serves: Collection[str] | None = None,
) -> Adapter:
    """Validate ``data`` against the loaded backbone and return the adapter; raise a 4xx error otherwise.

    ``serves``: the tasks the backbone serves (encoders 'classify' and 'embed', decoders 'generate'); an adapter
    of another task is refused. None (offline tools that only convert) accepts any."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"adapter is {len(data)} bytes; at most {limits.max_bytes} allowed")
    metadata, entries = read_header(data)
    config = AdapterConfig.from_metadata(metadata)
    check_config(config, server, head_kind, limits, serves)
    check_entries(entries, expected_shapes(config))
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for any structural problem
        raise InvalidAdapter(f"safetensors could not read the adapter: {exc}") from None
    check_finite(tensors)
    return Adapter(config=config, tensors=tensors)

