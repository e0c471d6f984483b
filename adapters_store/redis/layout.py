"""Where things live in Redis, under a store's key prefix.

Per adapter, under ``<prefix>:{<tenant>/<name>}`` (braces: a cluster hash tag, so one adapter's keys share a
slot and one script may touch them all): ``:cur`` (current version's info JSON), ``:blob:<N>``, ``:info:<N>``,
``:versions`` (set of live N) and ``:next`` (INCR counter; survives deletes, so versions stay monotonic).
Per tenant, ``<prefix>:idx:{<tenant>}``: a sorted set of its adapter names; ``<prefix>:idx-ready`` marks a store
whose older adapters were added to it. Puts and deletes are announced on ``<prefix>:events``; tenant keys live in
the hash ``<prefix>:apikeys``.
"""
from __future__ import annotations

import re

from ptserve.adapters_store.ids import AdapterId

CUR, NEXT, VERSIONS, BLOB, INFO = ":cur", ":next", ":versions", ":blob:", ":info:"  # after "<prefix>:{<id>}"
EVENTS = ":events"  # after "<prefix>": the change-feed channel
IDX, IDX_READY = ":idx:", ":idx-ready"  # after "<prefix>": a tenant's index (then "{<tenant>}"), its marker
API_KEYS = ":apikeys"  # after "<prefix>": the tenant keys' hash


def adapter_base(prefix: str, adapter_id: AdapterId) -> str:
    """``<prefix>:{<tenant>/<name>}``, the stem of every key of one adapter."""
    adapter_id = AdapterId.of(adapter_id.tenant, adapter_id.name)  # an unchecked '}' would break the tag
    return f"{prefix}:{{{adapter_id}}}"


def index_key(prefix: str, tenant: str) -> str:
    return f"{prefix}{IDX}{{{tenant}}}"


def cur_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of every adapter's ``:cur`` key (the prefix's glob specials escaped)."""
    return f"{_glob_escape(prefix)}:{{*/*}}{CUR}"


def id_of_cur_key(prefix: str, key: bytes) -> AdapterId:
    """The adapter a ``:cur`` key belongs to (``InvalidAdapterId`` or ``UnicodeDecodeError`` when none)."""
    head, tail = len(prefix) + 2, -len("}" + CUR)  # "<prefix>:{" id "}:cur"
    return AdapterId.parse(key[head:tail].decode())


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
