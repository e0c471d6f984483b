"""Decode-level validation of PEFT folders (adapter_config.json + adapter_model.safetensors): a valid folder
converts to an equal adapter; every malformed one is refused with a typed error that says why."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter, PayloadTooLarge
from ptserve.adapters_store.format import PREFIX_KEY
from ptserve.adapters_store.peft_folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    parse_labels,
    peft_to_blob,
    read_peft_folder,
    write_peft_folder,
)
from ptserve.adapters_store.validation import Limits, decode_blob
from tests.adapters_store.refusals import peft_files, refuse_peft
from tests.factories import MINILM_LABELS, make_adapter


def test_valid_peft_folder_converts_to_an_equal_adapter(fp, head, tmp_path):
    adapter = make_adapter(fp, 5, seed=7)
    folder = write_peft_folder(adapter, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["num_virtual_tokens"]) == ("PREFIX_TUNING", "SEQ_CLS", 5)
    assert (cfg["num_layers"], cfg["token_dim"], cfg["num_attention_heads"]) == (
        fp.num_layers, fp.token_dim, fp.num_kv_heads)

    blob, converted, notes = peft_to_blob(*read_peft_folder(folder), fp, "minilm", head, list(MINILM_LABELS))
    assert notes == []
    assert converted.config == adapter.config
    assert sorted(converted.tensors) == sorted(adapter.tensors)
    for name, t in adapter.tensors.items():
        assert torch.equal(converted.tensors[name], t), name
    # the blob it produced decodes to the same adapter, and converts back to the same PEFT folder
    again = decode_blob(blob, fp, head)
    assert again.config == adapter.config
    assert all(torch.equal(again.tensors[k], t) for k, t in adapter.tensors.items())
    folder2 = write_peft_folder(again, tmp_path / "peft2")
    assert json.loads((folder2 / CONFIG_FILE).read_text()) == cfg
    blob2, converted2, _ = peft_to_blob(*read_peft_folder(folder2), fp, "minilm", head, list(MINILM_LABELS))
    assert all(torch.equal(converted2.tensors[k], t) for k, t in adapter.tensors.items())
    assert decode_blob(blob2, fp, head).config == adapter.config


def test_peft_folder_without_labels_gets_generic_labels(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    _, adapter, _ = peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head)
    assert adapter.config.labels == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_peft_folder_with_another_base_model_name_is_accepted_with_a_note(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    cfg["base_model_name_or_path"] = "/home/someone/models/all-MiniLM-L6-v2"
    _, adapter, notes = peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head, list(MINILM_LABELS))
    assert adapter.config.base_model_name_or_path == "/home/someone/models/all-MiniLM-L6-v2"
    assert len(notes) == 1 and "/home/someone/models/all-MiniLM-L6-v2" in notes[0] and "'minilm'" in notes[0]


def test_generate_peft_folder_converts(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path, task="generate")
    assert cfg["task_type"] == "CAUSAL_LM"
    _, adapter, _ = peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head)
    assert adapter.config.task == "generate" and adapter.config.labels == () and adapter.config.head is None


@pytest.mark.parametrize("peft_type", ["LORA", "P_TUNING", "PROMPT_TUNING", None])
def test_peft_folder_with_wrong_peft_type_is_refused(fp, head, tmp_path, peft_type):
    cfg, weights = peft_files(fp, tmp_path)
    cfg["peft_type"] = peft_type
    message = refuse_peft(cfg, weights, fp, head)
    assert f"peft_type is {peft_type!r}" in message and "PREFIX_TUNING" in message


def test_peft_folder_with_wrong_task_type_is_refused(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    cfg["task_type"] = "TOKEN_CLS"
    assert "task_type 'TOKEN_CLS'" in refuse_peft(cfg, weights, fp, head)


@pytest.mark.parametrize("field,value", [("num_layers", 12), ("token_dim", 768), ("num_attention_heads", 6)])
def test_peft_folder_with_wrong_geometry_is_a_backbone_mismatch(fp, head, tmp_path, field, value):
    cfg, weights = peft_files(fp, tmp_path)
    cfg[field] = value
    message = refuse_peft(cfg, weights, fp, head, BackboneMismatch)
    assert f"{field}: adapter has {value}, server has {cfg_value(fp, field)}" in message


def cfg_value(fp, field):
    return {"num_layers": fp.num_layers, "token_dim": fp.token_dim, "num_attention_heads": fp.num_kv_heads}[field]


@pytest.mark.parametrize("raw,expected", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_peft_folder_with_bad_config_json_is_refused(fp, head, tmp_path, raw, expected):
    _, weights = peft_files(fp, tmp_path)
    assert expected in refuse_peft(None, weights, fp, head, config_raw=raw)


def test_peft_folder_with_non_integer_geometry_is_refused(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    cfg["num_layers"] = "6"
    assert "'num_layers' must be an integer" in refuse_peft(cfg, weights, fp, head)


def test_peft_folder_whose_weights_disagree_with_its_config_is_refused(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path, p=4)
    cfg["num_virtual_tokens"] = 6
    message = refuse_peft(cfg, weights, fp, head)
    assert f"'{PREFIX_KEY}' has shape [4, {fp.prefix_width}], expected [6, {fp.prefix_width}]" in message


def test_peft_folder_with_bad_weights_is_refused(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    assert "pickle" in refuse_peft(cfg, pickle.dumps({"x": 1}), fp, head)
    assert "truncated" in refuse_peft(cfg, weights[: len(weights) // 2], fp, head)
    tensors = make_adapter(fp, 4).tensors
    nan = {PREFIX_KEY: tensors[PREFIX_KEY].clone(), "base_model.classifier.weight": tensors["classifier.weight"],
           "base_model.classifier.bias": tensors["classifier.bias"]}
    nan[PREFIX_KEY][0, 0] = float("nan")
    assert "NaN or Inf" in refuse_peft(cfg, st_save(nan), fp, head)
    stray = {**nan, PREFIX_KEY: tensors[PREFIX_KEY], "base_model.encoder.layer.0.weight": torch.zeros(2)}
    assert "unexpected tensor 'base_model.encoder.layer.0.weight'" in refuse_peft(cfg, st_save(stray), fp, head)
    as_f64 = {**nan, PREFIX_KEY: tensors[PREFIX_KEY].double()}
    assert "dtype F64" in refuse_peft(cfg, st_save(as_f64), fp, head)


def test_peft_weights_over_the_size_limit_are_refused(fp, head, tmp_path):
    cfg, weights = peft_files(fp, tmp_path)
    with pytest.raises(PayloadTooLarge, match=f"at most {len(weights) - 1}"):
        peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head, None, Limits(max_bytes=len(weights) - 1))


def test_adapter_config_json_nested_deep_within_the_size_cap_is_refused(fp, head, tmp_path):
    _, weights = peft_files(fp, tmp_path)
    raw = b'{"peft_type": "PREFIX_TUNING", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(raw) < 64 << 10
    assert "nests deeper than" in refuse_peft(None, weights, fp, head, config_raw=raw)
    assert "NaN is not a JSON number" in refuse_peft(None, weights, fp, head, config_raw=b'{"num_layers": NaN}')


@pytest.mark.parametrize("change,needle", [
    ({"task_type": ["SEQ_CLS"]}, "task_type ['SEQ_CLS'] is not one of"),
    ({"task_type": {"a": 1}}, "is not one of"),
    ({"base_model_name_or_path": ["m"]}, "'base_model_name_or_path' must be a string or null"),
    ({"num_layers": 6.0}, "'num_layers' must be an integer"),
])
def test_peft_config_fields_of_the_wrong_types_are_refused(fp, head, tmp_path, change, needle):
    cfg, weights = peft_files(fp, tmp_path)
    assert needle in refuse_peft({**cfg, **change}, weights, fp, head)


@pytest.mark.parametrize("raw", ["[" * 50_000, '["a", "\\ud800"]', '"negative"', '[1, 2]', "a,b", "[NaN]",
                                 '["x"' + ', "y"' * 300_000 + "]"])
def test_hostile_labels_field_is_refused(raw):
    with pytest.raises(InvalidAdapter, match="labels must be a JSON list of strings"):
        parse_labels(raw)


def test_labels_field_reads_a_json_list_of_strings():
    assert parse_labels('["négatif", "positive"]') == ["négatif", "positive"]
