"""``GenerationRunner.generate`` with several sequences (one OpenAI request's choices): they reach the engine
together and join the same step, their events arrive interleaved on one stream, and leaving early frees them all."""
from __future__ import annotations

import asyncio

import pytest

from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, save_tiny_decoder


@pytest.fixture(scope="module")
def engine_parts(tmp_path_factory):
    bb = load_backbone(str(save_tiny_decoder("qwen2", tmp_path_factory.mktemp("qwen2"))), device="cpu",
                       dtype="float32")
    return bb, make_adapter(bb.fingerprint, 4, seed=4, task="generate")


def _runner(engine_parts, reports):
    bb, adapter = engine_parts
    engine = GenerationEngine(bb, GenerationLimits(max_running=4, max_seq_tokens=64))
    engine.eos_ids = frozenset()
    runner = GenerationRunner(engine, on_step=reports.append)
    return runner, engine.make_resident(adapter, "t/a", 1)


def test_a_requests_sequences_join_one_step_and_stream_together(engine_parts):
    reports = []
    runner, resident = _runner(engine_parts, reports)
    seqs = [runner.engine.new_sequence(resident, "hello world", SamplingParams(max_new_tokens=n, temperature=0))
            for n in (3, 5, 4)]

    async def run():
        return [event async for event in runner.generate(seqs)]

    runner.start()
    try:
        events = asyncio.run(run())
    finally:
        runner.stop()
    assert reports[0].rows == 3 and reports[0].tokens == 3  # all three prefilled in the first step
    assert [sum(1 for e in events if e.seq is s) for s in seqs] == [3, 5, 4]
    assert all(s.finish_reason == "length" for s in seqs)
    assert events[-1].seq is seqs[1] and events[-1].done
    assert runner.waiting == 0 and runner.running == 0


def test_leaving_early_cancels_every_sequence_of_the_request(engine_parts):
    runner, resident = _runner(engine_parts, [])
    seqs = [runner.engine.new_sequence(resident, "the fox", SamplingParams(max_new_tokens=40, temperature=0))
            for _ in range(2)]

    async def run():
        events = runner.generate(seqs)
        await anext(events)
        await events.aclose()  # the caller goes away after its first event
        assert all(s.cancelled.is_set() for s in seqs)
        for _ in range(200):  # the engine frees the rows at its next step (events go to this loop, still open)
            if runner.running == 0:
                return
            await asyncio.sleep(0.01)

    runner.start()
    try:
        asyncio.run(run())
        assert runner.running == 0 and all(len(s.output_ids) < 40 for s in seqs)
        assert all(s.finish_reason == "cancelled" for s in seqs)
    finally:
        runner.stop()
