"""The one reader for JSON that came from outside: request bodies, safetensors headers and their metadata, PEFT
``adapter_config.json`` and upload form fields.

Beyond ``json.loads`` it bounds size, nesting depth and integer length, accepts only RFC 8259 JSON (UTF-8, no
``NaN``/``Infinity``, no number that overflows to infinity) and only strings that are valid Unicode (no lone
surrogate such as ``"\\ud800"``, which tokenizers, log lines and UTF-8 responses cannot carry). Every refusal is a
``JSONRejected`` whose message can be shown to the sender; callers turn it into their own 4xx.
"""
from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # ptserve's own documents nest 3 levels; nobody needs 32
MAX_INT_DIGITS = 100  # the largest integer any field takes is a 64-bit seed (20 digits)


class JSONRejected(ValueError):
    """Why a JSON text was refused."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def loads(raw: bytes | str, *, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` (bytes must be UTF-8) or raise ``JSONRejected``."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise JSONRejected(f"is {len(raw)} bytes; at most {max_bytes} allowed")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:  # UTF-8 only (RFC 8259 8.1), a byte order mark ignored as it allows; json.loads would guess UTF-16/32
            raw = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JSONRejected(f"is not valid JSON: not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise JSONRejected(f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:  # the C scanner refuses to nest past the interpreter's recursion limit
        raise JSONRejected(f"nests deeper than {max_depth} levels") from None
    _check_tree(value, max_depth)
    return value


def _no_constant(name: str):
    raise JSONRejected(f"is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRejected(f"holds the number {text[:40]}, out of the range of a 64-bit float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONRejected(f"holds an integer of {len(text.lstrip('-'))} digits; at most {MAX_INT_DIGITS}")
    return int(text)


def _check_tree(value: Any, max_depth: int) -> None:
    """Nesting within ``max_depth``, every string (keys too) valid Unicode; iterative: depth costs no stack."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, (list, dict)):
            if depth >= max_depth:
                raise JSONRejected(f"nests deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key in node:
                    _check_text(key)
                node = node.values()
            stack.extend((child, depth + 1) for child in node)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JSONRejected(
            f"holds a lone surrogate (\\u{ord(text[exc.start]):04x}) in a string: text must be valid Unicode"
        ) from None
