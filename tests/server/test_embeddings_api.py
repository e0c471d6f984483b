"""``POST /v1/embeddings`` over real HTTP against a real ``ptserve serve``, driven by the unchanged ``openai``
client (sync and async): the bare backbone and embed adapters (ptserve blobs, and a folder PEFT itself saved)
answer what the engine and PEFT compute, several tenants' requests and classification share passes, base64 is
OpenAI's little-endian float32, every unsupported field is a 422 naming it, tenants see only their own adapters,
and usage reaches the answer and the metrics (without tenant labels)."""
from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from ptserve.adapters_store.format import encode_blob
from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE
from ptserve.server.engine import EMBEDDING, LOGITS, Row
from tests.factories import make_adapter, running_server, save_tiny_encoder

ADMIN = "embeddings-admin-key"
MAX_INPUTS = 16
TOL = 1e-5
OCTET = {"content-type": "application/octet-stream"}
TEXTS = ["How do I reset my password?", "Refunds reach the original card within five working days.", "ok",
         "The e-bike would not unlock although the map showed it fully charged."]


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}", "PTSERVE_ADMIN_KEY": ADMIN,
           "PTSERVE_MAX_INPUTS_PER_REQUEST": str(MAX_INPUTS), "PTSERVE_MAX_WAIT_MS": "20",
           "PTSERVE_BATCH_OVERHEAD_TOKENS": "256"}
    with running_server(env) as url:
        yield url


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server, timeout=60, headers=bearer(ADMIN)) as c:
        yield c


@pytest.fixture(scope="module")
def keys(admin) -> dict[str, str]:
    out = {}
    for tenant in ("alpha", "bravo"):
        r = admin.post(f"/v1/tenants/{tenant}/keys", json={"name": "embeddings"})
        assert r.status_code == 201, r.text
        out[tenant] = r.json()["key"]
    return out


@pytest.fixture(scope="module")
def adapters(admin, minilm) -> dict:
    """alpha/e (P=8) and bravo/e (P=24) embed adapters, alpha/c a classify adapter (P=4)."""
    fp = minilm.fingerprint
    made = {"alpha/e": make_adapter(fp, 8, seed=1, task="embed"), "bravo/e": make_adapter(fp, 24, seed=2, task="embed"),
            "alpha/c": make_adapter(fp, 4, seed=3)}
    for aid, adapter in made.items():
        r = admin.put(f"/v1/adapters/{aid}", content=encode_blob(adapter), headers=OCTET)
        assert r.status_code == 201, r.text
        assert r.json()["task"] == ("classify" if aid == "alpha/c" else "embed")
    return made


def oa(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def served(engine, adapter, adapter_id: str, texts: list[str], output: str = EMBEDDING) -> torch.Tensor:
    """What the engine gives each text alone (the reference for what the server answers)."""
    resident = engine.bare if adapter is None else engine.make_resident(adapter, adapter_id, 1)
    ids = engine.tokenize(texts, resident.num_virtual_tokens)
    return torch.stack([engine.run([Row(resident, i, output)])[0][0] for i in ids])


def vectors(response) -> torch.Tensor:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return torch.tensor([d.embedding for d in response.data])


def assert_error(r: httpx.Response, status: int, type_: str, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    for needle in needles:
        assert needle in body["error"]["message"], (needle, body)
    return body["error"]["message"]


# --- the openai client, sync --------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding_format", ["float", None])  # None: the client asks for base64 and decodes it
def test_bare_backbone_with_the_openai_client(server, keys, minilm, minilm_engine, encoding_format):
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = oa(server, keys["alpha"]).embeddings.create(model="minilm", input=TEXTS, **extra)
    assert response.model == "minilm" and response.object == "list"
    got = vectors(response)
    assert got.shape == (len(TEXTS), minilm.fingerprint.hidden_size)
    assert (got - served(minilm_engine, None, "", TEXTS)).abs().max() <= TOL
    tokens = sum(len(ids) for ids in minilm.tokenizer(TEXTS)["input_ids"])
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens

    one = oa(server, keys["bravo"]).embeddings.create(model="minilm", input=TEXTS[1], encoding_format="float")
    assert len(one.data) == 1 and (vectors(one)[0] - got[1]).abs().max() <= TOL


def test_embed_adapter_with_the_openai_client(server, keys, adapters, minilm_engine):
    response = oa(server, keys["alpha"]).embeddings.create(model="alpha/e", input=TEXTS, user="end-user-7")
    got = vectors(response)
    assert response.model == "alpha/e"
    assert (got - served(minilm_engine, adapters["alpha/e"], "alpha/e", TEXTS)).abs().max() <= TOL
    assert (got - served(minilm_engine, None, "", TEXTS)).abs().max() > 1e-2  # the prefix applies


def test_a_classify_adapter_embeds_under_its_prefix(server, keys, adapters, minilm_engine):
    """Decision (docs/design.md): a classify adapter may embed; its prefix applies and its head is not used."""
    got = vectors(oa(server, keys["alpha"]).embeddings.create(model="alpha/c", input=TEXTS))
    assert (got - served(minilm_engine, adapters["alpha/c"], "alpha/c", TEXTS)).abs().max() <= TOL


# --- PEFT FEATURE_EXTRACTION folders ----------------------------------------------------------------------------
def _peft_folder(model_path: str, out: Path, virtual_tokens: int, seed: int):
    """A FEATURE_EXTRACTION prefix-tuning folder saved by PEFT itself, and the PEFT model that saved it."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    base = AutoModel.from_pretrained(model_path, attn_implementation="eager").eval()
    peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                   num_virtual_tokens=virtual_tokens)).eval()
    peft.save_pretrained(out)
    return out, peft


def _files(folder: Path) -> dict:
    return {name: (name, (folder / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}


def test_peft_feature_extraction_folder_uploads_and_embeds_as_peft(server, admin, keys, minilm, tmp_path):
    folder, peft = _peft_folder(minilm.path, tmp_path / "peft", 12, seed=5)
    up = admin.put("/v1/adapters/alpha/peft", files=_files(folder))
    assert up.status_code == 201, up.text
    info = up.json()
    assert (info["task"], info["num_virtual_tokens"], info["labels"]) == ("embed", 12, [])
    assert any("accepted because the geometry fits" in n for n in info["notes"])  # PEFT recorded a local path

    got = vectors(oa(server, keys["alpha"]).embeddings.create(model="alpha/peft", input=TEXTS))
    for text, vector in zip(TEXTS, got):
        batch = minilm.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = peft(**batch).last_hidden_state[0]  # [T, H]; PEFT's prefix is in the keys and values only
        reference = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        assert (vector - reference).abs().max() <= TOL

    exported = admin.get("/v1/adapters/alpha/peft/blob")
    assert exported.status_code == 200


def test_a_peft_folder_for_another_geometry_is_refused(server, admin, minilm, tmp_path):
    tiny = save_tiny_encoder("bert", tmp_path / "tiny", minilm.path)  # 2 layers, 4 heads of 8
    folder, _ = _peft_folder(str(tiny), tmp_path / "peft-tiny", 4, seed=0)
    r = admin.put("/v1/adapters/alpha/tiny", files=_files(folder))
    assert_error(r, 422, "backbone_mismatch", f"num_layers: adapter has 2, server has {minilm.fingerprint.num_layers}")
    assert_error(admin.get("/v1/adapters/alpha/tiny"), 404, "adapter_not_found")


# --- the openai client, async: tenants and classification share passes -------------------------------------------
def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_async_clients_of_several_tenants_and_classify_share_passes(server, admin, keys, adapters, minilm_engine):
    jobs = [("alpha", "alpha/e"), ("bravo", "bravo/e"), ("alpha", "minilm"), ("bravo", "minilm"), ("alpha", "alpha/c")]
    texts = [f"{w} ride number {i}" for i, w in enumerate("late broken lovely lost refund cold quick fine".split())]
    before = admin.get("/metrics").text

    async def fire():
        clients = {t: openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=k, max_retries=0) for t, k in keys.items()}
        async with httpx.AsyncClient(base_url=server, timeout=60, headers=bearer(keys["alpha"])) as http:
            embeds = [clients[tenant].embeddings.create(model=model, input=[text], encoding_format="float")
                      for text in texts for tenant, model in jobs]
            classify = [http.post("/v1/classify", json={"adapter": "alpha/c", "inputs": [t], "return_logits": True})
                        for t in texts]
            return await asyncio.gather(*embeds), await asyncio.gather(*classify)

    embeds, classified = asyncio.run(fire())
    after = admin.get("/metrics").text
    answers = iter(embeds)
    for text in texts:
        for _, model in jobs:
            adapter = adapters.get(model)
            assert (vectors(next(answers))[0] - served(minilm_engine, adapter, model, [text])[0]).abs().max() <= TOL
    for text, r in zip(texts, classified):
        assert r.status_code == 200, r.text
        logits = torch.tensor(r.json()["predictions"][0]["logits"])
        assert (logits - served(minilm_engine, adapters["alpha/c"], "alpha/c", [text], LOGITS)[0]).abs().max() <= TOL
    rows = len(embeds) + len(classified)
    passes = _metric(after, "ptserve_batch_size_count") - _metric(before, "ptserve_batch_size_count")
    assert passes < rows / 2, f"{rows} rows took {passes} passes: requests were not batched together"


# --- formats, unsupported fields, limits ------------------------------------------------------------------------
def test_base64_is_little_endian_float32_of_the_float_list(admin):
    body = {"model": "minilm", "input": TEXTS}
    floats = admin.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()["data"]
    b64 = admin.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, b64):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (len(f["embedding"]),)
        assert np.abs(decoded - np.array(f["embedding"], dtype=np.float32)).max() <= TOL


@pytest.mark.parametrize("change, field", [
    ({"dimensions": 128}, "dimensions"),
    ({"temperature": 0.5}, "temperature"),
    ({"input": [101, 2023, 102]}, "token-id arrays"),
    ({"input": [[101, 2023, 102]]}, "token-id arrays"),
    ({"input": []}, "at least one text"),
    ({"input": 7}, "input"),
    ({"encoding_format": "int8"}, "encoding_format"),
    ({"model": None}, "model"),
])
def test_unsupported_fields_answer_422_naming_them(admin, change, field):
    body = {"model": "minilm", "input": "hello", **change}
    assert_error(admin.post("/v1/embeddings", json=body), 422, "invalid_request", field)


def test_the_openai_client_sees_422_for_dimensions(server, keys):
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        oa(server, keys["alpha"]).embeddings.create(model="minilm", input="hello", dimensions=64)


def test_limits_and_truncation(server, admin, keys, minilm):
    too_many = admin.post("/v1/embeddings", json={"model": "minilm", "input": ["x"] * (MAX_INPUTS + 1)})
    assert_error(too_many, 422, "invalid_input", f"at most {MAX_INPUTS}")
    long_text = " ".join(["word"] * 600)
    assert_error(admin.post("/v1/embeddings", json={"model": "alpha/e", "input": long_text}), 422, "input_too_long",
                 "truncate")
    cut = oa(server, keys["alpha"]).embeddings.create(model="alpha/e", input=long_text, extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == minilm.max_positions - 8  # what fits beside the 8 virtual tokens


# --- tenancy and tasks ------------------------------------------------------------------------------------------
def test_a_tenant_key_uses_only_its_own_adapters_and_the_backbone(server, admin, keys, adapters):
    alpha = httpx.Client(base_url=server, timeout=60, headers=bearer(keys["alpha"]))
    other = alpha.post("/v1/embeddings", json={"model": "bravo/e", "input": "hi"})
    missing = alpha.post("/v1/embeddings", json={"model": "bravo/nothing-here", "input": "hi"})
    assert_error(other, 404, "adapter_not_found")
    assert other.json()["error"]["message"].replace("bravo/e", "X") == \
        missing.json()["error"]["message"].replace("bravo/nothing-here", "X")  # existence never leaks
    assert alpha.post("/v1/embeddings", json={"model": "alpha/e", "input": "hi"}).status_code == 200
    assert alpha.post("/v1/embeddings", json={"model": "minilm", "input": "hi"}).status_code == 200
    assert_error(alpha.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hi"}), 404,
                 "adapter_not_found", "'minilm'")
    with pytest.raises(openai.NotFoundError):
        oa(server, keys["alpha"]).embeddings.create(model="bravo/e", input="hi")
    unauthorised = httpx.post(f"{server}/v1/embeddings", json={"model": "minilm", "input": "hi"})
    assert_error(unauthorised, 401, "unauthorized")


def test_classify_refuses_an_embed_adapter_and_an_encoder_refuses_a_generate_upload(admin, adapters, minilm):
    r = admin.post("/v1/classify", json={"adapter": "alpha/e", "inputs": ["hi"]})
    assert_error(r, 422, "wrong_task", "/v1/embeddings")
    # a generate adapter can never be served by an encoder: refused at upload (issue 10), so no route meets one
    generate = make_adapter(minilm.fingerprint, 4, seed=9, task="generate")
    r = admin.put("/v1/adapters/alpha/g", content=encode_blob(generate), headers=OCTET)
    assert_error(r, 422, "invalid_adapter", "'generate' adapter", "cannot be served here", "'classify' and 'embed'")
    assert admin.get("/v1/adapters/alpha/g").status_code == 404


def test_a_decoder_backbone_answers_422(tmp_path):
    from tests.factories import save_tiny_decoder

    decoder = save_tiny_decoder("gpt2", tmp_path / "gpt2")
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_BACKBONE": str(decoder)}
    with running_server(env) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"model": str(decoder), "input": "hi"}, timeout=30)
        assert_error(r, 422, "wrong_task", "needs an encoder")


def test_usage_is_counted_in_metrics_without_tenant_labels(admin, adapters, minilm):
    before = admin.get("/metrics").text
    r = admin.post("/v1/embeddings", json={"model": "bravo/e", "input": TEXTS})
    assert r.status_code == 200, r.text
    after = admin.get("/metrics").text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(len(i) for i in minilm.tokenizer(TEXTS)["input_ids"])
    for name, grew in (("ptserve_embedding_inputs_total", len(TEXTS)),
                       ("ptserve_embedding_tokens_total", usage["prompt_tokens"])):
        assert _metric(after, name) - _metric(before, name) == grew
    for line in after.splitlines():
        if not line.startswith("#"):
            assert not re.search(r"alpha|bravo", line), line  # no tenant or adapter in any label


def test_models_lists_the_bare_backbone_and_the_callers_classify_and_embed_adapters(server, admin, adapters, minilm):
    """/v1/models on an encoder (server/tasks.py): the bare backbone (owned by ptserve) and the caller's own
    classify and embed adapters (owned by their tenant); every model listed works as ``model`` in /v1/embeddings."""
    key = admin.post("/v1/tenants/charlie/keys", json={"name": "models"}).json()["key"]
    for aid, task in (("charlie/c", "classify"), ("charlie/e", "embed")):
        r = admin.put(f"/v1/adapters/{aid}", content=encode_blob(make_adapter(minilm.fingerprint, 4, task=task)),
                      headers=OCTET)
        assert r.status_code == 201, r.text
    listed = oa(server, key).models.list().data
    assert [(m.id, m.owned_by) for m in listed] == [("minilm", "ptserve"), ("charlie/c", "charlie"),
                                                    ("charlie/e", "charlie")]
    assert all(m.parent == "minilm" for m in listed[1:])
    for m in listed:
        assert oa(server, key).embeddings.create(model=m.id, input="hi").data[0].embedding
    everyone = {m["id"] for m in admin.get("/v1/models").json()["data"]}
    assert {"minilm", "charlie/c", "charlie/e", "alpha/e"} <= everyone
