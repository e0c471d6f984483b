"""Continuous-batching scheduler, free of torch: who waits, who runs, in which cache slot, who joins next.

Running sequences occupy slots [0, B) in order. A request joins when a slot is free and the cache columns it may
need (prompt + max_new_tokens) fit in the token budget beside the running ones; it leaves when it finishes or is
cancelled, and the last running sequence moves into its slot so the batch stays packed.

Who joins next is the admission policy's choice (``ADMISSION_POLICIES``, setting ``PTSERVE_ADMISSION``). The
default, ``TenantFair``, picks the oldest waiting request of the tenant with the fewest running sequences (FIFO
within a tenant and among tenants with equal counts): one tenant's backlog therefore cannot hold every slot while
another tenant waits; each slot that frees goes to the least-served waiting tenant. ``Fifo`` picks the oldest
waiting request, whoever sent it (the policy before tenant fairness; kept to compare against).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class Schedulable(Protocol):
    @property
    def reserved_tokens(self) -> int: ...

    @property
    def tenant(self) -> str: ...


class AdmissionPolicy(Protocol):
    def pick(self, waiting: Sequence[Schedulable], per_tenant: Counter) -> Schedulable:
        """The next waiting sequence to join (``waiting`` in arrival order, not empty; ``per_tenant``: running
        sequences per tenant, counting those admitted earlier in this round)."""


class TenantFair:
    """The oldest waiting sequence of the waiting tenant with the fewest running ones."""

    name = "fair"

    def pick(self, waiting: Sequence[Schedulable], per_tenant: Counter) -> Schedulable:
        best, seen = None, set()
        for seq in waiting:  # arrival order, so each tenant's first hit is its oldest
            if seq.tenant in seen:
                continue
            seen.add(seq.tenant)
            if best is None or per_tenant[seq.tenant] < per_tenant[best.tenant]:
                best = seq
        return best


class Fifo:
    """The oldest waiting sequence, whichever tenant sent it."""

    name = "fifo"

    def pick(self, waiting: Sequence[Schedulable], per_tenant: Counter) -> Schedulable:
        return waiting[0]


ADMISSION_POLICIES: dict[str, type] = {policy.name: policy for policy in (TenantFair, Fifo)}


@dataclass(frozen=True)
class Move:
    src: int  # slot the moved sequence leaves
    dst: int  # slot it now owns


@dataclass
class Scheduler:
    max_running: int
    max_tokens: int  # sum of reserved tokens over running sequences
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    reserved: int = 0
    admission: AdmissionPolicy = field(default_factory=TenantFair, kw_only=True)

    def add(self, seq: Schedulable) -> None:
        self.waiting.append(seq)

    def admit(self) -> list:
        """Move waiting sequences into free slots while budgets allow, in the order the admission policy picks
        them; returns them in slot order."""
        admitted = []
        per_tenant = Counter(seq.tenant for seq in self.running)
        while self.waiting and len(self.running) < self.max_running:
            seq = self.admission.pick(self.waiting, per_tenant)
            if self.running and self.reserved + seq.reserved_tokens > self.max_tokens:
                break  # no overtaking: the chosen one waits for room (a lone request always runs; its own size
                # was checked when it was accepted)
            self.waiting.remove(seq)
            self.running.append(seq)
            self.reserved += seq.reserved_tokens
            per_tenant[seq.tenant] += 1
            admitted.append(seq)
        return admitted

    def slot_of(self, seq) -> int:
        return self.running.index(seq)

    def remove(self, seq) -> Move | None:
        """Take a running sequence out; the last one fills its slot (returned so the cache can copy it)."""
        slot = self.running.index(seq)
        last = len(self.running) - 1
        self.reserved -= seq.reserved_tokens
        if slot == last:
            self.running.pop()
            return None
        self.running[slot] = self.running.pop()
        return Move(src=last, dst=slot)

    def drop_waiting(self, seq) -> bool:
        try:
            self.waiting.remove(seq)
            return True
        except ValueError:
            return False
