"""The adapter blob: one self-describing safetensors file (DESIGN decision 3).

Tensors
    ``prompt_embeddings``  [P, layers * 2 * kv_heads * head_dim]  PEFT's flat layout: slot 2l = key of layer l,
                           slot 2l+1 = value of layer l.
    ``classifier.*``       the head of a ``classify`` adapter (``ptserve.adapters_store.heads``); ``generate`` and
                           ``embed`` adapters carry none.
Metadata
    ``__metadata__["ptserve"]`` = JSON of ``AdapterConfig`` (task, labels, head kind, backbone fingerprint,
    format version, and the PEFT fields needed to write the adapter back out as a PEFT folder).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store import untrusted_json
from ptserve.adapters_store.errors import InvalidAdapter
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.untrusted_json import JSONRejected

FORMAT = "ptserve.adapter"
FORMAT_VERSION = 1
TASKS = ("classify", "generate", "embed")
PEFT_TASK_TYPE = {"classify": "SEQ_CLS", "generate": "CAUSAL_LM", "embed": "FEATURE_EXTRACTION"}
PREFIX_KEY = "prompt_embeddings"


def _show(value: object) -> str:
    """A value read from an upload, for an error message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class AdapterConfig:
    task: str  # "classify" | "generate" | "embed" (TASKS)
    num_virtual_tokens: int
    backbone: BackboneFingerprint
    labels: tuple[str, ...] = ()
    head: str | None = None  # head kind for "classify" (ptserve.adapters_store.heads), None otherwise
    base_model_name_or_path: str = ""
    format_version: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        body = {
            "format": FORMAT,
            "format_version": self.format_version,
            "task": self.task,
            "num_virtual_tokens": self.num_virtual_tokens,
            "labels": list(self.labels),
            "head": self.head,
            "base_model_name_or_path": self.base_model_name_or_path,
            "backbone": self.backbone.to_dict(),
        }
        return {"format": "pt", "ptserve": json.dumps(body, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> "AdapterConfig":
        if not metadata or "ptserve" not in metadata:
            raise InvalidAdapter(
                "safetensors metadata has no 'ptserve' entry: not a ptserve adapter blob "
                "(upload a PEFT folder as multipart with adapter_config.json + adapter_model.safetensors)"
            )
        try:
            body = untrusted_json.loads(metadata["ptserve"])
        except JSONRejected as exc:
            raise InvalidAdapter(f"malformed ptserve metadata: it {exc.message}") from None
        if not isinstance(body, dict):
            raise InvalidAdapter(f"malformed ptserve metadata: a JSON object expected, got {type(body).__name__}")
        if body.get("format") != FORMAT:
            raise InvalidAdapter(f"metadata format is {_show(body.get('format'))}, expected {FORMAT!r}")
        version = body.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
            raise InvalidAdapter(
                f"format_version {_show(body.get('format_version'))} is not supported (expected {FORMAT_VERSION})"
            )
        task = body.get("task")
        if not isinstance(task, str) or task not in TASKS:
            raise InvalidAdapter(f"task {_show(task)} is not one of {TASKS}")
        labels = body.get("labels") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidAdapter("labels must be a list of strings")
        p = body.get("num_virtual_tokens")
        if not isinstance(p, int) or isinstance(p, bool):
            raise InvalidAdapter("num_virtual_tokens must be an integer")
        head = body.get("head")
        if head is not None and not isinstance(head, str):
            raise InvalidAdapter("head must be a string or null")
        base = body.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise InvalidAdapter("base_model_name_or_path must be a string or null")
        try:
            backbone = BackboneFingerprint.from_dict(body.get("backbone"))
        except ValueError as exc:
            raise InvalidAdapter(f"malformed ptserve metadata: backbone {exc}") from None
        return cls(task=task, num_virtual_tokens=p, backbone=backbone, labels=tuple(labels), head=head,
                   base_model_name_or_path=base or "")

    def peft_config(self) -> dict:
        """``adapter_config.json`` of the equivalent PEFT PREFIX_TUNING adapter."""
        fp = self.backbone
        cfg = {
            "peft_type": "PREFIX_TUNING",
            "task_type": PEFT_TASK_TYPE[self.task],
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_layers": fp.num_layers,
            "token_dim": fp.token_dim,
            "num_attention_heads": fp.num_kv_heads,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": fp.hidden_size,
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path or None,
            "revision": None,
            "auto_mapping": None,
            "init_weights": None,
            "modules_to_save": ["classifier", "score"] if self.task == "classify" else None,
        }
        return cfg


@dataclass
class Adapter:
    """A decoded, validated adapter in host memory."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prompt_embeddings(self) -> torch.Tensor:  # [P, layers * 2 * kv_heads * head_dim]
        return self.tensors[PREFIX_KEY]

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k != PREFIX_KEY}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def encode_blob(adapter: Adapter) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors.items()}
    return st_save(tensors, metadata=adapter.config.to_metadata())
