"""``Batcher`` with a real plain-Python runner: batching across callers, budgets, waiting, errors, cancellation."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from ptserve.server.batch_plan import BatchPolicy, plan_batches
from ptserve.server.batcher import Batcher, PassReport


class Runner:
    """Doubles every item; records each pass it runs. ``gate`` holds a pass in the worker thread."""

    def __init__(self):
        self.passes: list[list] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, items: list) -> tuple[list, dict]:
        with self.lock:
            self.passes.append(list(items))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test never opened the gate"
        if any(x == "boom" for x in items):
            raise ValueError("the forward pass exploded")
        return [x * 2 for x in items], {"rows": len(items)}

    @property
    def seen(self) -> list:
        return [x for p in self.passes for x in p]


@pytest.fixture
async def make_batcher():
    made: list[Batcher] = []

    def make(runner, max_wait_ms: float = 20, reports: list | None = None, **policy) -> Batcher:
        b = Batcher(runner, BatchPolicy(**policy), max_wait_ms,
                    on_pass=reports.append if reports is not None else None)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


async def test_a_pass_is_reported_before_its_results_are_delivered():
    """Metrics first: a caller that has its answer (and then scrapes /metrics) finds its pass counted, even when
    the report is slow."""
    reports: list[PassReport] = []

    def slow_report(report: PassReport) -> None:
        time.sleep(0.1)
        reports.append(report)

    batcher = Batcher(Runner(), BatchPolicy(), 1, on_pass=slow_report)
    batcher.start()
    try:
        assert await batcher.submit([3], [5]) == [6]
        assert [r.rows for r in reports] == [1]
    finally:
        await batcher.stop()


async def test_concurrent_callers_share_passes_and_get_their_own_results_in_order(make_batcher):
    runner, reports = Runner(), []
    batcher = make_batcher(runner, max_wait_ms=50, reports=reports, max_batch_size=64, overhead_tokens=256)
    rng = random.Random(0)

    async def caller(k: int) -> tuple[list[int], list]:
        items = [k * 100 + j for j in range(rng.randint(1, 4))]
        await asyncio.sleep(rng.random() * 0.005)
        lengths = [rng.randint(1, 300) for _ in items]  # the planner reorders rows by length
        return items, await batcher.submit(items, lengths)

    outcomes = await asyncio.gather(*(caller(k) for k in range(40)))
    for items, results in outcomes:
        assert results == [x * 2 for x in items]
    submitted = sorted(x for items, _ in outcomes for x in items)
    assert sorted(runner.seen) == submitted  # every row ran exactly once
    assert len(runner.passes) < 40 / 2  # far fewer passes than submissions
    assert max(len(p) for p in runner.passes) > 10
    assert sum(r.rows for r in reports) == len(submitted)
    assert all(isinstance(r, PassReport) and r.stats == {"rows": r.rows} and len(r.queue_wait_s) == r.rows
               and r.run_s >= 0 for r in reports)


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
async def test_max_batch_size_is_respected(make_batcher, max_batch_size):
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=30, max_batch_size=max_batch_size)
    one_caller = batcher.submit(list(range(25)), [10] * 25)
    many = [batcher.submit([1000 + k], [10]) for k in range(25)]
    results = await asyncio.gather(one_caller, *many)
    assert results[0] == [2 * x for x in range(25)]
    assert [r[0] for r in results[1:]] == [2 * (1000 + k) for k in range(25)]
    assert max(len(p) for p in runner.passes) == max_batch_size
    assert len(runner.seen) == 50


async def test_max_batch_tokens_is_respected(make_batcher):
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=30, max_batch_size=64, max_batch_tokens=100)
    lengths = [30, 30, 30, 30, 50, 50, 10, 10, 10, 10, 10]
    items = list(range(len(lengths)))
    assert await batcher.submit(items, lengths) == [2 * x for x in items]
    for p in runner.passes:
        assert len(p) * max(lengths[i] for i in p) <= 100


async def test_a_lone_request_waits_at_most_max_wait(make_batcher):
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=80)
    await batcher.submit([0], [1])  # warm the worker thread
    for _ in range(3):
        start = time.monotonic()
        assert await batcher.submit([21], [5]) == [42]
        elapsed = time.monotonic() - start
        assert 0.07 <= elapsed < 0.08 + 0.15, elapsed  # it waited for company, then went alone


async def test_a_full_batch_goes_without_waiting(make_batcher):
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=5000, max_batch_size=4)
    start = time.monotonic()
    assert await batcher.submit([1, 2, 3, 4], [5, 5, 5, 5]) == [2, 4, 6, 8]
    assert time.monotonic() - start < 1.0
    assert runner.passes == [[1, 2, 3, 4]]


async def test_a_runner_error_reaches_exactly_the_callers_in_that_pass(make_batcher):
    runner = Runner()
    # two rows per pass; lengths put each caller's pair in its own pass (the planner sorts by length)
    batcher = make_batcher(runner, max_wait_ms=50, max_batch_size=2, overhead_tokens=1000)
    a = batcher.submit([1, 2], [1, 1])
    b = batcher.submit(["boom", 3], [5, 5])
    c = batcher.submit([4, 5], [9, 9])
    ra, rb, rc = await asyncio.gather(a, b, c, return_exceptions=True)
    assert ra == [2, 4] and rc == [8, 10]
    assert isinstance(rb, ValueError) and "exploded" in str(rb)
    # the failed pass ran again as two halves: its bad row alone failed (the half holding only 3 is skipped
    # when its caller, whose other row failed, has given up by then)
    passes = sorted(sorted(map(str, p)) for p in runner.passes)
    assert passes in ([["1", "2"], ["3"], ["3", "boom"], ["4", "5"], ["boom"]],
                      [["1", "2"], ["3", "boom"], ["4", "5"], ["boom"]])
    # the batcher keeps serving
    assert await batcher.submit([7], [3]) == [14]
    with pytest.raises(ValueError, match="exploded"):
        await batcher.submit(["boom"], [3])
    assert await batcher.submit([8, 9], [3, 3]) == [16, 18]


async def test_one_tenants_bad_row_fails_no_other_tenants_rows_in_its_pass(make_batcher):
    """Sixteen rows of four tenants in one pass, one of them bad: the pass is rerun in halves until the bad row
    is alone; every other tenant gets its results, and the bad row costs at most 2·log2(16) extra passes (fewer
    when halves holding only the failed caller's rows are skipped)."""
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=100, max_batch_size=16, overhead_tokens=1000)
    calls = [batcher.submit([10 * t + i for i in range(4)], [3] * 4, tenant=f"t{t}") for t in range(3)]
    calls.append(batcher.submit([30, "boom", 31, 32], [3] * 4, tenant="mallory"))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:3] == [[2 * (10 * t + i) for i in range(4)] for t in range(3)]
    assert isinstance(results[3], ValueError)
    assert len(runner.passes[0]) == 16 and len(runner.passes) <= 1 + 2 * 4
    assert ["boom"] in runner.passes
    assert await batcher.submit([7], [3], tenant="t0") == [14]  # and it keeps serving


async def test_a_caller_cancelled_while_its_rows_wait_behind_a_running_pass_is_skipped(make_batcher):
    runner = Runner()
    runner.gate = threading.Event()
    batcher = make_batcher(runner, max_wait_ms=5)
    first = asyncio.create_task(batcher.submit(["first"], [1]))
    assert await asyncio.to_thread(runner.entered.wait, 5)  # the worker is busy with "first"
    quitter = asyncio.create_task(batcher.submit(["quit-1", "quit-2"], [1, 1]))
    stayer = asyncio.create_task(batcher.submit(["stay"], [1]))
    await asyncio.sleep(0.02)
    quitter.cancel()
    await asyncio.gather(quitter, return_exceptions=True)
    assert quitter.cancelled()
    runner.gate.set()
    assert await asyncio.wait_for(first, 5) == ["firstfirst"]
    assert await asyncio.wait_for(stayer, 5) == ["staystay"]
    assert "quit-1" not in runner.seen and "quit-2" not in runner.seen
    assert sorted(runner.seen) == ["first", "stay"]


async def test_a_caller_cancelled_while_the_batch_fills_is_skipped(make_batcher):
    runner = Runner()
    batcher = make_batcher(runner, max_wait_ms=150)
    quitter = asyncio.create_task(batcher.submit(["quit"], [1]))
    stayer = asyncio.create_task(batcher.submit(["stay"], [1]))
    await asyncio.sleep(0.03)
    assert runner.passes == []  # still collecting
    quitter.cancel()
    assert await asyncio.wait_for(stayer, 5) == ["staystay"]
    assert runner.passes == [["stay"]]


async def test_stop_ends_the_loop(make_batcher):
    runner = Runner()
    batcher = make_batcher(runner)
    assert await batcher.submit([1], [1]) == [2]
    await batcher.stop()
    assert batcher._task.done()


# --- pass formation under load (issue 12): one pass per plan, re-planned with whatever arrived meanwhile ------
class GatedRunner(Runner):
    """Holds only its first pass (until ``release``), so the test can fill the queue behind it."""

    def __init__(self):
        super().__init__()
        self.first = threading.Event()

    def __call__(self, items):
        result = Runner.__call__(self, items)
        if len(self.passes) == 1:
            assert self.first.wait(5), "test never released the first pass"
        return result


async def test_rows_that_arrive_while_a_pass_runs_join_the_next_pass(make_batcher):
    runner = Runner()
    runner.gate = threading.Event()
    batcher = make_batcher(runner, max_wait_ms=1, max_batch_size=8, overhead_tokens=0)
    # overhead 0: the plan of this window is two passes, [short, short] then [long, long]
    first = asyncio.create_task(batcher.submit(["s1", "s2", "L1", "L2"], [10, 10, 50, 50]))
    assert await asyncio.to_thread(runner.entered.wait, 5)
    assert runner.passes == [["s1", "s2"]]
    late = asyncio.create_task(batcher.submit(["L3", "L4"], [50, 50], tenant="other"))  # while [s1, s2] runs
    await asyncio.sleep(0.05)
    runner.gate.set()
    assert await asyncio.wait_for(first, 5) == ["s1s1", "s2s2", "L1L1", "L2L2"]
    assert await asyncio.wait_for(late, 5) == ["L3L3", "L4L4"]
    assert [sorted(p) for p in runner.passes] == [["s1", "s2"], ["L1", "L2", "L3", "L4"]]  # one pass, not two


async def test_the_fair_head_runs_in_the_next_pass_whatever_its_length(make_batcher):
    runner = GatedRunner()
    batcher = make_batcher(runner, max_wait_ms=1, max_batch_size=8, overhead_tokens=0)
    warm = asyncio.create_task(batcher.submit(["warm"], [5]))
    assert await asyncio.to_thread(runner.entered.wait, 5)
    long_one = asyncio.create_task(batcher.submit(["long"], [400], tenant="a"))
    await asyncio.sleep(0.02)
    shorts = [asyncio.create_task(batcher.submit([f"s{k}"], [10], tenant=f"t{k}")) for k in range(20)]
    await asyncio.sleep(0.05)
    runner.first.set()
    await asyncio.wait_for(asyncio.gather(warm, long_one, *shorts), 5)
    assert runner.passes[1] == ["long"]  # it waited longest: not left behind by the shorter rows planned with it
    assert sorted(runner.seen) == sorted(["warm", "long", *(f"s{k}" for k in range(20))])
