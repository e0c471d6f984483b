"""Runs the generation engine on its own thread and streams each request's events back to its coroutine.

The engine thread loops ``step()`` while there is work and sleeps on its inbox when there is none. Events cross
to the event loop with ``call_soon_threadsafe``; a caller that goes away (client disconnect) sets the sequence's
``cancelled`` flag and the engine frees its slot at the next step. A sequence that fails in the engine gets its
own error (the engine isolates failures per row); only a step that fails outside that isolation (a bug in the
engine itself) fails every sequence, since the engine's state can no longer be trusted.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ptserve.adapters_store.errors import GenerationFailed
from ptserve.server.generation.engine import GenerationEngine, StepEvent
from ptserve.server.generation.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """What one engine step did, for metrics."""

    rows: int
    tokens: int
    seconds: float


class GenerationRunner:
    def __init__(self, engine: GenerationEngine, on_step: Callable[[StepReport], None] | None = None):
        self.engine = engine
        self._on_step = on_step or (lambda report: None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._queued, self._queued_lock = 0, threading.Lock()  # sequences in the inbox
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ptserve-generate", daemon=True)

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._queued

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    async def generate(self, seqs: Sequence | list[Sequence]) -> AsyncIterator[StepEvent]:
        """Events of ``seqs`` (one request's sequences, handed to the engine together so that they join the
        same step when slots allow) until all finish; leaving early (disconnect, cancel) frees their rows."""
        steps = self.generate_steps(seqs)
        try:
            async for _, events in steps:
                for event in events:
                    yield event
        finally:
            await steps.aclose()

    async def generate_steps(self, seqs: Sequence | list[Sequence]) -> AsyncIterator[tuple[int, list[StepEvent]]]:
        """``generate`` a step at a time: (the engine step's number, the events it made for ``seqs``). A
        sequence's error is raised (the request fails; its other sequences are cancelled)."""
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        sink: asyncio.Queue = asyncio.Queue()
        with self._queued_lock:
            self._queued += len(seqs)
        self._inbox.put((seqs, asyncio.get_running_loop(), sink))
        left = {seq.id for seq in seqs}
        try:
            while left:
                step, events = await sink.get()
                for event in events:
                    if isinstance(event, BaseException):
                        raise event
                    if event.error is not None:
                        raise event.error
                    if event.done:
                        left.discard(event.seq.id)
                yield step, events
        finally:
            for seq in seqs:
                if seq.id in left:
                    seq.cancelled.set()

    # --- engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_new(block=not self.engine.has_work)
            if not self.engine.has_work:
                continue
            start = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, never the thread
                log.exception("generation step failed")
                self._fail_all(exc)
                continue
            tokens = sum(1 for e in events if e.token is not None)
            try:  # reported before the events go out: a finished caller finds its tokens in the metrics
                self._on_step(StepReport(len(self.engine.scheduler.running), tokens, time.perf_counter() - start))
            except Exception:  # metrics must never stop the engine
                log.exception("step report failed")
            self._deliver(self.engine.steps, [(event.seq, event) for event in events])

    def _take_new(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            seqs, loop, sink = item
            for seq in seqs:
                self._sinks[seq.id] = (loop, sink)
                self.engine.add(seq)
            with self._queued_lock:
                self._queued -= len(seqs)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, step: int, items: list[tuple[Sequence, object]]) -> None:
        """Each request's events (or errors) of one step go to its coroutine together, in one hop."""
        batches: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list]] = {}
        for seq, event in items:
            loop, sink = self._sinks[seq.id]
            if isinstance(event, BaseException) or event.done:
                del self._sinks[seq.id]
                seq.released.set()  # the engine has let it go (its KV slot is free)
            batches.setdefault(id(sink), (loop, sink, []))[2].append(event)
        for loop, sink, events in batches.values():
            try:
                loop.call_soon_threadsafe(sink.put_nowait, (step, events))
            except RuntimeError:  # the caller's event loop is closed: nobody left to tell (and no reason to stop)
                for event in events:
                    if not isinstance(event, BaseException):
                        event.seq.cancelled.set()

    def _fail_all(self, exc: Exception) -> None:
        error = GenerationFailed(f"the generation engine failed ({type(exc).__name__}); retry the request")
        self._deliver(self.engine.steps, [(seq, error) for seq in self.engine.abort()])
