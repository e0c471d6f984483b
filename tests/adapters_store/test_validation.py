"""Decode-level validation: every malformed blob or PEFT folder is refused with a typed error that says why."""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter, PayloadTooLarge
from ptserve.adapters_store.format import PREFIX_KEY, Adapter, AdapterConfig, encode_blob
from ptserve.adapters_store.peft_folder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    parse_labels,
    peft_to_blob,
    read_peft_folder,
    write_peft_folder,
)
from ptserve.adapters_store.validation import Limits, decode_blob
from tests.factories import MINILM_LABELS, make_adapter, make_blob


@pytest.fixture(scope="module")
def fp(minilm):
    return minilm.fingerprint


@pytest.fixture(scope="module")
def head(minilm):
    return minilm.family.head_kind


@pytest.fixture(scope="module")
def blob(fp):
    return make_blob(fp, 4, seed=1)


def raw_blob(tensors: dict[str, torch.Tensor], config: AdapterConfig | None) -> bytes:
    """A safetensors file with exactly these tensors and (when given) this ptserve metadata, unchecked."""
    return st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata=config.to_metadata() if config else None)


def refuse(data: bytes, fp, head, error=InvalidAdapter, match: str | None = None, limits: Limits = Limits()) -> str:
    with pytest.raises(error, match=match) as info:
        decode_blob(data, fp, head, limits)
    assert type(info.value) is error  # BackboneMismatch subclasses InvalidAdapter: be exact
    return info.value.message


# --- the valid case -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 16])
def test_valid_blob_round_trips(fp, head, p):
    adapter = make_adapter(fp, p, seed=3)
    decoded = decode_blob(encode_blob(adapter), fp, head)
    assert decoded.config == adapter.config
    assert sorted(decoded.tensors) == sorted(adapter.tensors) == ["classifier.bias", "classifier.weight", PREFIX_KEY]
    for name, t in adapter.tensors.items():
        assert decoded.tensors[name].dtype == t.dtype
        assert torch.equal(decoded.tensors[name], t), name
    assert decoded.prompt_embeddings.shape == (p, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)


def test_valid_generate_and_half_precision_blobs_decode(fp, head):
    gen = make_adapter(fp, 3, task="generate")
    assert decode_blob(encode_blob(gen), fp, head).config.task == "generate"
    half = make_adapter(fp, 3)
    half.tensors = {k: v.to(torch.bfloat16) for k, v in half.tensors.items()}
    out = decode_blob(encode_blob(half), fp, head)
    assert out.prompt_embeddings.dtype == torch.bfloat16
    assert torch.equal(out.prompt_embeddings, half.prompt_embeddings)


# --- structure of the file ----------------------------------------------------------------------------------
def test_truncated_blob_is_refused_at_every_kind_of_cut(fp, head, blob):
    (header_len,) = struct.unpack("<Q", blob[:8])
    cuts = {
        "empty": 0,
        "inside length prefix": 5,
        "just after length prefix": 8,
        "inside header": 8 + header_len // 2,
        "at end of header": 8 + header_len,
        "inside data": 8 + header_len + 100,
        "one byte short": len(blob) - 1,
    }
    for where, cut in cuts.items():
        message = refuse(blob[:cut], fp, head, InvalidAdapter)
        assert "truncated" in message, (where, message)


def test_pickle_is_refused_without_unpickling(fp, head, tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for data in (pickle.dumps({"prompt_embeddings": [1.0, 2.0]}), pickle.dumps(Boom())):
        message = refuse(data, fp, head, InvalidAdapter)
        assert "pickle" in message and "safetensors" in message
    assert not marker.exists()

    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(4, fp.prefix_width)}, buf)
    assert buf.getvalue()[:2] == b"PK"
    message = refuse(buf.getvalue(), fp, head, InvalidAdapter)
    assert "pickle" in message and "torch.save" in message


def blob_with_header_length(fp, target: int) -> bytes:
    """A valid blob whose safetensors header is exactly ``target`` bytes (padded via the base model name)."""
    adapter = make_adapter(fp, 2)
    (base,) = struct.unpack("<Q", encode_blob(adapter)[:8])
    for n in range(max(0, target - base - 8), target):
        config = dataclasses.replace(adapter.config, base_model_name_or_path="m" * n)
        data = encode_blob(Adapter(config, adapter.tensors))
        (length,) = struct.unpack("<Q", data[:8])
        if length == target:
            return data
        assert length < target, "target header length must be a multiple of 8"
    raise AssertionError("unreachable")


@pytest.mark.parametrize("target", [0x380, 0x4B50], ids=["starts-0x80", "spells-PK"])
def test_valid_blob_whose_length_prefix_looks_like_pickle_magic_is_accepted(fp, head, target):
    data = blob_with_header_length(fp, target)
    assert data[:1] == b"\x80" or data[:2] == b"PK"
    assert decode_blob(data, fp, head).config.base_model_name_or_path.startswith("m")


def test_huge_header_length_claim_is_refused_before_allocating(fp, head, blob):
    data = struct.pack("<Q", 2**40) + blob[8:]
    message = refuse(data, fp, head, InvalidAdapter)
    assert str(2**40) in message and "header" in message


def test_header_that_is_not_json_is_refused(fp, head):
    body = b"this is { not json" + b" " * 14
    message = refuse(struct.pack("<Q", len(body)) + body + b"\0" * 64, fp, head, InvalidAdapter)
    assert "not JSON" in message
    not_utf8 = b"\xff\xfe" * 8
    assert "not JSON" in refuse(struct.pack("<Q", len(not_utf8)) + not_utf8, fp, head)
    array = b"[1, 2, 3]"
    assert "JSON object" in refuse(struct.pack("<Q", len(array)) + array, fp, head)


def test_missing_ptserve_metadata_is_refused(fp, head):
    tensors = make_adapter(fp, 2).tensors
    for metadata in (None, {"format": "pt"}):
        data = st_save(tensors, metadata=metadata)
        message = refuse(data, fp, head, InvalidAdapter)
        assert "'ptserve'" in message and "PEFT" in message


def test_malformed_ptserve_metadata_is_refused(fp, head):
    adapter = make_adapter(fp, 2)
    meta = adapter.config.to_metadata()
    body = json.loads(meta["ptserve"])
    cases = {
        "format": ({**body, "format": "other"}, "format"),
        "format_version": ({**body, "format_version": 99}, "format_version 99"),
        "task": ({**body, "task": "summarise"}, "task 'summarise'"),
        "num_virtual_tokens": ({**body, "num_virtual_tokens": "2"}, "num_virtual_tokens must be an integer"),
        "backbone": ({k: v for k, v in body.items() if k != "backbone"}, "malformed ptserve metadata"),
    }
    for what, (new_body, expected) in cases.items():
        data = st_save(adapter.tensors, metadata={**meta, "ptserve": json.dumps(new_body)})
        message = refuse(data, fp, head, InvalidAdapter)
        assert expected in message, (what, message)
    data = st_save(adapter.tensors, metadata={**meta, "ptserve": "{not json"})
    assert "malformed ptserve metadata" in refuse(data, fp, head, InvalidAdapter)


def test_oversize_blob_is_refused_before_parsing(fp, head, blob):
    message = refuse(blob, fp, head, PayloadTooLarge, limits=Limits(max_bytes=len(blob) - 1))
    assert f"{len(blob)} bytes" in message and f"at most {len(blob) - 1}" in message
    assert decode_blob(blob, fp, head, Limits(max_bytes=len(blob))).config.num_virtual_tokens == 4
    # size is checked first: even garbage that is too large is refused as too large
    refuse(b"\x80" * 2048, fp, head, PayloadTooLarge, limits=Limits(max_bytes=1024))


# --- names, dtypes, shapes, values --------------------------------------------------------------------------
def test_wrong_prefix_shape_is_refused(fp, head):
    adapter = make_adapter(fp, 4)
    for bad in ((4, fp.prefix_width - 1), (5, fp.prefix_width), (4, fp.num_layers, 2 * fp.token_dim)):
        tensors = {**adapter.tensors, PREFIX_KEY: torch.zeros(bad)}
        message = refuse(raw_blob(tensors, adapter.config), fp, head, InvalidAdapter)
        assert f"'{PREFIX_KEY}' has shape {list(bad)}" in message
        assert f"expected {[4, fp.prefix_width]}" in message


def test_wrong_head_shape_is_refused(fp, head):
    adapter = make_adapter(fp, 4)
    tensors = {**adapter.tensors, "classifier.weight": torch.zeros(3, fp.hidden_size + 1)}
    message = refuse(raw_blob(tensors, adapter.config), fp, head, InvalidAdapter)
    assert "'classifier.weight'" in message and f"expected {[3, fp.hidden_size]}" in message


def test_labels_not_matching_classifier_rows_are_refused(fp, head):
    adapter = make_adapter(fp, 4, labels=("a", "b", "c"))
    config = dataclasses.replace(adapter.config, labels=("a", "b"))
    message = refuse(raw_blob(adapter.tensors, config), fp, head, InvalidAdapter)
    assert "'classifier.bias'" in message or "'classifier.weight'" in message
    assert "expected [2" in message


@pytest.mark.parametrize("dtype,code", [(torch.int64, "I64"), (torch.float64, "F64"), (torch.int8, "I8")])
def test_wrong_dtype_is_refused(fp, head, dtype, code):
    adapter = make_adapter(fp, 4)
    tensors = {**adapter.tensors, PREFIX_KEY: adapter.prompt_embeddings.to(dtype)}
    message = refuse(raw_blob(tensors, adapter.config), fp, head, InvalidAdapter)
    assert f"dtype {code}" in message and "F32" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", [PREFIX_KEY, "classifier.weight"])
def test_non_finite_values_are_refused(fp, head, value, name):
    adapter = make_adapter(fp, 4)
    tensors = {k: v.clone() for k, v in adapter.tensors.items()}
    tensors[name].view(-1)[7] = value
    message = refuse(raw_blob(tensors, adapter.config), fp, head, InvalidAdapter)
    assert f"'{name}'" in message and "NaN or Inf" in message


def test_extra_and_missing_tensor_names_are_refused(fp, head):
    adapter = make_adapter(fp, 4)
    extra = {**adapter.tensors, "classifier.extra": torch.zeros(3)}
    message = refuse(raw_blob(extra, adapter.config), fp, head, InvalidAdapter)
    assert "unexpected ['classifier.extra']" in message and "missing []" in message
    missing = {k: v for k, v in adapter.tensors.items() if k != "classifier.bias"}
    message = refuse(raw_blob(missing, adapter.config), fp, head, InvalidAdapter)
    assert "missing ['classifier.bias']" in message
    no_prefix = {k: v for k, v in adapter.tensors.items() if k != PREFIX_KEY}
    assert f"missing ['{PREFIX_KEY}']" in refuse(raw_blob(no_prefix, adapter.config), fp, head, InvalidAdapter)


def test_generate_adapter_with_a_head_is_refused(fp, head):
    adapter = make_adapter(fp, 4)
    config = dataclasses.replace(adapter.config, task="generate", labels=(), head=None)
    message = refuse(raw_blob(adapter.tensors, config), fp, head, InvalidAdapter)
    assert "unexpected ['classifier.bias', 'classifier.weight']" in message


# --- config checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("num_layers", 12), ("hidden_size", 768), ("config_hash", "0" * 16),
                                         ("model_type", "roberta")])
def test_other_backbone_fingerprint_is_a_backbone_mismatch_naming_the_field(fp, head, field, value):
    adapter = make_adapter(fp, 4)
    config = dataclasses.replace(adapter.config, backbone=dataclasses.replace(fp, **{field: value}))
    message = refuse(raw_blob(adapter.tensors, config), fp, head, BackboneMismatch)
    assert f"{field}: adapter has {value!r}, server has {getattr(fp, field)!r}" in message
    assert message.count("adapter has") == 1  # only the differing field is named


def test_zero_virtual_tokens_is_refused(fp, head):
    adapter = make_adapter(fp, 4)
    config = dataclasses.replace(adapter.config, num_virtual_tokens=0)
    tensors = {**adapter.tensors, PREFIX_KEY: torch.zeros(0, fp.prefix_width)}
    message = refuse(raw_blob(tensors, config), fp, head, InvalidAdapter)
    assert "num_virtual_tokens=0" in message and "1..256" in message


def test_too_many_virtual_tokens_is_refused(fp, head):
    data = make_blob(fp, 9)
    message = refuse(data, fp, head, InvalidAdapter, limits=Limits(max_virtual_tokens=8))
    assert "num_virtual_tokens=9" in message and "1..8" in message
    assert decode_blob(data, fp, head, Limits(max_virtual_tokens=9)).config.num_virtual_tokens == 9


def test_prefix_that_leaves_no_room_for_input_is_refused(fp, head):
    p = fp.max_positions
    data = make_blob(fp, p)
    message = refuse(data, fp, head, InvalidAdapter, limits=Limits(max_virtual_tokens=p + 1))
    assert f"num_virtual_tokens={p}" in message and "no room" in message


@pytest.mark.parametrize("labels,expected", [
    (("pos", "neg", "pos"), "unique"),
    (("pos", ""), "non-empty"),
    (("x" * 129,), "128"),
])
def test_bad_labels_are_refused(fp, head, labels, expected):
    adapter = make_adapter(fp, 2, labels=labels)
    message = refuse(encode_blob(adapter), fp, head, InvalidAdapter)
    assert "labels" in message and expected in message


def test_classify_adapter_without_labels_is_refused(fp, head):
    adapter = make_adapter(fp, 2, labels=())
    assert "needs 1..1024 labels, got 0" in refuse(encode_blob(adapter), fp, head, InvalidAdapter)


def test_wrong_head_kind_is_refused(fp, head):
    adapter = make_adapter(fp, 2, head="cls_mlp")
    message = refuse(encode_blob(adapter), fp, head, InvalidAdapter)
    assert "'cls_mlp'" in message and f"expected one of {head!r}, 'mean_linear'" in message
    # a backbone without classification heads refuses classify adapters outright
    assert "serves no classification heads" in refuse(make_blob(fp, 2), fp, None, InvalidAdapter)


# --- PEFT folders -------------------------------------------------------------------------------------------
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


# --- hostile content (issue 10): a typed 4xx error, never a crash -------------------------------------------
def with_header(header: bytes, body: bytes = b"") -> bytes:
    """A safetensors file made by hand: 8-byte length, this header, this data."""
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize("header,needle", [
    (b"[" * 100_000, "nests deeper than"),
    (b'{"t": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper than"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + b"[" * 40 + b"]" * 40 + b"}}",
     "nests deeper than"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [null, null]}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": {"0": 4}}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}', "data_offsets must be two integers"),
    (b'{"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "dtype must be a string"),
    (b'{"t": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}', "dtype must be a string"),
    (b'{"t": {"dtype": null, "shape": [1], "data_offsets": [0, 4]}}', "dtype must be a string"),
    (b'{"t": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}', "shape must be a list"),
    (b'{"t": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "shape must be a list"),
    (b'{"t": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', "shape must be a list"),
    (b'{"t": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}', "shape must be a list"),
    (b'{"t": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}}', "shape must be"),
    (b'{"t": 5}', "malformed header entry"),
    (b'{"t": ["F32", [1], [0, 4]]}', "malformed header entry"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}}', "malformed header entry"),
    (b'{"t": {"dtype": "F32", "shape": [1]}}', "malformed header entry"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"ptserve": 5}}',
     "__metadata__ must map strings to strings"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": "x"}', "__metadata__"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": []}', "__metadata__"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": 0}', "__metadata__"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}', "out of the range"),
    (b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "NaN is not a JSON number"),
    (b'{"t\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "lone surrogate"),
])
def test_hostile_safetensors_header_is_refused_with_a_reason(fp, head, header, needle):
    assert needle in refuse(with_header(header, b"\0" * 4), fp, head)


@pytest.mark.parametrize("ptserve_meta,needle", [
    ("[]", "a JSON object expected, got list"),
    ("x", "malformed ptserve metadata"),
    ('"x"', "a JSON object expected, got str"),
    ("5", "a JSON object expected, got int"),
    ("null", "a JSON object expected"),
    ("[" * 50_000, "nests deeper than"),
    ('{"format": "ptserve.adapter", "format_version": 1, "task": ["classify"]}', "task ['classify']"),
])
def test_hostile_ptserve_metadata_is_refused_with_a_reason(fp, head, ptserve_meta, needle):
    data = st_save(make_adapter(fp, 2).tensors, metadata={"format": "pt", "ptserve": ptserve_meta})
    assert needle in refuse(data, fp, head)


@pytest.mark.parametrize("change,needle", [
    ({"head": ["pooler_linear"]}, "head must be a string"),
    ({"labels": "negative"}, "labels must be a list of strings"),
    ({"labels": [1, 2, 3]}, "labels must be a list of strings"),
    ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
    ({"backbone": ["bert"]}, "fingerprint must be an object"),
    ({"backbone": "bert"}, "fingerprint must be an object"),
    ({"num_virtual_tokens": 2.0}, "num_virtual_tokens must be an integer"),
    ({"format_version": True}, "format_version True is not supported"),
    ({"format_version": 1.0}, "format_version 1.0 is not supported"),
])
def test_ptserve_metadata_of_the_wrong_types_is_refused(fp, head, change, needle):
    adapter = make_adapter(fp, 2)
    body = {**json.loads(adapter.config.to_metadata()["ptserve"]), **change}
    data = st_save(adapter.tensors, metadata={"format": "pt", "ptserve": json.dumps(body)})
    assert needle in refuse(data, fp, head)


@pytest.mark.parametrize("field,value", [("num_layers", "6"), ("num_layers", True), ("head_dim", -32),
                                         ("model_type", 5), ("config_hash", None)])
def test_fingerprint_of_the_wrong_types_is_refused(fp, head, field, value):
    adapter = make_adapter(fp, 2)
    body = json.loads(adapter.config.to_metadata()["ptserve"])
    body["backbone"][field] = value
    data = st_save(adapter.tensors, metadata={"format": "pt", "ptserve": json.dumps(body)})
    assert f"fingerprint field {field!r}" in refuse(data, fp, head)


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


# --- an adapter the server can never serve is refused (issue 10 finding 7) ---------------------------------
def test_generate_adapter_is_refused_by_a_server_that_serves_classify(fp, head, tmp_path):
    gen = make_blob(fp, 2, task="generate")
    assert decode_blob(gen, fp, head).config.task == "generate"  # offline tools convert either task
    with pytest.raises(InvalidAdapter) as refused:
        decode_blob(gen, fp, head, Limits(), serves={"classify", "embed"})
    assert "'generate' adapter (PEFT task_type CAUSAL_LM) cannot be served here" in refused.value.message
    assert "serves only 'classify' and 'embed' adapters (PEFT task_type SEQ_CLS, FEATURE_EXTRACTION)" in (
        refused.value.message)
    cfg, weights = peft_files(fp, tmp_path, task="generate")
    with pytest.raises(InvalidAdapter, match="CAUSAL_LM"):
        peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head, None, Limits(), serves={"classify"})


def test_embed_adapter_is_served_by_an_encoder_and_refused_by_a_decoder(fp, head):
    embed = make_blob(fp, 2, task="embed")
    assert decode_blob(embed, fp, head, Limits(), serves={"classify", "embed"}).config.task == "embed"
    with pytest.raises(InvalidAdapter, match="'embed' adapter .* cannot be served here"):
        decode_blob(embed, fp, None, Limits(), serves={"generate"})


def test_classify_adapter_is_refused_by_a_server_that_serves_generate(fp, head, tmp_path):
    with pytest.raises(InvalidAdapter) as refused:
        decode_blob(make_blob(fp, 2), fp, None, Limits(), serves={"generate"})
    assert "'classify' adapter (PEFT task_type SEQ_CLS) cannot be served here" in refused.value.message
    cfg, weights = peft_files(fp, tmp_path)
    with pytest.raises(InvalidAdapter, match="SEQ_CLS"):
        peft_to_blob(json.dumps(cfg).encode(), weights, fp, "tiny", None, None, Limits(), serves={"generate"})
