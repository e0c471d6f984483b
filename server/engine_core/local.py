"""The engine in this process: the adapter cache with its leases, the batcher and the engine that runs its passes.

Used by a single-process server (``PTSERVE_API_WORKERS=0``), by tests and benchmarks, and by the engine core
process, which serves every API worker's requests through this same class. Leases live here, not in the HTTP
coroutine: an adapter is leased from before its rows are queued until the pass that holds them has finished,
even when the request's deadline passed meanwhile (the caller gets its 504 at once; the lease outlives it).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import AsyncExitStack
from typing import Any, Callable, Sequence

import torch

from ptserve.adapters_store.ids import AdapterId
from ptserve.server.adapters import AdapterService
from ptserve.server.batcher import Batcher
from ptserve.server.engine import Engine, Row
from ptserve.server.engine_core.client import AdapterMeta, Encoded, VersionChanged
from ptserve.server.limits import DeadlineExceeded

log = logging.getLogger(__name__)
LEASE_HOLD_LIMIT_S = 600.0  # a lease outliving its request is dropped after this even if no pass ever ended


class PassWatch:
    """Wraps the batcher's run function and counts the passes that have finished, so that a caller that gave
    up can wait until no pass that may hold its rows is still running (``wait_settled``)."""

    def __init__(self, run: Callable[[list[Row]], tuple[Sequence[Any], Any]]):
        self._run = run
        self._cond = threading.Condition()
        self.finished = 0

    def __call__(self, rows: list[Row]):
        try:
            return self._run(rows)
        finally:
            with self._cond:
                self.finished += 1
                self._cond.notify_all()

    def wait_settled(self, batcher: Batcher, timeout_s: float) -> bool:
        """Block until a pass has finished since now, or the batcher holds nothing (True), or ``timeout_s``.

        The caller cancelled its rows' futures before calling: a pass chosen after that skips them, so the only
        pass that may still use them is the one running now, or the one whose rows were chosen just before the
        cancel and which has not started yet; either finishes before any later pass."""
        end = time.monotonic() + timeout_s
        with self._cond:
            at = self.finished
            while self.finished == at:
                if batcher.idle:
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True


class LocalEngineClient:
    def __init__(self, adapters: AdapterService, batcher: Batcher, engine: Engine, watch: PassWatch,
                 facts: Callable[[], dict] = dict):
        self.adapters, self.batcher, self.engine, self.watch = adapters, batcher, engine, watch
        self._facts = facts  # the engine's side of /readyz (device, dtype, threads, planner)
        self._holds: set[asyncio.Task] = set()  # leases kept past their request, until its pass ends

    available = True

    @property
    def idle(self) -> bool:
        return self.batcher.idle and not self._holds

    async def adapter_meta(self, adapter_id: AdapterId) -> AdapterMeta:
        r = await self.adapters.resident(adapter_id)
        return AdapterMeta(r.id, r.version, r.config.task, tuple(r.labels), r.num_virtual_tokens)

    def check_room(self, tenant: str, rows: int) -> None:
        self.batcher.check_room(tenant, rows)

    def adapter_changed(self, adapter_id: AdapterId, version: int | None = None) -> None:
        pass  # the cache is this process's: AdapterService already refreshed it

    async def encode(
        self, adapter_id: AdapterId | None, version: int, token_ids: list[tuple[int, ...]], output: str,
        tenant: str, timeout_s: float,
    ) -> Encoded:
        deadline = time.monotonic() + timeout_s
        stack = AsyncExitStack()
        try:
            if adapter_id is None:
                resident = self.engine.bare
            else:
                resident = await stack.enter_async_context(self.adapters.lease(adapter_id))
                if resident.version != version:
                    raise VersionChanged(str(adapter_id), version, resident.version)
            rows = [Row(resident, ids, output) for ids in token_ids]
            try:
                outputs = await self.batcher.submit(rows, [r.length for r in rows], tenant, deadline)
            except (DeadlineExceeded, asyncio.CancelledError):
                self._hold_until_settled(stack.pop_all())  # the rows may be in the running pass
                raise
        finally:
            await stack.aclose()
        return Encoded(resident.id, resident.version, torch.stack(outputs) if outputs else torch.empty(0),
                       tuple(resident.labels))

    def _hold_until_settled(self, lease: AsyncExitStack) -> None:
        async def hold() -> None:
            try:
                settled = await asyncio.to_thread(self.watch.wait_settled, self.batcher, LEASE_HOLD_LIMIT_S)
                if not settled:
                    log.warning("a lease outlived its request by %.0f s; released", LEASE_HOLD_LIMIT_S)
            finally:
                await lease.aclose()

        task = asyncio.get_running_loop().create_task(hold(), name="ptserve-lease-hold")
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)

    async def health(self) -> dict:
        return {**self._facts(), "resident_adapters": len(self.adapters.cache)}
