"""The batcher: an asyncio queue that collects rows from any tenants and runs them in shared forward passes.

Callers ``submit`` rows and await their own results. One loop drains the queue: it waits up to ``max_wait_ms``
for a batch to fill (rows that already waited behind a running pass go at once), plans passes with
``plan_batches`` and runs each on a single worker thread, so the event loop never blocks on torch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from server.batch_plan import BatchPolicy, plan_batches

log = logging.getLogger(__name__)
Item = TypeVar("Item")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    length: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PassReport:
    """What one forward pass did, for metrics."""

    rows: int
    queue_wait_s: list[float]
    run_s: float
    stats: Any  # whatever the runner returned beside its results (e.g. engine BatchStats)


class Batcher(Generic[Item]):
    def __init__(
        self,
        run: Callable[[list[Item]], tuple[Sequence[Any], Any]],  # items -> (one result per item, stats)
        policy: BatchPolicy,
        max_wait_ms: float,
        on_pass: Callable[[PassReport], None] | None = None,
    ):
        self._run, self.policy, self.max_wait = run, policy, max_wait_ms / 1000
        self._on_pass = on_pass or (lambda report: None)
        self._queue: asyncio.Queue[_Pending[Item]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptserve-engine")
        self._task: asyncio.Task | None = None
        self.busy = False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ptserve-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, items: list[Item], lengths: list[int]) -> list[Any]:
        """Queue ``items`` (with their lengths, for planning) and wait for their results, in order."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(it, n, loop.create_future()) for it, n in zip(items, lengths)]
        for p in pending:
            self._queue.put_nowait(p)
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            for p in pending:  # a cancelled caller's rows are skipped, not computed
                p.future.cancel()
            raise

    async def _collect(self) -> list[_Pending[Item]]:
        batch = [await self._queue.get()]
        deadline = batch[0].enqueued + self.max_wait
        window = 4 * self.policy.max_batch_size  # plan over a few passes' worth of rows
        while len(batch) < window:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if len(batch) >= self.policy.max_batch_size:
                break
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = await self._collect()
            for pass_idx in plan_batches([p.length for p in pending], self.policy):
                group = [pending[i] for i in pass_idx if not pending[i].future.done()]
                if not group:
                    continue
                start = time.monotonic()
                self.busy = True
                try:
                    results, stats = await loop.run_in_executor(self._executor, self._run, [p.item for p in group])
                except Exception as exc:  # the pass failed: every row in it gets the error
                    log.exception("forward pass failed")
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                finally:
                    self.busy = False
                end = time.monotonic()
                for p, res in zip(group, results):
                    if not p.future.done():
                        p.future.set_result(res)
                self._on_pass(PassReport(len(group), [start - p.enqueued for p in group], end - start, stats))
