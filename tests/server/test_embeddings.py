"""Embeddings in the engine: the bare backbone's equal HF's own forward mean-pooled (and sentence-transformers'
all-MiniLM-L6-v2), an adapter's equal PEFT's FEATURE_EXTRACTION prefix model mean-pooled, and a pass mixing
several tenants' embed adapters, the bare backbone and classification rows gives every row what it gets alone.
All in fp32, to 1e-5 (embeddings are unit vectors: their entries are ~0.05)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ptserve.server.backbone import load_backbone
from ptserve.server.engine import EMBEDDING, LOGITS, Engine, Row
from tests.factories import make_adapter, save_tiny_encoder

TOL = 1e-5
TEXTS = [
    "How do I reset my password?",
    "Refunds reach the original card within five working days, unless your bank takes longer to process them.",
    "ok",
    "The e-bike would not unlock although the map showed it fully charged, so I walked to the next station.",
]


def _reference_mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling + Normalize, written out: [B, T, H], [B, T] -> [B, H]."""
    mask = attention_mask[:, :, None].float()
    return F.normalize((last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)


def _embed(engine: Engine, resident, texts: list[str]) -> torch.Tensor:
    ids = engine.tokenize(texts, resident.num_virtual_tokens)
    out, _ = engine.run([Row(resident, i, EMBEDDING) for i in ids])
    return torch.stack(out)


def test_bare_backbone_equals_hf_forward_mean_pooled(minilm, minilm_engine):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm.path).eval()  # HF's own attention (sdpa), its own mask and positions
    batch = minilm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = _reference_mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"])
    ours = _embed(minilm_engine, minilm_engine.bare, TEXTS)  # one padded pass
    assert ours.shape == (len(TEXTS), minilm.fingerprint.hidden_size)
    assert (ours - reference).abs().max() <= TOL
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
    assert (reference[0] - reference[1]).abs().max() > 1e-2  # different texts, different vectors: the check bites


def test_bare_backbone_equals_sentence_transformers(minilm, minilm_engine):
    """The bundled model folder is a sentence-transformers one (Pooling mean + Normalize): its own encode agrees."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm.path, device="cpu")
    reference = st.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    assert (_embed(minilm_engine, minilm_engine.bare, TEXTS) - reference).abs().max() <= TOL


@pytest.mark.parametrize("virtual_tokens", [1, 8, 32])
def test_embed_adapter_equals_peft_feature_extraction_mean_pooled(minilm, minilm_engine, virtual_tokens):
    from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel

    adapter = make_adapter(minilm.fingerprint, virtual_tokens, seed=virtual_tokens, task="embed")
    base = AutoModel.from_pretrained(minilm.path, attn_implementation="eager").eval()
    peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                   num_virtual_tokens=virtual_tokens)).eval()
    set_peft_model_state_dict(peft, {"prompt_embeddings": adapter.prompt_embeddings})
    references = []
    for text in TEXTS:  # PEFT one text at a time: its mask has no padding to get wrong
        batch = minilm.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            references.append(_reference_mean_pool(peft(**batch).last_hidden_state, batch["attention_mask"])[0])
    resident = minilm_engine.make_resident(adapter, "acme/embed", 1)
    ours = _embed(minilm_engine, resident, TEXTS)
    assert (ours - torch.stack(references)).abs().max() <= TOL
    bare = _embed(minilm_engine, minilm_engine.bare, TEXTS)
    assert (ours - bare).abs().max() > 1e-2  # the prefix changes the embedding


@pytest.fixture(scope="module", params=["minilm", "tiny-roberta"])
def engine(request, minilm_engine, tmp_path_factory):
    """MiniLM, and a tiny RoBERTa (positions start at padding_idx + 1: the bare rows' offset differs)."""
    if request.param == "minilm":
        return minilm_engine
    folder = save_tiny_encoder("roberta", tmp_path_factory.mktemp("roberta"), minilm_engine.backbone.path)
    return Engine(load_backbone(str(folder), device="cpu", dtype="float32"))


def test_mixed_pass_equals_each_row_alone(engine):
    """Three tenants' embed adapters (P = 1, 8, 24), the bare backbone and two classify adapters' logits rows, in
    one shuffled pass: each row's output equals the same row run alone, and a classify row gives its head's
    logits while an embedding row under the same classify adapter gives the pooled vector."""
    fp, head = engine.fp, engine.backbone.family.head_kind
    embedders = [engine.make_resident(make_adapter(fp, p, seed=p, task="embed"), f"t{p}/e", 1) for p in (1, 8, 24)]
    classifiers = [engine.make_resident(make_adapter(fp, p, seed=50 + p, head=head), f"c{p}/x", 1) for p in (4, 16)]
    rnd = random.Random(0)
    rows = []
    for i, text in enumerate(TEXTS * 3):
        text = " ".join(text.split()[: rnd.randint(1, 20)])
        for resident, output in ([(r, EMBEDDING) for r in embedders + [engine.bare]]
                                 + [(c, LOGITS) for c in classifiers] + [(classifiers[i % 2], EMBEDDING)]):
            rows.append(Row(resident, engine.tokenize([text], resident.num_virtual_tokens)[0], output))
    rnd.shuffle(rows)
    mixed, stats = engine.run(rows)
    assert stats.rows == len(rows)
    hidden = engine.fp.hidden_size
    worst = 0.0
    for row, got in zip(rows, mixed):
        (alone,), _ = engine.run([row])
        assert got.shape == ((hidden,) if row.output == EMBEDDING else (len(row.adapter.labels),))
        worst = max(worst, float((got - alone).abs().max()))
    assert worst <= TOL, f"mixed pass differs from alone by {worst:.3g}"


def test_a_classify_adapter_embeds_under_its_prefix(minilm_engine):
    """A classify adapter used for embeddings applies its prefix and ignores its head: its vectors are those of an
    embed adapter with the same prefix, not the bare backbone's."""
    fp = minilm_engine.fp
    classifier = make_adapter(fp, 8, seed=3)
    same_prefix = make_adapter(fp, 8, seed=3, task="embed")
    assert torch.equal(classifier.prompt_embeddings, same_prefix.prompt_embeddings)
    as_classifier = _embed(minilm_engine, minilm_engine.make_resident(classifier, "a/c", 1), TEXTS)
    as_embedder = _embed(minilm_engine, minilm_engine.make_resident(same_prefix, "a/e", 1), TEXTS)
    assert torch.equal(as_classifier, as_embedder)
    assert (as_classifier - _embed(minilm_engine, minilm_engine.bare, TEXTS)).abs().max() > 1e-2


def test_padding_and_prefix_slots_do_not_enter_the_mean(minilm_engine):
    """A short text beside a long one and beside a long prefix: the same vector as alone (pad columns and pad
    prefix slots are out of the mean), and not the mean over the padded width."""
    engine = minilm_engine
    long_prefix = engine.make_resident(make_adapter(engine.fp, 64, seed=9, task="embed"), "z/long", 1)
    short = Row(engine.bare, engine.tokenize(["ok"], 0)[0], EMBEDDING)
    long_text = Row(engine.bare, engine.tokenize([" ".join(["word"] * 100)], 0)[0], EMBEDDING)
    beside_prefix = Row(long_prefix, engine.tokenize(["ok"], 64)[0], EMBEDDING)
    (alone,), _ = engine.run([short])
    batch, _ = engine.run([short, long_text, beside_prefix])
    assert (batch[0] - alone).abs().max() <= TOL
    enc, _ = engine.encode([short, long_text])
    over_padding = F.normalize(enc.hidden[0].mean(0), dim=0)  # what a pooling that forgot the mask would give
    assert (over_padding - alone).abs().max() > 1e-2
