"""Helpers of the decode-level validation suites: hand-made blobs and PEFT folders, and ``refuse``/``refuse_peft``,
which assert that decoding raises exactly the expected typed error and return its message."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.errors import InvalidAdapter
from ptserve.adapters_store.format import AdapterConfig
from ptserve.adapters_store.peft_folder import peft_to_blob, read_peft_folder, write_peft_folder
from ptserve.adapters_store.validation import Limits, decode_blob
from tests.factories import MINILM_LABELS, make_adapter


def raw_blob(tensors: dict[str, torch.Tensor], config: AdapterConfig | None) -> bytes:
    """A safetensors file with exactly these tensors and (when given) this ptserve metadata, unchecked."""
    return st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata=config.to_metadata() if config else None)


def refuse(data: bytes, fp, head, error=InvalidAdapter, match: str | None = None, limits: Limits = Limits()) -> str:
    with pytest.raises(error, match=match) as info:
        decode_blob(data, fp, head, limits)
    assert type(info.value) is error  # BackboneMismatch subclasses InvalidAdapter: be exact
    return info.value.message


def peft_files(fp, tmp_path, p: int = 4, seed: int = 0, **kw) -> tuple[dict, bytes]:
    folder = write_peft_folder(make_adapter(fp, p, seed, **kw), tmp_path / f"peft-{p}-{seed}")
    config_raw, weights_raw = read_peft_folder(folder)
    return json.loads(config_raw), weights_raw


def refuse_peft(cfg, weights: bytes, fp, head, error=InvalidAdapter, config_raw: bytes | None = None) -> str:
    raw = config_raw if config_raw is not None else json.dumps(cfg).encode()
    with pytest.raises(error) as info:
        peft_to_blob(raw, weights, fp, "minilm", head, list(MINILM_LABELS))
    assert type(info.value) is error
    return info.value.message
