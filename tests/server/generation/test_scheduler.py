"""The continuous-batching scheduler on fake sequences (torch-free): tenant-fair admission (FIFO within a
tenant) and the FIFO policy, slot and token budgets, packed slots after a departure, and a randomized simulation
checking invariants and each policy's rule after every step."""
from __future__ import annotations

import itertools
import random
import typing
from dataclasses import dataclass, field

import pytest

from ptserve.server.generation.scheduler import ADMISSION_POLICIES, Fifo, Move, Scheduler, TenantFair
from ptserve.server.settings import Settings

_ids = itertools.count()


@dataclass(eq=False)  # identity semantics, like the engine's Sequence objects in the scheduler's lists
class FakeSeq:
    reserved_tokens: int
    tenant: str = "t"
    id: int = field(default_factory=lambda: next(_ids))


def seqs(*sizes: int, tenant: str = "t") -> list[FakeSeq]:
    return [FakeSeq(n, tenant) for n in sizes]


def check_invariants(s: Scheduler) -> None:
    assert s.reserved == sum(q.reserved_tokens for q in s.running)
    assert len(s.running) <= s.max_running
    assert len({id(q) for q in s.running}) == len(s.running), "a sequence runs twice"
    assert len({id(q) for q in s.waiting}) == len(s.waiting), "a sequence waits twice"
    assert not {id(q) for q in s.running} & {id(q) for q in s.waiting}, "a sequence both waits and runs"
    # over budget only when the batch is a lone request (it always runs)
    assert s.reserved <= s.max_tokens or len(s.running) == 1


# --- admission ----------------------------------------------------------------------------------------------
def test_admission_is_fifo_and_returns_slot_order():
    s = Scheduler(max_running=8, max_tokens=1000)
    a, b, c = seqs(10, 20, 30)
    for q in (a, b, c):
        s.add(q)
    assert s.admit() == [a, b, c]
    assert s.running == [a, b, c]
    assert [s.slot_of(q) for q in (a, b, c)] == [0, 1, 2]
    assert not s.waiting and s.reserved == 60
    d = FakeSeq(5)
    s.add(d)
    assert s.admit() == [d] and s.slot_of(d) == 3


def test_never_more_than_max_running():
    s = Scheduler(max_running=3, max_tokens=10**6)
    batch = seqs(*[1] * 7)
    for q in batch:
        s.add(q)
    assert s.admit() == batch[:3]
    assert s.admit() == []  # full: nobody else joins
    assert list(s.waiting) == batch[3:]
    s.remove(batch[1])
    assert s.admit() == [batch[3]]  # one left, the next in line joins
    assert len(s.running) == 3


def test_token_budget_blocks_head_of_line_without_overtaking():
    s = Scheduler(max_running=8, max_tokens=100)
    a, big, small = seqs(60, 50, 10)
    for q in (a, big, small):
        s.add(q)
    # big does not fit beside a; small would, but FIFO: it may not overtake big
    assert s.admit() == [a]
    assert list(s.waiting) == [big, small]
    s.remove(a)
    assert s.admit() == [big, small]
    assert s.reserved == 60


def test_budget_is_inclusive():
    s = Scheduler(max_running=8, max_tokens=100)
    a, b = seqs(40, 60)
    s.add(a), s.add(b)
    assert s.admit() == [a, b] and s.reserved == 100


def test_lone_request_always_runs_even_over_budget():
    s = Scheduler(max_running=4, max_tokens=100)
    huge, small = seqs(500, 1)
    s.add(huge), s.add(small)
    assert s.admit() == [huge]  # alone it runs; nothing may join it
    assert s.admit() == []
    s.remove(huge)
    assert s.reserved == 0
    assert s.admit() == [small]


def test_a_backlogged_tenant_does_not_hold_every_slot():
    s = Scheduler(max_running=4, max_tokens=10**6)
    noisy = seqs(*[1] * 10, tenant="noisy")
    quiet = seqs(1, 1, 1, tenant="quiet")
    for q in noisy + quiet:  # the quiet tenant arrives behind the whole backlog
        s.add(q)
    # alternate, least-served tenant first; ties go to the older request
    assert s.admit() == [noisy[0], quiet[0], noisy[1], quiet[1]]
    s.remove(noisy[0])
    assert s.admit() == [noisy[2]]  # noisy 1 running vs quiet 2: noisy's turn
    s.remove(noisy[1])
    assert s.admit() == [noisy[3]]  # 1 vs 2 again
    s.remove(quiet[0])
    assert s.admit() == [quiet[2]]  # 2 vs 1: quiet's turn, ahead of 6 older noisy requests


def test_fairness_does_not_let_small_requests_overtake_the_chosen_one():
    s = Scheduler(max_running=8, max_tokens=100)
    a = FakeSeq(60, "a")
    s.add(a)
    assert s.admit() == [a]
    big_b, small_a = FakeSeq(50, "b"), FakeSeq(10, "a")
    s.add(small_a), s.add(big_b)
    assert s.admit() == []  # b (least served) is next and does not fit; a's small one may not overtake it
    s.remove(a)
    assert s.admit() == [small_a, big_b]  # both tenants at 0 running: the older request first


def test_fifo_admission_serves_the_backlog_before_a_later_tenant():
    """The same arrivals as in the fairness test above, under FIFO: the quiet tenant waits for the whole backlog
    ahead of it, one freed slot at a time."""
    s = Scheduler(max_running=4, max_tokens=10**6, admission=Fifo())
    noisy = seqs(*[1] * 6, tenant="noisy")
    quiet = seqs(1, 1, tenant="quiet")
    for q in noisy + quiet:
        s.add(q)
    assert s.admit() == noisy[:4]
    s.remove(noisy[0])
    assert s.admit() == [noisy[4]]  # quiet runs nothing, but noisy's older request goes first
    s.remove(noisy[1])
    assert s.admit() == [noisy[5]]
    s.remove(noisy[2]), s.remove(noisy[3])
    assert s.admit() == quiet


def test_fifo_admission_waits_for_room_without_overtaking():
    s = Scheduler(max_running=8, max_tokens=100, admission=Fifo())
    a, big, small = FakeSeq(60, "a"), FakeSeq(50, "a"), FakeSeq(10, "b")
    for q in (a, big, small):
        s.add(q)
    assert s.admit() == [a]  # big is next and does not fit; small (another tenant) may not overtake it
    s.remove(a)
    assert s.admit() == [big, small]


def test_every_admission_setting_names_a_policy():
    names = typing.get_args(Settings.model_fields["admission"].annotation)
    assert set(names) == set(ADMISSION_POLICIES)
    assert Settings.model_fields["admission"].default == "fair"
    assert ADMISSION_POLICIES["fair"] is TenantFair and ADMISSION_POLICIES["fifo"] is Fifo
    assert isinstance(Scheduler(max_running=1, max_tokens=1).admission, TenantFair)  # the default


def test_empty_scheduler_admits_nothing():
    s = Scheduler(max_running=2, max_tokens=10)
    assert s.admit() == [] and s.running == [] and s.reserved == 0


# --- departures ---------------------------------------------------------------------------------------------
def test_remove_last_slot_moves_nothing():
    s = Scheduler(max_running=4, max_tokens=1000)
    a, b, c = seqs(1, 2, 3)
    for q in (a, b, c):
        s.add(q)
    s.admit()
    assert s.remove(c) is None
    assert s.running == [a, b] and s.reserved == 3


def test_remove_middle_slot_moves_last_into_it():
    s = Scheduler(max_running=4, max_tokens=1000)
    a, b, c, d = seqs(1, 2, 3, 4)
    for q in (a, b, c, d):
        s.add(q)
    s.admit()
    assert s.remove(b) == Move(src=3, dst=1)
    assert s.running == [a, d, c]  # packed in slots [0, 3); d now owns slot 1
    assert s.slot_of(d) == 1 and s.reserved == 8
    assert s.remove(a) == Move(src=2, dst=0)
    assert s.running == [c, d]
    assert s.remove(d) is None and s.remove(c) is None
    assert s.running == [] and s.reserved == 0


def test_remove_unknown_sequence_raises():
    s = Scheduler(max_running=2, max_tokens=10)
    with pytest.raises(ValueError):
        s.remove(FakeSeq(1))


def test_drop_waiting():
    s = Scheduler(max_running=1, max_tokens=10)
    a, b, c = seqs(1, 1, 1)
    for q in (a, b, c):
        s.add(q)
    s.admit()
    assert s.drop_waiting(c) is True
    assert s.drop_waiting(c) is False
    assert s.drop_waiting(a) is False  # running, not waiting
    assert list(s.waiting) == [b]


# --- randomized simulation ----------------------------------------------------------------------------------
def fair_next(waiting: list[FakeSeq], per_tenant: dict[str, int]) -> FakeSeq:
    """The rule, written independently: the first in arrival order among the least-served tenants' requests."""
    least = min(per_tenant[w.tenant] for w in waiting)
    return next(w for w in waiting if per_tenant[w.tenant] == least)


def fifo_next(waiting: list[FakeSeq], per_tenant: dict[str, int]) -> FakeSeq:
    return waiting[0]


@pytest.mark.parametrize("seed", range(200))
@pytest.mark.parametrize("policy, rule", [(TenantFair, fair_next), (Fifo, fifo_next)], ids=["fair", "fifo"])
def test_random_arrivals_and_finishes_keep_invariants(policy, rule, seed):
    """Random arrivals, admissions, finishes and cancellations of waiting requests; a mirror of the slot table
    (updated only through the returned ``Move``s, as the cache is) must always equal ``running``, and each
    admitted request is the one the policy's rule (written independently here) names."""
    rng = random.Random(seed)
    max_running, max_tokens = rng.randint(1, 6), rng.randint(20, 200)
    s = Scheduler(max_running=max_running, max_tokens=max_tokens, admission=policy())
    slots: list[FakeSeq | None] = [None] * max_running  # what the KV cache believes each slot holds
    added, admitted, dropped, finished = [], [], [], []
    to_add = rng.randint(1, 60)
    tenants = ["a", "b", "c"][: rng.randint(1, 3)]

    def admit():
        first, waiting = len(s.running), list(s.waiting)
        per_tenant = {t: sum(q.tenant == t for q in s.running) for t in tenants}
        joined = s.admit()
        for i, q in enumerate(joined):
            assert slots[first + i] is None, "admitted into an occupied slot"
            slots[first + i] = q
            assert q is rule(waiting, per_tenant), f"not the request {policy.__name__} picks"
            waiting.remove(q)
            per_tenant[q.tenant] += 1
        if waiting and len(s.running) < max_running:  # it stopped early: the fair choice did not fit
            assert s.running and s.reserved + rule(waiting, per_tenant).reserved_tokens > max_tokens
        admitted.extend(joined)

    def finish(q):
        slot, last = s.slot_of(q), len(s.running) - 1
        move = s.remove(q)
        if slot == last:
            assert move is None
        else:
            assert move == Move(src=last, dst=slot)
            slots[move.dst] = slots[move.src]
        slots[last] = None
        finished.append(q)

    while len(added) < to_add or s.waiting or s.running:
        op = rng.random()
        if op < 0.35 and len(added) < to_add:
            size = rng.randint(1, max_tokens * 2 if rng.random() < 0.1 else max_tokens)
            q = FakeSeq(size, rng.choice(tenants))
            s.add(q)
            added.append(q)
        elif op < 0.6:
            admit()
        elif op < 0.95 and s.running:
            finish(rng.choice(s.running))
        elif op >= 0.95 and s.waiting:
            q = rng.choice(list(s.waiting))
            assert s.drop_waiting(q)
            dropped.append(q)
        check_invariants(s)
        assert slots[: len(s.running)] == s.running, "running rows are not packed in slots [0, B)"
        assert all(x is None for x in slots[len(s.running):])
        assert len(admitted) == len({id(q) for q in admitted}), "admitted twice"

    # every request was admitted exactly once (or cancelled while waiting), in arrival order within its tenant
    assert {id(q) for q in admitted} | {id(q) for q in dropped} == {id(q) for q in added}
    assert not {id(q) for q in admitted} & {id(q) for q in dropped}
    for t in tenants:
        assert [q for q in admitted if q.tenant == t] == \
            [q for q in added if q.tenant == t and all(q is not d for d in dropped)]
    assert sorted(map(id, finished)) == sorted(map(id, admitted))
    assert s.reserved == 0
