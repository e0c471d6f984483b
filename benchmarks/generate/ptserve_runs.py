"""How ptserve runs a workload: straight on a ``GenerationEngine`` stepped until done (throughput), or through a
``GenerationRunner`` (engine thread + asyncio) with timed arrivals and a trace of when each token arrived
(latency, fairness)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from benchmarks.generate.workload import Job
from ptserve.adapters_store.format import Adapter
from ptserve.server.backbone import Backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.scheduler import AdmissionPolicy
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import ResidentAdapter


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0)


def new_engine(bb: Backbone, slots: int, admission: AdmissionPolicy | None = None) -> GenerationEngine:
    """An engine whose greedy runs go to max_new_tokens (EOS disabled), so every system generates the same
    count."""
    engine = GenerationEngine(bb, GenerationLimits(max_running=slots), admission)
    engine.eos_ids = frozenset()
    return engine


def residents_of(engine: GenerationEngine, adapters: list[Adapter]) -> list[ResidentAdapter]:
    return [engine.make_resident(a, f"bench/a{i}", 1) for i, a in enumerate(adapters)]


def run_engine(engine: GenerationEngine, residents: list[ResidentAdapter], jobs: list[Job], tokens: int):
    """All jobs submitted at once, the engine stepped until they are done; the tokens of each job."""
    seqs = [engine.new_sequence(residents[j.adapter], j.prompt, greedy(tokens)) for j in jobs]
    for seq in seqs:
        engine.add(seq)
    with torch.inference_mode():
        while engine.has_work:
            engine.step()
    return [s.output_ids for s in seqs]


@dataclass
class Trace:
    submitted: float
    events: list[float]  # when each token event reached the event loop

    @property
    def ttft(self) -> float:
        return self.events[0] - self.submitted

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.events, self.events[1:])]


async def _stream(runner: GenerationRunner, seq: Sequence, delay: float, t0: float) -> Trace:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    trace = Trace(time.perf_counter(), [])
    async for event in runner.generate(seq):
        if event.token is not None:
            trace.events.append(time.perf_counter())
    return trace


def run_arrivals(engine, residents, jobs: list[Job], tokens: int | list[int], delays: list[float]):
    """Job i (``tokens`` new tokens, or ``tokens[i]``) submitted through a ``GenerationRunner`` ``delays[i]`` s
    after the start: (traces, wall time)."""
    runner = GenerationRunner(engine)
    runner.start()
    counts = tokens if isinstance(tokens, list) else [tokens] * len(jobs)

    async def main():
        t0 = time.perf_counter()
        seqs = [engine.new_sequence(residents[j.adapter], j.prompt, greedy(n)) for j, n in zip(jobs, counts)]
        traces = await asyncio.gather(*(_stream(runner, s, d, t0) for s, d in zip(seqs, delays)))
        return traces, time.perf_counter() - t0

    try:
        return asyncio.run(main())
    finally:
        runner.stop()
