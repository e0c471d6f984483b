"""The batcher: a bounded queue that collects rows from any tenants and runs them in shared forward passes.

Callers ``submit`` rows and await their own results. One engine thread drains the queue: it waits up to
``max_wait_ms`` for a batch to fill (rows that already waited behind a running pass go at once), takes a window
of ``PLAN_WINDOW_PASSES`` passes' worth of rows (one) **by start-time fair queuing across tenants** (each
tenant's rows served so far are its virtual time; the next row comes from the waiting tenant that is furthest
behind, so a tenant with a deep backlog gets only what others leave, and a light tenant's rows go in the very
next pass), plans the window with ``plan_batches`` and runs **one** pass of the plan: the one holding the
window's first row (the fair choice). The rest go back to the front of their queues, so rows that arrive while
that pass runs are planned together with them for the next pass instead of waiting behind the rest of an old
plan. Each result goes to its
caller's event loop; the thread never waits for the event loop between passes, so a loop busy answering
(e.g. refusing an overload) does not starve the engine.

A pass that fails is split in halves and rerun until the rows that fail alone are found: one tenant's bad row
never fails another tenant's rows in the same pass.

Overload is refused at the door: a submit that would push the queue past ``max_queue_rows`` (or its tenant past
``max_queue_rows_per_tenant``) raises ``QueueFull`` (429) with a retry delay estimated from recent throughput;
a caller whose deadline passes raises ``DeadlineExceeded`` (504) and its queued rows are dropped unrun.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from ptserve.server.batch_plan import BatchPolicy, plan_batches
from ptserve.server.limits import DeadlineExceeded, QueueFull

log = logging.getLogger(__name__)
Item = TypeVar("Item")


@dataclass(eq=False)
class _Pending(Generic[Item]):
    item: Item
    length: int
    future: asyncio.Future  # lives on ``loop``; only that loop's thread resolves it
    loop: asyncio.AbstractEventLoop
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


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # its caller gave up meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(p: _Pending, result: Any = None, error: BaseException | None = None) -> None:
    """From the engine thread to the caller's loop (gone if the caller's loop closed: nobody to tell)."""
    try:
        p.loop.call_soon_threadsafe(_resolve, p.future, result, error)
    except RuntimeError:
        pass


class Batcher(Generic[Item]):
    def __init__(
        self,
        run: Callable[[list[Item]], tuple[Sequence[Any], Any]],  # items -> (one result per item, stats)
        policy: BatchPolicy,
        max_wait_ms: float,
        on_pass: Callable[[PassReport], None] | None = None,  # called on the engine thread
        max_queue_rows: int = 0,  # 0 = unbounded
        max_queue_rows_per_tenant: int = 0,  # 0 = only the global bound
    ):
        self._run, self.policy, self.max_wait = run, policy, max_wait_ms / 1000
        self._on_pass = on_pass or (lambda report: None)
        self.max_queue_rows, self.max_queue_rows_per_tenant = max_queue_rows, max_queue_rows_per_tenant
        # Everything below is shared by the event loop and the engine thread: touch it only under ``_cond``.
        self._cond = threading.Condition()
        # tenant -> its rows in arrival order (only tenants with rows waiting)
        self._queues: OrderedDict[str, deque[_Pending[Item]]] = OrderedDict()
        # Start-time fair queuing: a tenant's virtual time advances by one per row served; a tenant that starts
        # waiting again resumes at the clock (the start tag of the last row served), so idling earns no credit.
        self._vtime: dict[str, float] = {}
        self._vclock = 0.0
        self._tenant_rows: Counter[str] = Counter()
        self._depth = 0  # live rows queued (abandoned ones may still sit in a deque until taken)
        self._running = 0  # rows taken from the queue whose pass has not finished
        self._stopping = False
        self._rows_per_s: float | None = None  # recent throughput, for Retry-After
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptserve-engine")
        self._task: asyncio.Future | None = None
        self.busy = False

    @property
    def depth(self) -> int:
        """Rows waiting in the queue."""
        return self._depth

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running: what a draining server waits for."""
        with self._cond:
            return self._depth == 0 and self._running == 0

    def tenant_depth(self, tenant: str) -> int:
        return self._tenant_rows.get(tenant, 0)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(loop.run_in_executor(self._executor, self._engine_thread))

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # --- the caller's side (event loop) -----------------------------------------------------------------------
    async def submit(
        self, items: list[Item], lengths: list[int], tenant: str = "", deadline: float | None = None
    ) -> list[Any]:
        """Queue ``items`` (with their lengths, for planning) for ``tenant`` and wait for their results, in order.

        ``deadline`` is a ``time.monotonic()`` instant: past it the rows still queued are dropped and
        ``DeadlineExceeded`` is raised. ``QueueFull`` is raised at once when the queue has no room.
        """
        loop = asyncio.get_running_loop()
        pending = [_Pending(it, n, loop.create_future(), loop, tenant, deadline) for it, n in zip(items, lengths)]
        with self._cond:
            self._admit(tenant, len(items))
            if tenant not in self._queues:
                self._vtime[tenant] = max(self._vtime.get(tenant, 0.0), self._vclock)
            self._queues.setdefault(tenant, deque()).extend(pending)
            self._tenant_rows[tenant] += len(pending)
            self._depth += len(pending)
            self._cond.notify_all()
        # ``asyncio.wait`` on the rows' own futures: no task around the wait (``wait_for`` makes one) and no gathering
        # future; ``asyncio.timeout_at`` would do it too, but needs Python 3.11 and the server supports 3.10.
        futures = [p.future for p in pending]
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            _, late = await asyncio.wait(futures, timeout=timeout)
            if late:
                raise DeadlineExceeded(
                    f"the request did not finish within its deadline ({len(items)} rows; {self._depth} rows queued)"
                )
            return [f.result() for f in futures]
        finally:
            with self._cond:
                for p in pending:  # a cancelled or timed-out caller's rows are skipped, not computed
                    if not p.future.done():
                        p.future.cancel()
                    self._forget(p)

    def check_room(self, tenant: str, rows: int) -> None:
        """Raise ``QueueFull`` now if ``rows`` more would not be admitted (cheap: lets a route refuse before it
        loads an adapter or tokenises; ``submit`` checks again)."""
        with self._cond:
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

    # --- the engine thread ------------------------------------------------------------------------------------
    def _engine_thread(self) -> None:
        while True:
            group = self._collect()
            if group is None:
                return
            try:
                if group:
                    self._run_pass(group)
            finally:
                with self._cond:
                    self._running = 0

    def _collect(self) -> list[_Pending[Item]] | None:
        """Wait for rows, then for company (up to ``max_wait`` after the oldest arrived); then the next pass
        (possibly empty: every row taken had been given up); None when stopping."""
        with self._cond:
            while self._depth == 0 and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = min((q[0].enqueued for q in self._queues.values() if q), default=time.monotonic())
            deadline += self.max_wait
            while self._depth < self.policy.max_batch_size and not self._stopping:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                self._cond.wait(timeout)
            clock = self._vclock
            window, tags = self._take(self.policy.window_rows)
            group = self._choose_pass(window, tags, clock) if window else []
            self._running = len(group)
            return group

    def _take(self, n: int) -> tuple[list[_Pending[Item]], list[float]]:
        """Up to ``n`` live rows, each from the waiting tenant with the least virtual time (ties: longest waiting
        tenant first), each tenant's in arrival order; and each row's start tag (its tenant's virtual time when
        taken). Every round starts with this fair choice and runs one pass of what it took (``_choose_pass``),
        so a big request (256 long inputs) is spread over many rounds, and another tenant's request arriving
        meanwhile runs in the next pass instead of waiting for the whole big request."""
        taken, tags, now = [], [], time.monotonic()
        while len(taken) < n and self._queues:
            tenant = min(self._queues, key=self._vtime.__getitem__)
            queue = self._queues[tenant]
            p = queue.popleft()
            if not queue:
                del self._queues[tenant]
            if not p.queued:  # its caller gave up
                continue
            self._forget(p)
            if p.future.done() or (p.deadline is not None and p.deadline < now):
                continue  # the caller's own timer raises DeadlineExceeded
            tags.append(self._vtime[tenant])
            self._vtime[tenant] += 1.0
            taken.append(p)
        return taken, tags

    def _choose_pass(self, window: list[_Pending[Item]], tags: list[float], clock: float) -> list[_Pending[Item]]:
        """Plan the window and keep the pass that holds its first row (the fair head: it runs next whatever its
        length); every other row goes back to the front of its tenant's queue, unserved (its tenant's virtual
        time too). Runs under ``_cond``: nobody sees the window half put back."""
        chosen = sorted(next(idx for idx in plan_batches([p.length for p in window], self.policy) if 0 in idx))
        keep = set(chosen)
        for i in range(len(window) - 1, -1, -1):  # backwards: each tenant's rows keep their order at its front
            if i in keep:
                continue
            p = window[i]
            self._vtime[p.tenant] -= 1.0
            if p.tenant not in self._queues:
                self._queues[p.tenant] = deque()
                self._queues.move_to_end(p.tenant, last=False)  # it has waited longest
            self._queues[p.tenant].appendleft(p)
            p.queued = True
            self._depth += 1
            self._tenant_rows[p.tenant] += 1
        self._vclock = max([clock] + [tags[i] for i in chosen])  # the start tag of the last row served
        if len(self._vtime) > 4 * len(self._queues) + 1024:  # forget idle tenants that owe nothing
            self._vtime = {t: v for t, v in self._vtime.items() if t in self._queues or v > self._vclock}
        return [window[i] for i in chosen]

    def _run_pass(self, group: list[_Pending[Item]]) -> None:
        start = time.monotonic()
        self.busy = True
        try:
            results, stats = self._run([p.item for p in group])
        except Exception as exc:
            return self._isolate(group, exc)
        finally:
            self.busy = False
        end = time.monotonic()
        rate = len(group) / max(end - start, 1e-6)
        self._rows_per_s = rate if self._rows_per_s is None else 0.8 * self._rows_per_s + 0.2 * rate
        try:  # reported before the results go out: a caller that has its answer finds its pass in the metrics
            self._on_pass(PassReport(len(group), [start - p.enqueued for p in group], end - start, stats))
        except Exception:  # metrics must never stop the engine
            log.exception("pass report failed")
        for p, res in zip(group, results):
            _deliver(p, res)

    def _isolate(self, group: list[_Pending[Item]], exc: Exception) -> None:
        """A pass failed. Rows of many tenants share it, and one row's failure must not fail the others: each
        half runs again on its own until the rows that fail alone are found (one bad row costs about
        2·log2(rows) extra passes); only those rows get the error."""
        if len(group) == 1:
            log.error("forward pass failed", exc_info=exc)
            _deliver(group[0], error=exc)
            return
        log.warning("a forward pass of %d rows failed (%s); running its halves on their own", len(group), exc)
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            live = [p for p in half if not p.future.done()]  # a caller may have given up meanwhile
            if live:
                self._run_pass(live)
