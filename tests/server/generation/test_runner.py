"""The generation runner (engine thread + per-request event delivery) on a tiny GPT-2: a sequence's failure
reaches its own caller as its own error while the others stream on, a caller whose event loop died cannot stop
the engine thread for everyone else, and one request's several sequences join one step and leave together."""
from __future__ import annotations

import asyncio
import threading

import pytest

from ptserve.adapters_store.errors import NonFiniteLogits
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, save_tiny_decoder

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    bb = load_backbone(str(save_tiny_decoder("gpt2", tmp_path_factory.mktemp("gpt2"))), device="cpu",
                       dtype="float32")
    return bb, make_adapter(bb.fingerprint, 4, seed=4, task="generate"), \
        make_adapter(bb.fingerprint, 8, seed=1, task="generate", scale=1e30)


@pytest.fixture
def runner(gpt2):
    bb, _, _ = gpt2
    engine = GenerationEngine(bb, GenerationLimits(max_running=4, max_seq_tokens=64, prefix_cap=16))
    engine.eos_ids = frozenset()
    r = GenerationRunner(engine)
    r.start()
    yield r
    r.stop()


def _seq(runner, adapter, tenant: str, prompt: str = "hello world"):
    engine = runner.engine
    return engine.new_sequence(engine.make_resident(adapter, f"{tenant}/x", 1), prompt, GREEDY)


async def _tokens(runner, seq) -> list[int]:
    return [ev.token async for ev in runner.generate(seq) if ev.token is not None]


async def test_a_failing_sequence_raises_in_its_own_caller_only(runner, gpt2):
    _, good, huge = gpt2
    alone = await _tokens(runner, _seq(runner, good, "bravo"))
    results = await asyncio.gather(_tokens(runner, _seq(runner, good, "bravo")),
                                   _tokens(runner, _seq(runner, huge, "alpha")),
                                   _tokens(runner, _seq(runner, good, "charlie")), return_exceptions=True)
    assert results[0] == results[2] == alone and len(alone) == 12
    assert isinstance(results[1], NonFiniteLogits)


def test_a_caller_whose_event_loop_is_gone_does_not_stop_the_engine(runner, gpt2):
    _, good, _ = gpt2
    dead = asyncio.new_event_loop()
    events = runner.generate(_seq(runner, good, "alpha", "the lazy dog"))
    assert dead.run_until_complete(events.__anext__()).token is not None  # it is running
    dead.close()  # gone without closing its stream: the engine's next delivery to it finds a closed loop

    async def later():
        return await asyncio.wait_for(_tokens(runner, _seq(runner, good, "bravo")), timeout=60)

    assert len(asyncio.run(later())) == 12
    assert runner.running == 0


# --- one request's several sequences (OpenAI n / prompt lists) --------------------------------------------------
def _choices_runner(gpt2, reports):
    bb, good, _ = gpt2
    engine = GenerationEngine(bb, GenerationLimits(max_running=4, max_seq_tokens=64, prefix_cap=16))
    engine.eos_ids = frozenset()
    return GenerationRunner(engine, on_step=reports.append), engine.make_resident(good, "t/a", 1)


def test_a_requests_sequences_join_one_step_and_stream_together(gpt2):
    reports = []
    runner, resident = _choices_runner(gpt2, reports)
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


def test_leaving_early_cancels_every_sequence_of_the_request(gpt2):
    runner, resident = _choices_runner(gpt2, [])
    seqs = [runner.engine.new_sequence(resident, "the fox", SamplingParams(max_new_tokens=40, temperature=0))
            for _ in range(2)]

    async def run():
        events = runner.generate(seqs)
        await anext(events)
        await events.aclose()  # the caller goes away after its first event
        assert all(s.cancelled.is_set() for s in seqs)
        for _ in range(200):  # the engine frees the rows at its next step
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


def test_a_sequence_is_released_only_once_the_engine_has_let_it_go(gpt2):
    """What the adapter's lease of a generation waits for (routes_generate): a caller that leaves early marks its
    sequence cancelled at once, but ``released`` is set only after the engine dropped it at its next step."""
    bb, adapter, _ = gpt2
    engine = GenerationEngine(bb, GenerationLimits(max_running=4, max_seq_tokens=64, prefix_cap=16))
    engine.eos_ids = frozenset()
    gate, real_step = threading.Event(), engine.step
    gate.set()

    def gated_step():  # the real step, once the test lets it run
        assert gate.wait(30)
        return real_step()

    engine.step = gated_step
    runner = GenerationRunner(engine)
    seq = engine.new_sequence(engine.make_resident(adapter, "acme/x", 1), "the fox",
                              SamplingParams(max_new_tokens=40, temperature=0))

    async def run():
        events = runner.generate(seq)
        await anext(events)
        gate.clear()  # no step starts now (one already past the gate only adds a token)
        await events.aclose()
        assert seq.cancelled.is_set()
        await asyncio.sleep(0.3)
        assert not seq.released.is_set()  # still in the engine's running batch
        gate.set()
        assert await asyncio.to_thread(seq.released.wait, 10)

    runner.start()
    try:
        asyncio.run(run())
        assert seq.finish_reason == "cancelled" and len(seq.output_ids) < 40
    finally:
        gate.set()
        runner.stop()
