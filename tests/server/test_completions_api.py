"""``POST /v1/completions`` beyond one prompt, over real HTTP with the unchanged ``openai`` client: prompt lists and
``n`` (choice ``prompt_index * n + j``, seeded per choice as documented), token-id prompts, ``logprobs`` (equal to
PEFT's forward) with ``echo`` (prompt tokens scored too, the first null), ``stream_options.include_usage``, and the
422s. The tiny Llama here has no chat template, so it also shows what ``/v1/chat/completions`` answers then."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from ptserve.adapters_store.format import encode_blob
from ptserve.server.api.openai_choices import choice_seed
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, peft_prefix_lm, running_server, save_tiny_decoder

PROMPTS = ["hello world the fox", "the lazy dog", "many tenants share one frozen backbone"]
TOL = 1e-4
MAX_CHOICES = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_tiny_decoder("llama", tmp_path_factory.mktemp("cmpl-llama"))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    return bb, {"acme/gen": make_adapter(bb.fingerprint, 6, seed=6, task="generate", scale=2.0)}


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory, server_modes):
    bb, adapters = llama
    env = {"PTSERVE_BACKBONE": bb.path, "PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('cmpl-store')}",
           "PTSERVE_MAX_RUNNING": "4", "PTSERVE_MAX_SEQ_TOKENS": "240",
           "PTSERVE_MAX_INPUTS_PER_REQUEST": str(MAX_CHOICES)}
    with running_server(env) as url:
        for aid, adapter in adapters.items():
            r = httpx.put(f"{url}/v1/adapters/{aid}", content=encode_blob(adapter),
                          headers={"content-type": "application/octet-stream"}, timeout=30)
            assert r.status_code == 201, r.text
        yield url


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-an-open-server", max_retries=0)


def _alone(llama, prompt, **params) -> tuple[list[int], list[int], str, str]:
    """(prompt ids, output ids, text, finish) of one sequence generated alone in process."""
    bb, adapters = llama
    engine = GenerationEngine(bb, GenerationLimits(max_running=1, max_seq_tokens=240))
    seq = engine.new_sequence(engine.make_resident(adapters["acme/gen"], "acme/gen", 1), prompt,
                              SamplingParams(**params))
    engine.add(seq)
    while engine.has_work:
        engine.step()
    return seq.prompt_ids, seq.output_ids, seq.text, seq.finish_reason


def _streamed(chunks) -> dict[int, tuple[str, str]]:
    texts: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk.choices:
            entry = texts.setdefault(c.index, ["", None])
            entry[0] += c.text
            entry[1] = c.finish_reason or entry[1]
    return {k: tuple(v) for k, v in texts.items()}


def test_prompt_lists_and_n_give_each_prompts_choices_in_openai_order(server, llama):
    kw = dict(model="acme/gen", prompt=PROMPTS, max_tokens=7, temperature=1.0, seed=21, n=2)
    done = _client(server).completions.create(**kw)
    assert [c.index for c in done.choices] == list(range(6))
    for choice in done.choices:
        i, j = divmod(choice.index, 2)  # index = prompt_index * n + j
        _, out, text, finish = _alone(llama, PROMPTS[i], max_new_tokens=7, temperature=1.0, seed=choice_seed(21, j))
        assert (choice.text, choice.finish_reason) == (text, finish)
    for i in range(3):
        assert done.choices[2 * i].text != done.choices[2 * i + 1].text
    bb = llama[0]
    assert done.usage.prompt_tokens == sum(len(bb.tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert done.usage.completion_tokens >= 6
    streamed = _streamed(_client(server).completions.create(stream=True, **kw))
    assert streamed == {c.index: (c.text, c.finish_reason) for c in done.choices}


def test_async_client_and_token_id_prompts(server, llama):
    bb = llama[0]
    ids = [bb.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        try:
            by_text = await client.completions.create(model="acme/gen", prompt=PROMPTS[:2], max_tokens=6,
                                                      temperature=0)
            by_ids = await client.completions.create(model="acme/gen", prompt=ids, max_tokens=6, temperature=0)
            one = await client.completions.create(model="acme/gen", prompt=ids[1], max_tokens=6, temperature=0)
            chunks = [c async for c in await client.completions.create(model="acme/gen", prompt=ids, max_tokens=6,
                                                                       temperature=0, stream=True)]
            return by_text, by_ids, one, chunks
        finally:
            await client.close()

    by_text, by_ids, one, chunks = asyncio.run(run())
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == by_text.choices[1].text
    assert _streamed(chunks) == {c.index: (c.text, c.finish_reason) for c in by_ids.choices}
    assert by_text.choices[0].text == _alone(llama, PROMPTS[0], max_new_tokens=6, temperature=0)[2]


def _peft_log_softmax(llama, ids, temperature) -> torch.Tensor:
    bb, adapters = llama
    with torch.no_grad():
        logits = peft_prefix_lm(bb.path, adapters["acme/gen"])(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_echo_with_logprobs_scores_prompt_and_completion_like_peft(server, llama, temperature):
    bb = llama[0]
    kw = dict(model="acme/gen", prompt=PROMPTS[1], max_tokens=5, temperature=temperature, seed=4, logprobs=3,
              echo=True)
    done = _client(server).completions.create(**kw)
    prompt_ids, out, text, _ = _alone(llama, PROMPTS[1], max_new_tokens=5, temperature=temperature, seed=4)
    choice = done.choices[0]
    assert choice.text == PROMPTS[1] + text
    lp = choice.logprobs
    ids = prompt_ids + out
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.tokens == [bb.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    ref = _peft_log_softmax(llama, ids, temperature)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) <= TOL
        values, order = ref[i - 1].topk(3)
        expected = {bb.tokenizer.decode([t]): v for t, v in zip(order.tolist(), values.tolist())}
        expected.setdefault(lp.tokens[i], float(ref[i - 1, ids[i]]))  # OpenAI adds the chosen token
        assert lp.top_logprobs[i].keys() == expected.keys()
        assert all(abs(lp.top_logprobs[i][k] - v) <= TOL for k, v in expected.items())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[len(prompt_ids)] == len(PROMPTS[1])  # the completion starts after the echoed prompt
    chunks = list(_client(server).completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    joined = {k: [x for c in chunks for x in getattr(c.choices[0].logprobs, k)]
              for k in ("tokens", "token_logprobs", "text_offset")}
    assert joined == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


def test_logprobs_zero_and_echo_without_logprobs(server, llama):
    client = _client(server)
    zero = client.completions.create(model="acme/gen", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=0)
    lp = zero.choices[0].logprobs
    assert len(lp.tokens) == zero.usage.completion_tokens
    assert all(d.keys() == {t} for d, t in zip(lp.top_logprobs, lp.tokens))  # just the chosen token
    echo = client.completions.create(model="acme/gen", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + zero.choices[0].text and echo.choices[0].logprobs is None


def test_include_usage_adds_a_last_chunk_and_nothing_else_carries_usage(server):
    client = _client(server)
    kw = dict(model="acme/gen", prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in client.completions.create(stream=True, **kw))


@pytest.mark.parametrize("body,needle", [
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"logit_bias": {"3": 1}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "x"]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_completion_bodies_answer_422_naming_the_field(server, body, needle):
    r = httpx.post(f"{server}/v1/completions", json={"model": "acme/gen", "prompt": "hi", **body}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request" and needle in r.json()["error"]["message"]


@pytest.mark.parametrize("body,kind,needle", [
    ({"prompt": [[5, 10 ** 6]]}, "invalid_input", "token ids"),
    ({"prompt": PROMPTS * 2, "n": 3}, "invalid_input", f"at most {MAX_CHOICES}"),
    ({"prompt": "hello " * 300}, "input_too_long", "tokens"),
])
def test_inputs_the_engine_cannot_take_answer_422(server, body, kind, needle):
    r = httpx.post(f"{server}/v1/completions", json={"model": "acme/gen", "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == kind and needle in r.json()["error"]["message"]


def test_no_chat_template_answers_422_naming_both_fixes(server):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                   json={"model": "acme/gen", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "no_chat_template"
    assert "PTSERVE_CHAT_TEMPLATE" in error["message"] and "chat_template" in error["message"].replace(
        "PTSERVE_CHAT_TEMPLATE", "")
