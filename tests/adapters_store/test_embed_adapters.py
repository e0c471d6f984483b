"""Adapters of task ``embed`` (a prefix, no head): as ptserve blobs and as PEFT FEATURE_EXTRACTION folders, both
ways without loss; a head, labels or a foreign geometry are refused with the reason."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter
from ptserve.adapters_store.format import PREFIX_KEY, encode_blob
from ptserve.adapters_store.peft_folder import (
    CONFIG_FILE, WEIGHTS_FILE, blob_to_peft_folder, peft_to_blob, read_peft_folder, write_peft_folder,
)
from ptserve.adapters_store.validation import decode_blob
from tests.factories import make_adapter


def test_embed_blob_round_trips(fp, head):
    adapter = make_adapter(fp, 6, seed=1, task="embed")
    decoded = decode_blob(encode_blob(adapter), fp, head)
    assert decoded.config == adapter.config
    assert (decoded.config.task, decoded.config.labels, decoded.config.head) == ("embed", (), None)
    assert list(decoded.tensors) == [PREFIX_KEY] and torch.equal(decoded.prompt_embeddings, adapter.prompt_embeddings)


@pytest.mark.parametrize("change", ["labels", "head", "head-tensor"])
def test_embed_blob_with_a_head_or_labels_is_refused(fp, head, change):
    adapter = make_adapter(fp, 4, seed=2, task="embed")
    tensors = dict(adapter.tensors)
    if change == "labels":
        config = dataclasses.replace(adapter.config, labels=("a", "b"))
    elif change == "head":
        config = dataclasses.replace(adapter.config, head=head)
    else:
        config = adapter.config
        tensors["classifier.weight"] = torch.zeros(2, fp.hidden_size)
    blob = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=config.to_metadata())
    with pytest.raises(InvalidAdapter) as info:
        decode_blob(blob, fp, head)
    expected = "unexpected ['classifier.weight']" if change == "head-tensor" else "task 'embed' carries no head"
    assert expected in info.value.message


def test_embed_adapter_exports_as_a_feature_extraction_folder_and_back(fp, head, tmp_path):
    adapter = make_adapter(fp, 5, seed=3, task="embed")
    folder = blob_to_peft_folder(encode_blob(adapter), tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no labels.json
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["num_virtual_tokens"]) == ("PREFIX_TUNING", "FEATURE_EXTRACTION", 5)
    assert cfg["modules_to_save"] is None
    blob, converted, notes = peft_to_blob(*read_peft_folder(folder), fp, "minilm", head)
    assert notes == [] and converted.config == adapter.config
    assert torch.equal(converted.prompt_embeddings, adapter.prompt_embeddings)
    assert decode_blob(blob, fp, head).config.task == "embed"


def test_feature_extraction_folder_loads_in_peft(minilm, tmp_path):
    """PEFT reads the exported folder as its own FEATURE_EXTRACTION prefix with the same prompt embeddings."""
    from peft import PeftModel
    from transformers import AutoModel

    adapter = make_adapter(minilm.fingerprint, 7, seed=4, task="embed")
    folder = write_peft_folder(adapter, tmp_path / "peft")
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm.path, attn_implementation="eager"), folder)
    assert model.peft_config["default"].task_type == "FEATURE_EXTRACTION"
    loaded = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded, adapter.prompt_embeddings)


def test_feature_extraction_folder_with_extra_tensors_or_another_geometry_is_refused(fp, head, tmp_path):
    folder = write_peft_folder(make_adapter(fp, 4, seed=5, task="embed"), tmp_path / "peft")
    config_raw, weights_raw = read_peft_folder(folder)
    with_head = st_save({PREFIX_KEY: torch.zeros(4, fp.prefix_width), "base_model.classifier.weight": torch.zeros(2, 3)})
    with pytest.raises(InvalidAdapter, match="unexpected tensor 'base_model.classifier.weight'"):
        peft_to_blob(config_raw, with_head, fp, "minilm", head)
    other = json.dumps({**json.loads(config_raw), "num_layers": fp.num_layers + 6}).encode()
    with pytest.raises(BackboneMismatch, match=f"num_layers: adapter has {fp.num_layers + 6}"):
        peft_to_blob(other, weights_raw, fp, "minilm", head)
