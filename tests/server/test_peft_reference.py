"""PEFT as the numerical reference.

In process (transformers 5.x): PEFT FEATURE_EXTRACTION prefix tuning gives the backbone outputs that ptserve's
mixed batches must reproduce row by row. Out of process (PEFT SEQ_CLS needs transformers 4.57, see DESIGN):
``scripts/peft_reference.py`` run by ``PTSERVE_REF_PYTHON`` makes PEFT adapters and logits; they are uploaded as PEFT
folders over HTTP and the server's logits must match PEFT's; ptserve's export must load in PEFT with equal logits.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, write_peft_folder
from ptserve.adapters_store.validation import decode_blob
from ptserve.server.engine import Row
from tests.factories import make_adapter, running_server

TEXTS = [
    "I loved this film.",
    "The service was slow and the food was cold, which ruined an otherwise pleasant evening by the river.",
    "ok",
    "Shipping took three weeks; the box arrived crushed but the lamp itself works fine.",
]
REF_PYTHON = os.environ.get("PTSERVE_REF_PYTHON")


def test_mixed_batch_matches_peft_feature_extraction(minilm, minilm_engine):
    from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel

    fp = minilm.fingerprint
    adapters = [make_adapter(fp, p, seed=p) for p in (1, 8, 16, 64)]
    residents = [minilm_engine.make_resident(a, f"t/p{a.config.num_virtual_tokens}", 1) for a in adapters]
    rows = [Row(r, minilm_engine.tokenize([t], r.num_virtual_tokens)[0]) for r in residents for t in TEXTS]
    ours, _ = minilm_engine.encode(rows)

    base = AutoModel.from_pretrained(minilm.path, attn_implementation="eager").eval()
    for adapter in adapters:
        peft = get_peft_model(
            base, PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                     num_virtual_tokens=adapter.config.num_virtual_tokens)
        ).eval()
        set_peft_model_state_dict(peft, {"prompt_embeddings": adapter.prompt_embeddings})
        for text in TEXTS:
            i = next(k for k, r in enumerate(rows) if r.adapter.config is adapter.config and
                     r.input_ids == minilm_engine.tokenize([text], adapter.config.num_virtual_tokens)[0])
            with torch.no_grad():
                ref = peft(**minilm.tokenizer([text], return_tensors="pt"))
            n = len(rows[i].input_ids)
            assert (ref.last_hidden_state[0] - ours.hidden[i, :n]).abs().max() <= 1e-5
            assert (ref.pooler_output[0] - ours.pooled[i]).abs().max() <= 1e-5
        base = peft.unload() if hasattr(peft, "unload") else peft.base_model


def _ref(*args: str) -> dict:
    proc = subprocess.run([REF_PYTHON, "scripts/peft_reference.py", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# PEFT's answers do not depend on which server (``server_modes``) is checked against them: each reference
# subprocess (seconds: torch, transformers 4.57 and PEFT load anew) runs once per input for the module and both
# modes compare with its result. The key is the input itself, for ``logits`` the exported folder's bytes, so a
# server whose export differed would get a reference of its own.
_REFERENCES: dict[tuple, tuple[Path, torch.Tensor]] = {}


def _peft_made(minilm, out: Path, texts_file: Path, virtual_tokens: int) -> tuple[Path, torch.Tensor]:
    """(PEFT SEQ_CLS folder, PEFT's logits for TEXTS) of ``scripts/peft_reference.py make``."""
    key = ("make", virtual_tokens)
    if key not in _REFERENCES:
        folder, result = out / f"peft{virtual_tokens}", out / f"ref{virtual_tokens}.json"
        _ref("make", "--model", minilm.path, "--out", str(folder), "--virtual-tokens", str(virtual_tokens),
             "--labels", "3", "--seed", str(virtual_tokens), "--texts", str(texts_file), "--result", str(result))
        _REFERENCES[key] = folder, torch.tensor(json.loads(result.read_text())["logits"])
    return _REFERENCES[key]


def _peft_logits(minilm, folder: Path, texts_file: Path) -> torch.Tensor:
    """PEFT's logits for TEXTS with the PEFT folder ``folder`` (``scripts/peft_reference.py logits``)."""
    key = ("logits", *((folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)))
    if key not in _REFERENCES:
        result = folder.parent / "ref.json"
        _ref("logits", "--model", minilm.path, "--adapter", str(folder), "--texts", str(texts_file),
             "--result", str(result))
        _REFERENCES[key] = folder, torch.tensor(json.loads(result.read_text())["logits"])
    return _REFERENCES[key][1]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.json"
    path.write_text(json.dumps(TEXTS))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_modes):
    with running_server({"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}"}) as url:
        yield url


@pytest.mark.peft_ref
@pytest.mark.parametrize("virtual_tokens", [4, 16])
def test_peft_seq_cls_folder_served_with_peft_logits(minilm, server, texts_file, virtual_tokens):
    folder, reference = _peft_made(minilm, texts_file.parent, texts_file, virtual_tokens)

    files = {name: (name, (folder / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    up = httpx.put(f"{server}/v1/adapters/acme/peft{virtual_tokens}", files=files, timeout=30)
    assert up.status_code == 201, up.text
    assert up.json()["num_virtual_tokens"] == virtual_tokens
    got = httpx.post(f"{server}/v1/classify", json={
        "adapter": f"acme/peft{virtual_tokens}", "inputs": TEXTS, "return_logits": True}, timeout=30)
    assert got.status_code == 200, got.text
    served = torch.tensor([p["logits"] for p in got.json()["predictions"]])
    assert (served - reference).abs().max() <= 1e-4
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # the texts give different answers: the check bites


@pytest.mark.peft_ref
def test_exported_peft_folder_loads_in_peft_with_same_logits(minilm, server, texts_file, tmp_path):
    blob = make_adapter(minilm.fingerprint, 12, seed=7)
    from ptserve.adapters_store.format import encode_blob

    up = httpx.put(f"{server}/v1/adapters/acme/native", content=encode_blob(blob),
                   headers={"content-type": "application/octet-stream"}, timeout=30)
    assert up.status_code == 201, up.text
    stored = httpx.get(f"{server}/v1/adapters/acme/native/blob", timeout=30).content
    folder = write_peft_folder(decode_blob(stored, minilm.fingerprint, minilm.family.head_kind), tmp_path / "export")
    reference = _peft_logits(minilm, folder, texts_file)
    got = httpx.post(f"{server}/v1/classify", json={"adapter": "acme/native", "inputs": TEXTS, "return_logits": True},
                     timeout=30)
    served = torch.tensor([p["logits"] for p in got.json()["predictions"]])
    assert (served - reference).abs().max() <= 1e-4
