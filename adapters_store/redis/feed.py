"""The change feed: puts and deletes announced on ``<prefix>:events`` (by the scripts), followed over pub/sub
with resubscription after every lost connection and a PING on a quiet channel."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from typing import Awaitable, Callable

import redis.asyncio
import redis.exceptions as rex

from ptserve.adapters_store.errors import InvalidAdapterId, StoreUnavailable
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.redis.connection import UNAVAILABLE

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0

OnEvent = Callable[[AdapterId, "int | None"], "Awaitable[None] | None"]
OnResync = Callable[[], "Awaitable[None] | None"]


class ChangeFeed:
    def __init__(self, client: redis.asyncio.Redis, channel: str, timeout_s: float,
                 health_check_interval: float):
        self._redis, self.channel = client, channel
        self.timeout_s, self.health_check_interval = timeout_s, health_check_interval
        self.connected = False  # the subscription is up (for readiness reporting)
        self._closing = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def watch(self, on_event: OnEvent, on_resync: OnResync) -> None:
        """Follow the channel until cancelled or closed: ``on_event(id, version)`` per put (version None:
        deleted). Pub/sub drops messages while disconnected, so ``on_resync()`` runs after every (re)connect, the
        first included. A lost connection is retried with backoff (0.1 s doubling to 2 s), with one warning per
        outage."""
        self._task, loop = asyncio.current_task(), asyncio.get_running_loop()
        delay, down_since = BACKOFF_MIN_S, None
        while not self._closing.is_set():
            pubsub = self._redis.pubsub()
            try:
                await self._subscribe(pubsub)
                self.connected = True
                await _call(on_resync)
                if down_since is not None:
                    log.warning("adapter store change feed back after %.1f s", loop.time() - down_since)
                delay, down_since = BACKOFF_MIN_S, None
                await self._pump(pubsub, on_event)
            except (*UNAVAILABLE, StoreUnavailable) as e:
                if down_since is None:
                    down_since = loop.time()
                    log.warning("adapter store change feed lost (%s: %s); reconnecting", type(e).__name__, e)
            except Exception:  # a callback failed: what it missed is unknown, so resubscribe and resync
                log.exception("adapter store change feed callback failed; resubscribing")
            finally:
                self.connected = False
                with contextlib.suppress(Exception):  # closing what is already broken
                    await pubsub.aclose()
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
            except asyncio.TimeoutError:
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def close(self) -> None:
        """Stop a running ``watch`` (its pub/sub connection closes with it), waiting at most ``timeout_s``."""
        self._closing.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=self.timeout_s)

    async def _subscribe(self, pubsub) -> None:
        await pubsub.subscribe(self.channel)
        msg = await pubsub.get_message(timeout=self.timeout_s)
        if msg is None or msg["type"] != "subscribe":
            raise rex.TimeoutError(f"no confirmation of SUBSCRIBE {self.channel} within {self.timeout_s} s")

    async def _pump(self, pubsub, on_event: OnEvent) -> None:
        """Deliver messages. A channel quiet for ``health_check_interval`` gets a PING; a connection that
        does not answer it within ``timeout_s`` is given up (a silent peer would otherwise look like calm)."""
        loop = asyncio.get_running_loop()
        heard, pinged = loop.time(), None
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(self.timeout_s, 0.5))
            now = loop.time()
            if msg is not None:
                heard, pinged = now, None
                if msg["type"] == "message" and (event := parse_event(msg["data"])):
                    await _call(on_event, *event)
            elif pinged is not None and now - pinged > self.timeout_s:
                raise rex.TimeoutError(f"no answer to PING on {self.channel} within {self.timeout_s} s")
            elif pinged is None and now - heard > self.health_check_interval:
                await pubsub.ping()
                pinged = now


def parse_event(data: bytes) -> tuple[AdapterId, int | None] | None:
    """(id, version) of a put, (id, None) of a delete; None (and a warning) for anything else."""
    try:
        event = json.loads(data)
        if event["op"] not in ("put", "delete"):
            raise ValueError(f"unknown op {event['op']!r}")
        return AdapterId.parse(event["id"]), int(event["version"]) if event["op"] == "put" else None
    except (ValueError, KeyError, TypeError, InvalidAdapterId) as e:
        log.warning("ignoring malformed adapter store event %r: %s", data[:200], e)
        return None


async def _call(fn, *args) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result
