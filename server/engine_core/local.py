"""The engine in this process: the adapter cache with its leases, the batcher and the engine that runs its passes.

Used by a single-process server (``PTSERVE_API_WORKERS=0``), by tests and benchmarks, and by the engine core
process, which serves every API worker's requests through this same class. Leases live here, not in the HTTP
coroutine: an adapter is leased from before its rows are queued until the pass that holds them has finished,
even when the request's deadline passed meanwhile (the caller gets its 504 at once; the lease outlives it).
Generation alike: a request's lease is held until the engine released every one of its sequences
(``local_stream``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from ptserve.adapters_store.errors import WrongTask
from ptserve.adapters_store.ids import AdapterId
from ptserve.server.adapters import AdapterService
from ptserve.server.batcher import Batcher
from ptserve.server.engine import Engine, Row
from ptserve.server.engine_core.client import AdapterMeta, Encoded, GenerationRoom, VersionChanged
from ptserve.server.engine_core.local_stream import LocalTokenStream
from ptserve.server.generation.engine import GenerationEngine
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.sequence import SamplingParams
from ptserve.server.limits import DeadlineExceeded, QueueFull

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


def hold_lease(lease: AsyncExitStack, settled: Callable[[], bool], holds: set[asyncio.Task]) -> None:
    """Keep ``lease`` past its request until ``settled()`` (blocking, run off the loop) says the engine no
    longer uses the adapter's tensors, or it gave up after ``LEASE_HOLD_LIMIT_S`` (False)."""
    async def hold() -> None:
        try:
            if not await asyncio.to_thread(settled):
                log.warning("a lease outlived its request by %.0f s; released", LEASE_HOLD_LIMIT_S)
        finally:
            await lease.aclose()

    task = asyncio.get_running_loop().create_task(hold(), name="ptserve-lease-hold")
    holds.add(task)
    task.add_done_callback(holds.discard)


class LocalEngineClient:
    """Encoder backbones: ``batcher`` and ``watch`` (``engine`` an ``Engine``); decoder LMs: ``runner`` (``engine``
    its ``GenerationEngine``), with at most ``max_waiting`` sequences waiting for it."""

    def __init__(self, adapters: AdapterService, batcher: Batcher | None, engine: Engine | GenerationEngine,
                 watch: PassWatch | None, facts: Callable[[], dict] = dict, runner: GenerationRunner | None = None,
                 max_waiting: int = 0):
        self.adapters, self.batcher, self.engine, self.watch = adapters, batcher, engine, watch
        self.runner, self.max_waiting = runner, max_waiting
        self._facts = facts  # the engine's side of /readyz (device, dtype, threads, planner)
        self._holds: set[asyncio.Task] = set()  # leases kept past their request, until its pass ends

    available = True

    @property
    def idle(self) -> bool:
        return ((self.batcher is None or self.batcher.idle) and not self._holds
                and (self.runner is None or self.runner.running == 0 and self.runner.waiting == 0))

    async def adapter_meta(self, adapter_id: AdapterId) -> AdapterMeta:
        r = await self.adapters.resident(adapter_id)
        room = None
        if self.runner is not None and r.config.task == "generate":
            e = self.engine
            room = GenerationRoom(e.room(r), e.cache.prefix_cap, e.vocab_size, e.eos_ids)
        return AdapterMeta(r.id, r.version, r.config.task, tuple(r.labels), r.num_virtual_tokens, room)

    async def generate(
        self, adapter_id: AdapterId, version: int, prompts: list[list[int]], params: list[SamplingParams],
        tenant: str,
    ) -> LocalTokenStream:
        runner = self.runner
        if runner is None:
            raise WrongTask("this backbone is an encoder: it serves /v1/classify, not generation")
        if runner.waiting + len(prompts) > self.max_waiting:
            raise QueueFull(f"{runner.waiting} requests are waiting to generate; retry later", retry_after=1.0)
        lease = AsyncExitStack()
        try:
            resident = await lease.enter_async_context(self.adapters.lease(adapter_id))
            if resident.version != version:
                raise VersionChanged(str(adapter_id), version, resident.version)
            if resident.config.task != "generate":
                raise WrongTask(f"adapter {adapter_id} is a {resident.config.task!r} adapter; use /v1/classify")
            seqs = [self.engine.new_sequence(resident, ids, replace(p, stop=()), detokenize=False)
                    for ids, p in zip(prompts, params)]  # tokens only: the API makes the text, stops included
        except BaseException:
            await lease.aclose()
            raise
        return LocalTokenStream(runner, seqs, lease, self._hold_until_released)

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
        hold_lease(lease, lambda: self.watch.wait_settled(self.batcher, LEASE_HOLD_LIMIT_S), self._holds)

    def _hold_until_released(self, lease: AsyncExitStack, seqs: list) -> None:
        """A generation that ended early (disconnect, deadline, stop string): its sequences' KV rows and prefix
        are read until the engine's next step lets them go (issue 12 item 2)."""
        def released() -> bool:
            end = time.monotonic() + LEASE_HOLD_LIMIT_S
            return all(s.released.wait(max(0.0, end - time.monotonic())) for s in seqs)

        hold_lease(lease, released, self._holds)

    async def health(self) -> dict:
        return {**self._facts(), "resident_adapters": len(self.adapters.cache)}
