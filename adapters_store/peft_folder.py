"""PEFT ``PREFIX_TUNING`` adapter folders <-> ptserve blobs, without loss.

A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors`` holding ``prompt_embeddings``
[P, layers * 2 * kv_heads * head_dim] and, for ``SEQ_CLS``, the head saved as ``base_model.classifier.*``.
Task types map to ptserve tasks: ``SEQ_CLS`` -> classify, ``CAUSAL_LM`` -> generate, ``FEATURE_EXTRACTION`` ->
embed (a prefix only: the embedding is the mean-pooled hidden state under it).
PEFT records no backbone fingerprint: a folder is accepted when its geometry fits the loaded backbone,
whatever its ``base_model_name_or_path`` says (DESIGN decision 4); a differing name becomes a note.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Collection

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ptserve.adapters_store import untrusted_json
from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter, PayloadTooLarge
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.format import PEFT_TASK_TYPE, PREFIX_KEY, Adapter, AdapterConfig, encode_blob
from ptserve.adapters_store.heads import MEAN_HEAD
from ptserve.adapters_store.untrusted_json import JSONRejected
from ptserve.adapters_store.validation import Limits, check_finite, decode_blob, read_header
from ptserve.client.wire import LABELS_FILE
from ptserve.client.wire import PEFT_CONFIG_FILE as CONFIG_FILE
from ptserve.client.wire import PEFT_WEIGHTS_FILE as WEIGHTS_FILE

MAX_CONFIG_BYTES = 64 << 10
_TASKS = {peft: task for task, peft in PEFT_TASK_TYPE.items()}  # SEQ_CLS, CAUSAL_LM, FEATURE_EXTRACTION
_PEFT_HEAD_PREFIXES = ("base_model.model.", "base_model.")


def _peft_head_name(key: str) -> str | None:
    """``base_model.classifier.weight`` (or ``...classifier.modules_to_save.default.weight``) -> ``classifier.weight``."""
    for prefix in _PEFT_HEAD_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    key = key.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    return key if key.startswith("classifier.") else None


def _show(value: object) -> str:
    """A value from the upload, for an error message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_peft_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise PayloadTooLarge(f"{CONFIG_FILE} is {len(raw)} bytes; at most {MAX_CONFIG_BYTES}")
    try:
        cfg = untrusted_json.loads(raw)
    except JSONRejected as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} {exc.message}") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object")
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise InvalidAdapter(f"peft_type is {_show(cfg.get('peft_type'))}; ptserve serves PREFIX_TUNING adapters")
    if not isinstance(cfg.get("task_type"), str) or cfg["task_type"] not in _TASKS:
        raise InvalidAdapter(f"task_type {_show(cfg.get('task_type'))} is not one of {sorted(_TASKS)}")
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise InvalidAdapter(f"{CONFIG_FILE} field {key!r} must be an integer, got {_show(cfg.get(key))}")
    if not isinstance(cfg.get("base_model_name_or_path"), (str, type(None))):
        raise InvalidAdapter(f"{CONFIG_FILE} field 'base_model_name_or_path' must be a string or null")
    return cfg


MAX_LABELS_FIELD_BYTES = 1 << 20  # 1024 labels of 128 characters, each escaped to 6 bytes, fit


def parse_labels(raw: str) -> list[str]:
    """The ``labels`` form field sent beside a PEFT folder (PEFT folders carry no label names): a JSON list of
    strings. Their number and lengths are checked with the adapter (``validation.check_config``)."""
    try:
        labels = untrusted_json.loads(raw, max_bytes=MAX_LABELS_FIELD_BYTES)
    except JSONRejected:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise InvalidAdapter('labels must be a JSON list of strings, e.g. ["negative", "positive"]')
    return labels


def peft_to_blob(
    config_raw: bytes,
    weights_raw: bytes,
    server: BackboneFingerprint,
    server_name: str,
    head_kind: str | None,
    labels: list[str] | None = None,
    limits: Limits = Limits(),
    serves: Collection[str] | None = None,
) -> tuple[bytes, Adapter, list[str]]:
    """Convert an uploaded PEFT folder to a validated ptserve blob: (blob, adapter, notes for the answer).
    ``serves``: the tasks the server serves (``decode_blob``)."""
    if len(weights_raw) > limits.max_bytes:
        raise PayloadTooLarge(f"{WEIGHTS_FILE} is {len(weights_raw)} bytes; at most {limits.max_bytes}")
    cfg = parse_peft_config(config_raw)
    diffs = server.geometry_differences(cfg["num_layers"], cfg["token_dim"], cfg["num_attention_heads"])
    if diffs:
        raise BackboneMismatch("PEFT adapter does not fit the loaded backbone: " + "; ".join(diffs))
    read_header(weights_raw, what=WEIGHTS_FILE)  # size/format checks before loading any tensor
    try:
        raw_tensors = st_load(weights_raw)
    except Exception as exc:
        raise InvalidAdapter(f"safetensors could not read {WEIGHTS_FILE}: {exc}") from None
    task = _TASKS[cfg["task_type"]]
    tensors = {}
    for key, value in raw_tensors.items():
        name = PREFIX_KEY if key == PREFIX_KEY else (_peft_head_name(key) if task == "classify" else None)
        if name is None:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds unexpected tensor {key!r}")
        tensors[name] = value
    check_finite(tensors)
    if task == "classify":
        num_labels = _num_labels(tensors)
        labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = AdapterConfig(
        task=task,
        num_virtual_tokens=cfg["num_virtual_tokens"],
        backbone=server,
        labels=tuple(labels or ()) if task == "classify" else (),
        head=head_kind if task == "classify" else None,
        base_model_name_or_path=str(cfg.get("base_model_name_or_path") or ""),
    )
    blob = encode_blob(Adapter(config, tensors))
    adapter = decode_blob(blob, server, head_kind, limits, serves)  # the one validation path for every upload
    notes = []
    if config.base_model_name_or_path and config.base_model_name_or_path != server_name:
        notes.append(
            f"adapter names base model {config.base_model_name_or_path!r}, server runs {server_name!r}; "
            "accepted because the geometry fits"
        )
    return blob, adapter, notes


def _num_labels(tensors: dict) -> int:
    for name in ("classifier.weight", "classifier.out_proj.weight"):
        if name in tensors and tensors[name].dim() == 2:
            return int(tensors[name].shape[0])
    raise InvalidAdapter(f"a SEQ_CLS adapter needs its classifier tensors; found {sorted(tensors)}")


class NoPeftEquivalent(ValueError):
    """The adapter has no PEFT equivalent (its head kind is ptserve's own); the message says why."""


def adapter_to_peft(adapter: Adapter) -> tuple[dict, dict]:
    """(adapter_config.json dict, safetensors dict) of the PEFT folder equivalent to ``adapter``.

    Refused (``NoPeftEquivalent``) for a ``mean_linear`` head: PEFT's SEQ_CLS models classify from the pooler /
    first token, and have no head on mean-pooled states, so a PEFT folder of it would load and answer wrongly."""
    if adapter.config.head == MEAN_HEAD:
        raise NoPeftEquivalent(
            "PEFT has no mean-pooled classification head (head 'mean_linear'): this adapter is served by ptserve "
            "only and is not exported as a PEFT folder; train with the backbone's default head for a PEFT export"
        )
    tensors = {PREFIX_KEY: adapter.prompt_embeddings}
    for name, t in adapter.head_tensors().items():
        tensors[f"base_model.{name}"] = t
    return adapter.config.peft_config(), tensors


def write_peft_folder(adapter: Adapter, out_dir: str | Path) -> Path:
    cfg, tensors = adapter_to_peft(adapter)  # first: a refused export leaves no folder behind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    (out / WEIGHTS_FILE).write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))
    return out


def read_peft_folder(folder: str | Path) -> tuple[bytes, bytes]:
    folder = Path(folder)
    return (folder / CONFIG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()


__all__ = ["parse_labels", "parse_peft_config", "peft_to_blob", "adapter_to_peft", "write_peft_folder", "read_peft_folder"]


def blob_to_adapter(blob: bytes) -> Adapter:
    """Decode a ptserve blob against the fingerprint it records (checks it is self-consistent and finite)."""
    metadata, _ = read_header(blob)
    config = AdapterConfig.from_metadata(metadata)
    return decode_blob(blob, config.backbone, config.head)


def blob_to_peft_folder(blob: bytes, out_dir: str | Path) -> Path:
    """A downloaded blob as a PEFT folder that PEFT loads, plus ``labels.json`` (which PEFT ignores)."""
    adapter = blob_to_adapter(blob)
    folder = write_peft_folder(adapter, out_dir)
    if adapter.config.labels:
        (folder / LABELS_FILE).write_text(json.dumps(list(adapter.config.labels)))
    return folder

