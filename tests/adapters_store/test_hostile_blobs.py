"""Hostile blob content (issue 10): hand-made safetensors headers and ptserve metadata get a typed 4xx error
that says why, never a crash."""
from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import save as st_save

from tests.adapters_store.refusals import refuse
from tests.factories import make_adapter


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
