"""``POST /v1/chat/completions`` over real HTTP with the unchanged ``openai`` client (sync and async, streamed and
not), on a tiny random Llama whose tokenizer carries a chat template: greedy text equals PEFT's greedy generation
on the chat-templated prompt, seeded choices are reproducible and distinct, logprobs equal PEFT's forward, every
unsupported field answers 422 naming it, and a template file given at start-up wins over the tokenizer's."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import torch

from ptserve.adapters_store.format import encode_blob
from ptserve.adapters_store.peft_folder import write_peft_folder
from ptserve.server.api.openai_choices import choice_seed
from ptserve.server.api.schemas_openai import CHAT_UNSUPPORTED
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import CHAT_TEMPLATE, make_adapter, peft_greedy, peft_prefix_lm, running_server, save_tiny_decoder

CHAT = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "hello world the fox"}]
FILE_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'] }}{% endfor %}[ASSISTANT]"
TOL = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_tiny_decoder("llama", tmp_path_factory.mktemp("chat-llama"), chat_template=CHAT_TEMPLATE)
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    adapters = {"acme/chat": make_adapter(bb.fingerprint, 5, seed=5, task="generate", scale=2.0),
                "globex/bot": make_adapter(bb.fingerprint, 8, seed=8, task="generate", scale=2.0)}
    return bb, adapters


def _serve(llama, store, **env):
    bb, adapters = llama
    env = {"PTSERVE_BACKBONE": bb.path, "PTSERVE_STORE": f"file://{store}", "PTSERVE_MAX_RUNNING": "8",
           "PTSERVE_MAX_SEQ_TOKENS": "240", **env}
    server = running_server(env)
    url = server.__enter__()
    for aid, adapter in adapters.items():
        r = httpx.put(f"{url}/v1/adapters/{aid}", content=encode_blob(adapter),
                      headers={"content-type": "application/octet-stream"}, timeout=30)
        assert r.status_code == 201, r.text
    return server, url


@pytest.fixture(scope="module")
def server(llama, tmp_path_factory, server_modes):
    ctx, url = _serve(llama, tmp_path_factory.mktemp("chat-store"))
    yield url
    ctx.__exit__(None, None, None)


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-an-open-server", max_retries=0)


def _templated(bb, messages=CHAT, template=None) -> list[int]:
    return list(bb.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))


def _peft_text(llama, aid, ids, max_new) -> tuple[str, str]:
    """PEFT's greedy text for a token prompt and the finish reason it implies."""
    bb, adapters = llama
    eos = {bb.tokenizer.eos_token_id}
    tokens = peft_greedy(peft_prefix_lm(bb.path, adapters[aid]), ids, max_new, eos)
    return bb.tokenizer.decode(tokens, skip_special_tokens=True), "length" if len(tokens) == max_new else "stop"


async def _async_chat(url, stream: bool, **kw):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        if not stream:
            done = await client.chat.completions.create(**kw)
            return done.choices[0].message.content, done.choices[0].finish_reason
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kw)]
        return _joined(chunks)
    finally:
        await client.close()


def _joined(chunks, index=0) -> tuple[str, str]:
    mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
    assert mine[0].delta.role == "assistant"  # the role comes first
    assert all(c.finish_reason is None for c in mine[:-1])
    return "".join(c.delta.content or "" for c in mine), mine[-1].finish_reason


@pytest.mark.parametrize("mode", ["sync", "sync-stream", "async", "async-stream"])
def test_greedy_chat_equals_peft_greedy_on_the_chat_templated_prompt(server, llama, mode):
    bb, _ = llama
    kw = dict(model="acme/chat", messages=CHAT, max_tokens=12, temperature=0)
    if mode == "sync":
        done = _client(server).chat.completions.create(**kw)
        got = done.choices[0].message.content, done.choices[0].finish_reason
        assert done.object == "chat.completion" and done.model == "acme/chat"
        assert done.choices[0].message.role == "assistant" and done.choices[0].logprobs is None
        assert done.usage.prompt_tokens == len(_templated(bb))
    elif mode == "sync-stream":
        got = _joined(list(_client(server).chat.completions.create(stream=True, **kw)))
    else:
        got = asyncio.run(_async_chat(server, mode == "async-stream", **kw))
    assert got == _peft_text(llama, "acme/chat", _templated(bb), 12)
    assert got[0], "the reference produced some text"


@pytest.mark.peft_ref
@pytest.mark.skipif(not os.environ.get("PTSERVE_REF_PYTHON"), reason="PTSERVE_REF_PYTHON not set")
def test_greedy_chat_equals_peft_generate_on_its_working_transformers(server, llama, tmp_path):
    bb, adapters = llama
    done = _client(server).chat.completions.create(model="globex/bot", messages=CHAT, max_tokens=10, temperature=0)
    folder = write_peft_folder(adapters["globex/bot"], tmp_path / "peft")
    (tmp_path / "prompts.json").write_text(json.dumps([_templated(bb)]))
    proc = subprocess.run(
        [os.environ["PTSERVE_REF_PYTHON"], "scripts/peft_reference.py", "generate", "--model", bb.path, "--adapter",
         str(folder), "--prompts", str(tmp_path / "prompts.json"), "--max-new", "10", "--result",
         str(tmp_path / "out.json")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((tmp_path / "out.json").read_text())["tokens"][0]  # EOS ignored: 10 tokens
    n = done.usage.completion_tokens
    assert done.choices[0].message.content == bb.tokenizer.decode(reference[:n], skip_special_tokens=True)
    if done.choices[0].finish_reason == "stop":
        assert reference[n] == bb.tokenizer.eos_token_id


def _engine_alone(llama, aid, ids, **params):
    """(output ids, text) of one sequence generated alone in process: where a sampled path goes."""
    bb, adapters = llama
    engine = GenerationEngine(bb, GenerationLimits(max_running=1, max_seq_tokens=240))
    seq = engine.new_sequence(engine.make_resident(adapters[aid], aid, 1), ids, SamplingParams(**params))
    engine.add(seq)
    while engine.has_work:
        engine.step()
    return seq.output_ids, seq.text


def test_n3_with_a_seed_gives_three_reproducible_distinct_choices(server, llama):
    bb, _ = llama
    client = _client(server)
    kw = dict(model="globex/bot", messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) == 3, texts
    assert first.usage.prompt_tokens == len(_templated(bb))  # the prompt is counted once, not n times
    streamed = list(client.chat.completions.create(stream=True, **kw))
    assert [_joined(streamed, i)[0] for i in range(3)] == texts
    for j, text in enumerate(texts):  # choice j samples with the documented seed
        ids, alone = _engine_alone(llama, "globex/bot", _templated(bb), max_new_tokens=8, temperature=1.0,
                                   seed=choice_seed(7, j))
        assert text == alone
    single = client.chat.completions.create(**{**kw, "n": 1})
    assert single.choices[0].message.content == texts[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_top_logprobs_equal_a_peft_forward(server, llama, temperature):
    bb, adapters = llama
    done = _client(server).chat.completions.create(
        model="acme/chat", messages=CHAT, max_tokens=6, temperature=temperature, seed=3, logprobs=True,
        top_logprobs=4)
    ids = _templated(bb)
    out, text = _engine_alone(llama, "acme/chat", ids, max_new_tokens=6, temperature=temperature, seed=3)
    assert done.choices[0].message.content == text
    content = done.choices[0].logprobs.content
    assert len(content) == len(out)
    with torch.no_grad():
        logits = peft_prefix_lm(bb.path, adapters["acme/chat"])(input_ids=torch.tensor([ids + out])).logits[0]
    ref = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    for i, (entry, token) in enumerate(zip(content, out)):
        row = ref[len(ids) - 1 + i]
        assert entry.token == bb.tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert abs(entry.logprob - float(row[token])) <= TOL
        values, order = row.topk(4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=TOL)
        assert sorted(t.token for t in entry.top_logprobs) == sorted(bb.tokenizer.decode([t]) for t in order)
    streamed = list(_client(server).chat.completions.create(
        model="acme/chat", messages=CHAT, max_tokens=6, temperature=temperature, seed=3, logprobs=True,
        top_logprobs=4, stream=True))
    pieces = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]


def test_stream_options_include_usage_sends_a_last_chunk_with_usage(server):
    client = _client(server)
    kw = dict(model="acme/chat", messages=CHAT, max_tokens=5, temperature=0, n=2)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finished = [c.choices[0] for c in chunks[:-1] if c.choices[0].finish_reason is not None]
    assert sorted(c.index for c in finished) == [0, 1]
    without = list(client.chat.completions.create(stream=True, **kw))
    assert without[-1].choices and all(c.usage is None for c in without)


def test_max_completion_tokens_stop_and_defaults(server, llama):
    bb, _ = llama
    client = _client(server)
    full = client.chat.completions.create(model="acme/chat", messages=CHAT, max_completion_tokens=16,
                                          temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens <= 16
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.chat.completions.create(model="acme/chat", messages=CHAT, max_completion_tokens=16,
                                         temperature=0, stop=[stop], user="end-user-1")
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    unbounded = client.chat.completions.create(model="acme/chat", messages=CHAT, temperature=0)
    # no max_tokens: as many as fit beside the prompt and the prefix (or until EOS)
    room = 240 - len(_templated(bb))
    assert unbounded.usage.completion_tokens <= room
    assert unbounded.choices[0].finish_reason == "stop" or unbounded.usage.completion_tokens == room


UNSUPPORTED_VALUES = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "function_call": "auto", "parallel_tool_calls": False,
    "response_format": {"type": "json_object"}, "presence_penalty": 0.5, "frequency_penalty": -1,
    "logit_bias": {"5": 10}, "audio": {"voice": "x"}, "modalities": ["text", "audio"], "prediction": {"x": 1},
    "reasoning_effort": "low", "web_search_options": {}, "store": True, "metadata": {"a": "b"},
    "service_tier": "flex",
}


def test_the_table_of_unsupported_fields_is_tested_whole():
    assert set(UNSUPPORTED_VALUES) == set(CHAT_UNSUPPORTED)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_VALUES) + ["bogus", "suffix", "echo"])
def test_every_unsupported_field_answers_422_naming_it(server, field):
    value = UNSUPPORTED_VALUES.get(field, 1)
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                   json={"model": "acme/chat", "messages": CHAT, "max_tokens": 2, field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request" and field in r.json()["error"]["message"]


@pytest.mark.parametrize("field,value", [("tools", None), ("presence_penalty", 0), ("logit_bias", {}),
                                         ("response_format", {"type": "text"}), ("tool_choice", "none"),
                                         ("store", False)])
def test_unsupported_fields_at_their_no_op_value_are_accepted(server, field, value):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                   json={"model": "acme/chat", "messages": CHAT, "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "image_url"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "tool_calls"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_chat_bodies_answer_422(server, body, needle):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                   json={"model": "acme/chat", "messages": CHAT, **body})
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]


def test_the_openai_client_sees_unsupported_fields_refused(server):
    with pytest.raises(openai.UnprocessableEntityError, match="tools"):
        _client(server).chat.completions.create(
            model="acme/chat", messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.NotFoundError):
        _client(server).chat.completions.create(model="acme/missing", messages=CHAT, max_tokens=2)


def test_text_parts_and_developer_messages_render_like_strings_and_system(server):
    client = _client(server)
    parts = [{"role": "developer", "content": [{"type": "text", "text": "you are"}, {"type": "text", "text": "terse"}]},
             {"role": "user", "content": "hello world the fox"}]
    plain = [{"role": "system", "content": "you are\nterse"}, {"role": "user", "content": "hello world the fox"}]
    a = client.chat.completions.create(model="acme/chat", messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="acme/chat", messages=plain, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_a_template_the_messages_break_answers_422(tmp_path, llama):
    from ptserve.server.chat_template import ChatTemplate

    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    template = ChatTemplate(llama[0].tokenizer, "tiny", str(strict))
    assert template.render([{"role": "user", "content": "hi"}]) == llama[0].tokenizer("x")["input_ids"]
    from ptserve.adapters_store.errors import InvalidInput

    with pytest.raises(InvalidInput, match="user first"):
        template.render([{"role": "system", "content": "hi"}])
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(Exception, match="endfor|end of template"):
        ChatTemplate(llama[0].tokenizer, "tiny", str(broken))


def test_a_template_file_given_at_start_up_wins_over_the_tokenizers(llama, tmp_path):
    bb, _ = llama
    template = tmp_path / "chat.jinja"
    template.write_text(FILE_TEMPLATE)
    ctx, url = _serve(llama, tmp_path / "store", PTSERVE_CHAT_TEMPLATE=str(template))
    try:
        done = _client(url).chat.completions.create(model="acme/chat", messages=CHAT, max_tokens=8, temperature=0)
    finally:
        ctx.__exit__(None, None, None)
    ids = _templated(bb, template=FILE_TEMPLATE)
    assert ids != _templated(bb)
    assert done.usage.prompt_tokens == len(ids)
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == _peft_text(llama, "acme/chat", ids, 8)
