"""Decode-level validation of adapter blobs: a valid blob round-trips; every malformed one is refused with a
typed error that says why."""
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
from ptserve.adapters_store.format import PREFIX_KEY, Adapter, encode_blob
from ptserve.adapters_store.validation import Limits, decode_blob
from tests.adapters_store.refusals import raw_blob, refuse
from tests.factories import make_adapter, make_blob


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
