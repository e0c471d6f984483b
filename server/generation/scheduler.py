"""Continuous-batching scheduler, free of torch: who waits, who runs, in which cache slot, who joins next.

Running sequences occupy slots [0, B) in order. A request joins when a slot is free and the cache columns it may
need (prompt + max_new_tokens) fit in the token budget beside the running ones; it leaves when it finishes or is
cancelled, and the last running sequence moves into its slot so the batch stays packed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class Schedulable(Protocol):
    @property
    def reserved_tokens(self) -> int: ...


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

    def add(self, seq: Schedulable) -> None:
        self.waiting.append(seq)

    def admit(self) -> list:
        """Move waiting sequences (FIFO) into free slots while budgets allow; returns them in slot order."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.running and self.reserved + seq.reserved_tokens > self.max_tokens:
                break  # a lone request always runs; its own size was checked when it was accepted
            self.waiting.popleft()
            self.running.append(seq)
            self.reserved += seq.reserved_tokens
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
