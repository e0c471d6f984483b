"""Listing every tenant's adapters: one page of a SCAN over the ``:cur`` keys, the page's COUNT adapted so a page
holds what was asked."""
from __future__ import annotations

import redis.asyncio

from ptserve.adapters_store.errors import InvalidInput
from ptserve.adapters_store.redis.blobs import get_many, info_of
from ptserve.adapters_store.redis.layout import cur_pattern
from ptserve.adapters_store.store import Page


async def scan_page(client: redis.asyncio.Redis, prefix: str, cursor: str | None, limit: int) -> Page:
    """One page, sorted by id within the page (not across pages). ``next_cursor`` is Redis's SCAN cursor.

    COUNT doubles (up to 1000) while matches are sparse; a reply that would overfill the page is re-read from
    the same cursor with COUNT = the items still wanted, and if it still overfills a started page it is left for
    the next page. So a page holds at most ``limit`` items, unless one minimal reply alone brings more (matches
    sharing a hash bucket): those all go in.
    """
    if cursor is not None and not cursor.isdigit():
        raise InvalidInput(f"invalid list cursor {cursor!r}")
    match = cur_pattern(prefix)
    pos, keys, count = int(cursor or 0), {}, min(limit, 1000)
    while True:
        need = limit - len(keys)
        after, batch = await client.scan(pos, match=match, count=count)
        found = {k: None for k in batch if k not in keys}
        if len(found) > need and count > need:
            count = need  # re-read from the same cursor, visiting fewer buckets
            continue
        if len(found) > need and keys:
            break  # the next page starts by re-reading this reply from `pos`
        keys |= found
        pos, count = after, min(count * 2, 1000)
        if pos == 0 or len(keys) >= limit:
            break
    infos = [info_of(raw) for raw in await get_many(client, list(keys)) if raw is not None]
    return Page(items=sorted(infos, key=lambda i: i.id), next_cursor=str(pos) if pos else None)
