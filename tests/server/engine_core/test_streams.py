"""The API's side of a generation (``engine_core/streams.py``) over the in-process engine client: the text is
made from the engine's token ids by mirror sequences, a stop string that ends one choice cancels that choice in
the engine (the other goes on), and a request tokenised for an old version is told so. A tiny random Llama with
EOS disabled, a real local store, the real runner thread."""
from __future__ import annotations

import pytest

from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.local import LocalDirStore
from ptserve.adapters_store.validation import Limits
from ptserve.server.adapters import AdapterService
from ptserve.server.api.routes_generate import Generation
from ptserve.server.backbone import load_backbone
from ptserve.server.engine_core.client import VersionChanged
from ptserve.server.engine_core.local import LocalEngineClient
from ptserve.server.engine_core.streams import generate_events
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_blob, save_tiny_decoder

A = AdapterId.parse("acme/gen")
PROMPT, TOKENS = "the quick brown fox", 30


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_backbone(str(save_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))), device="cpu",
                         dtype="float32")


@pytest.fixture
async def client(tmp_path, llama):
    engine = GenerationEngine(llama, GenerationLimits(max_running=4, max_seq_tokens=128, prefix_cap=16))
    engine.eos_ids = frozenset()  # every choice runs to its length unless a stop string ends it
    adapters = AdapterService(LocalDirStore(tmp_path / "store"), engine, 1 << 30, Limits())
    await adapters.put_blob(A, make_blob(llama.fingerprint, 4, seed=4, task="generate"))
    runner = GenerationRunner(engine)
    runner.start()
    try:
        yield LocalEngineClient(adapters, None, engine, None, runner=runner, max_waiting=64)
    finally:
        runner.stop()


async def _run(client, llama, params: list[SamplingParams]) -> tuple[Generation, list]:
    """The request's mirrors and the engine-side stream (its sequences), after all events were read."""
    streams, real = [], client.generate

    async def keep(*args):
        streams.append(await real(*args))
        return streams[-1]

    client.generate = keep
    gen = Generation(str(A), 0, n=len(params))
    async for _ in generate_events(client, llama.tokenizer, A, [PROMPT], params, gen, fill=False):
        pass
    return gen, streams[0].seqs


async def test_a_stop_string_ends_its_choice_and_cancels_it_in_the_engine_while_the_other_goes_on(client, llama):
    greedy = SamplingParams(max_new_tokens=TOKENS, temperature=0)
    alone, _ = await _run(client, llama, [greedy])
    full = alone.seq.text
    stop = full[len(full) // 3: len(full) // 3 + 2]
    assert stop.strip() and full.index(stop) > 0, full

    gen, engine_seqs = await _run(client, llama, [SamplingParams(max_new_tokens=TOKENS, temperature=0,
                                                                 stop=(stop,)), greedy])
    stopped, full_choice = gen.seqs
    assert (stopped.text, stopped.finish_reason, stopped.matched_stop) == (full[: full.index(stop)], "stop", stop)
    assert (full_choice.text, full_choice.finish_reason) == (full, "length")
    assert len(full_choice.output_ids) == TOKENS and len(stopped.output_ids) < TOKENS
    # in the engine: no stop strings, no text; the stopped choice was cancelled, the other ran its length
    assert engine_seqs[0].params.stop == () and engine_seqs[0].text == "" == engine_seqs[1].text
    assert engine_seqs[0].finish_reason == "cancelled" and len(engine_seqs[0].output_ids) < TOKENS
    assert engine_seqs[1].finish_reason == "length" and engine_seqs[1].output_ids == full_choice.output_ids
    assert all(s.released.is_set() for s in engine_seqs) and client.idle


async def test_a_request_tokenised_for_an_old_version_is_told_so(client, llama):
    meta = await client.adapter_meta(A)
    assert meta.generation.room == 128 and meta.generation.eos_ids == frozenset()
    await client.adapters.put_blob(A, make_blob(llama.fingerprint, 6, seed=6, task="generate"))
    with pytest.raises(VersionChanged) as caught:
        await client.generate(A, meta.version, [[1, 2, 3]], [SamplingParams(max_new_tokens=2)], "acme")
    assert (caught.value.asked, caught.value.current) == (meta.version, meta.version + 1)
    assert client.idle  # nothing was queued, nothing stays leased
