"""The batcher: a bounded queue that collects rows from any tenants and runs them in shared forward passes.

Callers ``submit`` rows and await their own results. One loop drains the queue: it waits up to ``max_wait_ms``
for a batch to fill (rows that already waited behind a running pass go at once), takes one pass's worth of rows
**round-robin by tenant** (so a tenant with a deep backlog gets its share, not the whole pass), plans passes with
``plan_batches`` and runs each on a single worker thread, so the event loop never blocks on torch.

Overload is refused at the door: a submit that would push the queue past ``max_queue_rows`` (or its tenant past
``max_queue_rows_per_tenant``) raises ``QueueFull`` (429) with a retry delay estimated from recent throughput;
a caller whose deadline passes raises ``DeadlineExceeded`` (504) and its queued rows are dropped unrun.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from server.batch_plan import BatchPolicy, plan_batches
from server.limits import DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)
Item = TypeVar("Item")


@dataclass(eq=False)
class _Pending(Generic[Item]):
    item: Item
    length: int
    future: asyncio.Future
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() after which nobody waits for the result
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True  # counted in the queue depth (False once taken or abandoned)


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
        max_queue_rows: int = 0,  # 0 = unbounded
        max_queue_rows_per_tenant: int = 0,  # 0 = only the global bound
    ):
        self._run, self.policy, self.max_wait = run, policy, max_wait_ms / 1000
        self._on_pass = on_pass or (lambda report: None)
        self.max_queue_rows, self.max_queue_rows_per_tenant = max_queue_rows, max_queue_rows_per_tenant
        # tenant -> its rows in arrival order; the dict's order is the round-robin order (served -> to the end)
        self._queues: OrderedDict[str, deque[_Pending[Item]]] = OrderedDict()
        self._tenant_rows: Counter[str] = Counter()
        self._depth = 0  # live rows queued (abandoned ones may still sit in a deque until taken)
        self._running = 0  # rows taken from the queue whose pass has not finished
        self._arrived = asyncio.Event()
        self._rows_per_s: float | None = None  # recent throughput, for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptserve-engine")
        self._task: asyncio.Task | None = None
        self.busy = False

    @property
    def depth(self) -> int:
        """Rows waiting in the queue."""
        return self._depth

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: what a draining server waits for."""
        return self._depth == 0 and self._running == 0

    def tenant_depth(self, tenant: str) -> int:
        return self._tenant_rows.get(tenant, 0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ptserve-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # --- the caller's side ------------------------------------------------------------------------------------
    async def submit(
        self, items: list[Item], lengths: list[int], tenant: str = "", deadline: float | None = None
    ) -> list[Any]:
        """Queue ``items`` (with their lengths, for planning) for ``tenant`` and wait for their results, in order.

        ``deadline`` is a ``time.monotonic()`` instant: past it the rows still queued are dropped and
        ``DeadlineExceeded`` is raised. ``QueueFull`` is raised at once when the queue has no room.
        """
        self._admit(tenant, len(items))
        loop = asyncio.get_running_loop()
        pending = [_Pending(it, n, loop.create_future(), tenant, deadline) for it, n in zip(items, lengths)]
        self._queues.setdefault(tenant, deque()).extend(pending)
        self._tenant_rows[tenant] += len(pending)
        self._depth += len(pending)
        self._arrived.set()
        gathered = asyncio.gather(*(p.future for p in pending))
        try:
            if deadline is None:
                return list(await gathered)
            return list(await asyncio.wait_for(gathered, max(0.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline ({len(items)} rows; "
                f"{self._depth} rows queued)"
            ) from None
        finally:
            for p in pending:  # a cancelled or timed-out caller's rows are skipped, not computed
                if not p.future.done():
                    p.future.cancel()
                self._forget(p)

    def check_room(self, tenant: str, rows: int) -> None:
        """Raise ``QueueFull`` now if ``rows`` more would not be admitted (cheap: lets a route refuse before it
        loads an adapter or tokenises; ``submit`` checks again)."""
        self._admit(tenant, rows)

    def _admit(self, tenant: str, rows: int) -> None:
        """Room for ``rows`` more? A request alone in an empty (tenant) queue always gets in, whatever its size.
        The tenant's share is checked first: a tenant over it is told so, even when the whole queue is full too."""
        rate = self._rows_per_s or 0.0
        mine = self._tenant_rows.get(tenant, 0)
        if self.max_queue_rows_per_tenant and mine and mine + rows > self.max_queue_rows_per_tenant:
            share = rate / max(1, len(self._tenant_rows))
            raise QueueFull(
                f"tenant {tenant or '-'} has {mine} rows queued (per-tenant limit "
                f"{self.max_queue_rows_per_tenant}); retry later",
                retry_after=(mine + rows) / share if share else 1.0,
            )
        if self.max_queue_rows and self._depth and self._depth + rows > self.max_queue_rows:
            raise QueueFull(
                f"the server is at capacity: {self._depth} rows queued (limit {self.max_queue_rows}); retry later",
                retry_after=(self._depth + rows) / rate if rate else 1.0,
            )

    def _forget(self, p: _Pending[Item]) -> None:
        if p.queued:
            p.queued = False
            self._depth -= 1
            self._tenant_rows[p.tenant] -= 1
            if not self._tenant_rows[p.tenant]:
                del self._tenant_rows[p.tenant]

    # --- the loop's side --------------------------------------------------------------------------------------
    def _oldest(self) -> float:
        return min((q[0].enqueued for q in self._queues.values() if q), default=time.monotonic())

    async def _collect(self) -> list[_Pending[Item]]:
        while self._depth == 0:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._oldest() + self.max_wait
        while self._depth < self.policy.max_batch_size:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                break
        return self._take(self.policy.max_batch_size)

    def _take(self, n: int) -> list[_Pending[Item]]:
        """Up to ``n`` live rows, one per tenant in turn (round-robin), each tenant's in arrival order."""
        taken, now = [], time.monotonic()
        while len(taken) < n and self._queues:
            tenant, queue = next(iter(self._queues.items()))
            p = queue.popleft()
            if queue:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant]
            if not p.queued:  # its caller gave up
                continue
            self._forget(p)
            if p.future.done() or (p.deadline is not None and p.deadline < now):
                continue  # the caller's own timer raises DeadlineExceeded
            taken.append(p)
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = await self._collect()
            self._running = len(pending)
            try:
                for pass_idx in plan_batches([p.length for p in pending], self.policy):
                    group = [pending[i] for i in pass_idx if not pending[i].future.done()]
                    if group:
                        await self._run_pass(loop, group)
                    self._running -= len(pass_idx)
            finally:
                self._running = 0

    async def _run_pass(self, loop: asyncio.AbstractEventLoop, group: list[_Pending[Item]]) -> None:
        start = time.monotonic()
        self.busy = True
        try:
            results, stats = await loop.run_in_executor(self._executor, self._run, [p.item for p in group])
        except Exception as exc:  # the pass failed: every row in it gets the error
            log.exception("forward pass failed")
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self.busy = False
        end = time.monotonic()
        for p, res in zip(group, results):
            if not p.future.done():
                p.future.set_result(res)
        rate = len(group) / max(end - start, 1e-6)
        self._rows_per_s = rate if self._rows_per_s is None else 0.8 * self._rows_per_s + 0.2 * rate
        self._on_pass(PassReport(len(group), [start - p.enqueued for p in group], end - start, stats))
