"""Generation over real HTTP on a tiny random Llama (GQA): ptserve's /v1/generate (JSON and SSE), and the
OpenAI-compatible /v1/completions and /v1/models driven by the unchanged ``openai`` client."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from ptserve.adapters_store.format import encode_blob
from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, write_peft_folder
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, running_server, save_tiny_decoder

PROMPTS = ["hello world the fox", "the lazy dog", "many tenants share one frozen backbone", "prefix"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    adapters = {f"acme/gen{p}": make_adapter(bb.fingerprint, p, seed=p, task="generate") for p in (3, 11)}
    adapters["globex/bot"] = make_adapter(bb.fingerprint, 7, seed=7, task="generate")
    return bb, adapters


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory, server_modes):
    bb, adapters = llama
    env = {"PTSERVE_BACKBONE": bb.path, "PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}",
           "PTSERVE_MAX_RUNNING": "8", "PTSERVE_MAX_SEQ_TOKENS": "240"}
    with running_server(env) as url:
        for aid, adapter in adapters.items():
            if aid == "globex/bot":  # one adapter arrives as a PEFT CAUSAL_LM folder
                folder = write_peft_folder(adapter, tmp_path_factory.mktemp("peft"))
                files = {n: (n, (folder / n).read_bytes()) for n in (CONFIG_FILE, WEIGHTS_FILE)}
                r = httpx.put(f"{url}/v1/adapters/{aid}", files=files)
            else:
                r = httpx.put(f"{url}/v1/adapters/{aid}", content=encode_blob(adapter),
                              headers={"content-type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            assert r.json()["task"] == "generate"
        yield url


def _alone(llama, aid: str, prompt: str, max_new: int, **sampling) -> tuple[str, str]:
    """(text, finish_reason) of the request generated alone in-process: the reference for the server."""
    bb, adapters = llama
    engine = GenerationEngine(bb, GenerationLimits(max_running=1, max_seq_tokens=240))
    seq = engine.new_sequence(engine.make_resident(adapters[aid], aid, 1), prompt,
                              SamplingParams(max_new_tokens=max_new, **sampling))
    engine.add(seq)
    while engine.has_work:
        engine.step()
    return seq.text, seq.finish_reason


def test_generate_json_matches_alone_and_reports_usage(server, llama):
    r = httpx.post(f"{server}/v1/generate", json={"adapter": "acme/gen3", "prompt": PROMPTS[0],
                                                  "max_new_tokens": 12, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    text, finish = _alone(llama, "acme/gen3", PROMPTS[0], 12, temperature=0)
    assert (body["text"], body["finish_reason"]) == (text, finish)
    assert body["adapter"] == "acme/gen3" and body["version"] == 1
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(llama[0].tokenizer(PROMPTS[0])["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12


def test_sse_stream_concatenates_to_the_json_answer(server, llama):
    payload = {"adapter": "globex/bot", "prompt": PROMPTS[1], "max_new_tokens": 10, "temperature": 0.8, "seed": 5}
    plain = httpx.post(f"{server}/v1/generate", json=payload, timeout=30).json()
    events = []
    with httpx.stream("POST", f"{server}/v1/generate", json={**payload, "stream": True}, timeout=30) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["finish_reason"] == plain["finish_reason"] and chunks[-1]["usage"] == plain["usage"]


def test_stop_string_cuts_the_text(server, llama):
    full, _ = _alone(llama, "acme/gen11", PROMPTS[2], 20, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), "the reference text is long enough to pick a stop string from"
    r = httpx.post(f"{server}/v1/generate", json={"adapter": "acme/gen11", "prompt": PROMPTS[2], "max_new_tokens": 20,
                                                  "temperature": 0, "stop": [stop]}, timeout=30).json()
    assert r["finish_reason"] == "stop"
    assert r["text"] == full[: full.index(stop)]


def test_openai_client_completions_and_models(server, llama):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused-on-an-open-server")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"acme/gen3", "acme/gen11", "globex/bot"}
    assert models["acme/gen3"].owned_by == "acme" and models["acme/gen3"].parent == llama[0].path

    done = client.completions.create(model="acme/gen11", prompt=PROMPTS[3], max_tokens=9, temperature=0)
    text, finish = _alone(llama, "acme/gen11", PROMPTS[3], 9, temperature=0)
    assert done.choices[0].text == text and done.choices[0].finish_reason == finish
    assert done.object == "text_completion" and done.model == "acme/gen11"
    assert done.usage.completion_tokens >= 1

    stream = client.completions.create(model="acme/gen11", prompt=PROMPTS[3], max_tokens=9, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="acme/missing", prompt="hi", max_tokens=2)


def test_concurrent_streams_over_tenants_each_equal_alone(server, llama):
    """Twelve SSE streams of three adapters (two tenants) open at once and decode in shared steps; each stream's
    tokens and text equal that request generated alone, and each ends with its finish event and [DONE]."""
    jobs = [(aid, PROMPTS[i % len(PROMPTS)]) for i, aid in enumerate(["acme/gen3", "acme/gen11", "globex/bot"] * 4)]
    shared_before = _steps_with_company(server)

    async def one(client, aid, prompt):
        body = {"adapter": aid, "prompt": prompt, "max_new_tokens": 8, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(one(client, aid, p) for aid, p in jobs))

    for (aid, prompt), events in zip(jobs, asyncio.run(fire())):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text, finish = _alone(llama, aid, prompt, 8, temperature=0)
        assert "".join(c["text"] for c in chunks) == text
        assert chunks[-1]["finish_reason"] == finish and chunks[-1]["adapter"] == aid
        assert all("finish_reason" not in c for c in chunks[:-1])
    assert _steps_with_company(server) > shared_before  # the streams really decoded together
    # one /metrics in both modes: the streams' latencies (where the tokens reach the client) and the engine's steps
    for name in ("ptserve_time_to_first_token_seconds_count", "ptserve_inter_token_latency_seconds_count",
                 "ptserve_generation_step_duration_seconds_count"):
        assert _gauge(server, name) >= len(jobs), name


def _steps_with_company(url: str) -> float:
    """Engine steps so far that left more than one sequence running (from the batch-size histogram)."""
    text = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^ptserve_generation_batch_size_count ([0-9.e+]+)$", text, re.M).group(1))
    alone = float(re.search(r'^ptserve_generation_batch_size_bucket{le="1.0"} ([0-9.e+]+)$', text, re.M).group(1))
    return count - alone


def _gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))


def test_disconnect_mid_stream_frees_the_row(server):
    payload = {"adapter": "acme/gen3", "prompt": PROMPTS[0], "max_new_tokens": 200, "temperature": 1.0, "seed": 1,
               "stream": True}
    with httpx.stream("POST", f"{server}/v1/generate", json=payload, timeout=30) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert _gauge(server, "ptserve_running_requests") == 1
    deadline = time.monotonic() + 2
    while _gauge(server, "ptserve_running_requests") != 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its row"
        time.sleep(0.05)
    tokens = _gauge(server, "ptserve_generated_tokens_total")
    time.sleep(0.3)
    assert _gauge(server, "ptserve_generated_tokens_total") == tokens  # nothing decodes for it any more


@pytest.mark.parametrize("body,status,kind", [
    ({"adapter": "acme/none", "prompt": "x"}, 404, "adapter_not_found"),
    ({"adapter": "acme/gen3", "prompt": "hello " * 300, "max_new_tokens": 8}, 422, "input_too_long"),
    ({"adapter": "acme/gen3", "prompt": "x", "max_new_tokens": 0}, 422, "invalid_request"),
    ({"adapter": "acme/gen3", "prompt": "x", "temperature": -1}, 422, "invalid_request"),
    ({"adapter": "acme/gen3", "prompt": "x", "stop": [""]}, 422, "invalid_request"),
    ({"adapter": "acme/gen3", "prompt": "x", "bogus": 1}, 422, "invalid_request"),
])
def test_generate_errors(server, body, status, kind):
    r = httpx.post(f"{server}/v1/generate", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind


def test_classify_on_a_decoder_is_refused(server):
    r = httpx.post(f"{server}/v1/classify", json={"adapter": "acme/gen3", "inputs": ["x"]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "wrong_task"
