"""``untrusted_json.loads``: the one reader for JSON from outside accepts what ``json.loads`` gives for plain JSON,
and refuses, with a message, what would crash or mislead the code behind it."""
from __future__ import annotations

import json

import pytest

from ptserve.adapters_store.untrusted_json import MAX_DEPTH, MAX_INT_DIGITS, JSONRejected, loads


@pytest.mark.parametrize("text", [
    '{"adapter": "acme/x", "inputs": ["h\\u00e9llo", "\\ud83d\\ude00", "\\u0000"], "n": -0, "f": -0.0}',
    '[1.5e308, -1e-320, 0, 12345678901234567890, true, null, "\\\\ud800"]',
    "[" * MAX_DEPTH + "]" * MAX_DEPTH,
    '"' + "é" * 1000 + '"',
])
def test_plain_json_reads_as_json_loads_reads_it(text):
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("raw,needle", [
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
    ('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
    ("[" * 100_000, f"deeper than {MAX_DEPTH}"),  # past the interpreter's recursion limit: no RecursionError
    ("[" * 100_000 + "]" * 100_000, f"deeper than {MAX_DEPTH}"),
    ('["\\ud800"]', "lone surrogate (\\ud800)"),
    ('{"\\udfff": 1}', "lone surrogate (\\udfff)"),  # keys too
    ('["ok", {"deep": ["\\ud83d x"]}]', "lone surrogate (\\ud83d)"),  # a high surrogate without its low half
    ("[NaN]", "NaN is not a JSON number"),
    ('{"t": Infinity}', "Infinity is not a JSON number"),
    ("-Infinity", "-Infinity is not a JSON number"),
    ("[1e400]", "out of the range"),
    ("[-1e309]", "out of the range"),
    ("[" + "9" * 5000 + "]", f"at most {MAX_INT_DIGITS}"),  # past Python's int-from-text limit too
    ("[-" + "9" * (MAX_INT_DIGITS + 1) + "]", f"at most {MAX_INT_DIGITS}"),
    ("{bad json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2", "not valid JSON"),
    ('["a" "b"]', "not valid JSON"),
    (b"\xff\xfe[\x001\x00]\x00", "not UTF-8"),  # UTF-16, which json.loads(bytes) would read
    (b'["\xed\xa0\x80"]', "not UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b'["\xc3"]', "not UTF-8"),
])
def test_json_that_would_crash_or_mislead_is_refused_with_a_reason(raw, needle):
    with pytest.raises(JSONRejected) as refused:
        loads(raw)
    assert needle in refused.value.message, refused.value.message


def test_a_utf8_byte_order_mark_is_ignored_as_rfc_8259_allows():
    assert loads(b'\xef\xbb\xbf{"a": ["\xc3\xa9"]}') == {"a": ["é"]}


def test_a_size_bound_is_checked_before_parsing():
    with pytest.raises(JSONRejected, match="is 11 bytes; at most 10"):
        loads(b'["x" , "y"]', max_bytes=10)
    assert loads(b'["x","y"]', max_bytes=9) == ["x", "y"]


def test_the_depth_bound_is_a_parameter():
    assert loads("[[[]]]", max_depth=3) == [[[]]]
    with pytest.raises(JSONRejected, match="deeper than 2"):
        loads("[[[]]]", max_depth=2)
