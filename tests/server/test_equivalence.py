"""Equivalence is the first test (DESIGN decision 2): any batch mixing adapters, prefix lengths and input lengths
gives, row by row, what each request gives alone, on the backbone outputs, the pooler and the head logits. Run on
the real MiniLM and on tiny random BERT / RoBERTa built from configs.

fp32: logits and pooler within 1e-5; hidden states within 1e-5 of the row's scale (max |h|, ~5 on MiniLM), since
fp32 rounding grows with the magnitude and the length of the sequence and differs between CPUs (docs/design.md,
"Facts learned here"). float64: the same batches agree to 1e-12, which shows that what remains in fp32 is
rounding, not a mask, position or leak error (those are of order 1e-2, see the leak test below).

bfloat16 (what ``dtype=auto`` serves on CPUs with AMX/AVX512-BF16 and on CUDA): a row alone vs in a mixed batch
agrees within ``BF16_FACTOR`` x the noise HF's own bf16 backbone shows between a padded batch and the same text alone
(measured in the test, on the same texts and heads), and labels agree with float32 on >= 99.5 % of real texts.
PEFT stays the reference in float32 (tests/server/test_peft_reference.py): the fp32 and fp64 runs above carry the
exactness, bf16 carries only rounding on top of them."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import random
from pathlib import Path

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.engine import Engine, Row
from ptserve.server.heads import HEADS
from ptserve.server.training.classify import TrainConfig, train_classifier
from ptserve.server.training.data import load_examples
from tests.factories import make_adapter, real_texts, save_tiny_encoder

TOL = 1e-5
WORDS = ("the service was slow but friendly and the food arrived cold yet tasty enough for a rainy "
         "evening near the old harbour where boats rest quietly").split()


def _texts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choices(WORDS, k=rnd.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module", params=["minilm", "tiny-bert", "tiny-roberta"])
def engine(request, minilm_engine, tmp_path_factory):
    if request.param == "minilm":
        return minilm_engine
    model_type = request.param.split("-")[1]
    folder = save_tiny_encoder(model_type, tmp_path_factory.mktemp(model_type), minilm_engine.backbone.path)
    return Engine(load_backbone(str(folder), device="cpu", dtype="float32"))


def _head_kind(engine: Engine) -> str:
    return engine.backbone.family.head_kind


def _residents(engine: Engine, lengths: list[int], seed: int = 0):
    fp = engine.fp
    return [
        engine.make_resident(make_adapter(fp, p, seed=seed + i, head=_head_kind(engine)), f"t/a{i}", 1)
        for i, p in enumerate(lengths)
    ]


def _alone(engine: Engine, row: Row):
    enc, _ = engine.encode([row])
    logits, _ = engine.classify([row])
    return enc.hidden[0, : len(row.input_ids)], (enc.pooled[0] if enc.pooled is not None else None), logits[0]


def _assert_rows_match_alone(engine: Engine, rows: list[Row], tol: float = TOL) -> float:
    """Each row of one mixed pass against the same row alone; the worst difference (hidden states relative to
    the row's scale, pooler and logits absolute)."""
    enc, stats = engine.encode(rows)
    logits, _ = engine.classify(rows)
    worst = 0.0
    for i, row in enumerate(rows):
        hidden, pooled, alone_logits = _alone(engine, row)
        n = len(row.input_ids)
        scale = max(1.0, float(hidden.abs().max()))
        diffs = [(enc.hidden[i, :n] - hidden).abs().max() / scale, (logits[i] - alone_logits).abs().max()]
        if pooled is not None:
            diffs.append((enc.pooled[i] - pooled).abs().max())
        worst = max(worst, *(float(d) for d in diffs))
    assert worst <= tol, f"mixed batch differs from alone by {worst:.3g}"
    assert stats.rows == len(rows)
    return worst


@pytest.mark.parametrize("num_adapters,prefix_lengths", [
    (1, [8]), (2, [1, 64]), (4, [1, 8, 16, 64]), (6, [16, 16, 1, 8, 64, 3]),
])
def test_mixed_batch_equals_alone(engine, num_adapters, prefix_lengths):
    residents = _residents(engine, prefix_lengths[:num_adapters])
    texts = _texts(3 * num_adapters, seed=num_adapters)
    rows = [Row(residents[i % num_adapters], engine.tokenize([t], residents[i % num_adapters].num_virtual_tokens)[0])
            for i, t in enumerate(texts)]
    random.Random(0).shuffle(rows)
    _assert_rows_match_alone(engine, rows)


def _pairing_rows(engine: Engine) -> list[Row]:
    """Every prefix length x input lengths from one word to the limit: 1000 words are cut to exactly what fits
    beside the prefix, so those rows fill all ``max_position_embeddings`` positions (P + T = 512 on MiniLM)."""
    residents = _residents(engine, [1, 8, 16, 64], seed=10)
    return [Row(r, engine.tokenize([" ".join(["word"] * n)], r.num_virtual_tokens, truncate=True)[0])
            for r, n in itertools.product(residents, [1, 5, 40, 200, 1000])]


def test_every_pairing_of_prefix_and_input_length(minilm_engine):
    """All combinations of prefix lengths x input lengths, from one token to the position limit, in one batch."""
    rows = _pairing_rows(minilm_engine)
    at_limit = [r for r in rows if r.length == minilm_engine.backbone.max_positions]
    assert len(at_limit) == 4 and {r.adapter.num_virtual_tokens for r in at_limit} == {1, 8, 16, 64}
    _assert_rows_match_alone(minilm_engine, rows)


def test_in_float64_a_mixed_batch_equals_alone_to_rounding():
    """The same pairings in float64: hidden states and pooler agree to 1e-12 (measured ~1e-14), so the engine's
    batch is exact and fp32's residue is rounding alone. (Heads run in float32, so logits get 1e-6.)"""
    bb = load_backbone("minilm", device="cpu", dtype="float32")
    engine = Engine(dataclasses.replace(bb, model=bb.model.to(torch.float64), dtype=torch.float64))
    rows = _pairing_rows(engine)
    enc, _ = engine.encode(rows)
    logits, _ = engine.classify(rows)
    assert enc.hidden.dtype == torch.float64
    for i, row in enumerate(rows):
        hidden, pooled, alone_logits = _alone(engine, row)
        assert (enc.hidden[i, : len(row.input_ids)] - hidden).abs().max() <= 1e-12
        assert (enc.pooled[i] - pooled).abs().max() <= 1e-12
        assert (logits[i] - alone_logits).abs().max() <= 1e-6


def test_prefix_changes_the_output_and_rows_do_not_leak(minilm_engine):
    """The comparison above bites: swapping a row's prefix changes its outputs far beyond the tolerance."""
    engine = minilm_engine
    a, b = _residents(engine, [16, 16], seed=20)
    ids = engine.tokenize(["the food was cold"], 16)[0]
    enc, _ = engine.encode([Row(a, ids), Row(b, ids)])
    assert (enc.hidden[0] - enc.hidden[1]).abs().max() > 1e-2
    alone_a, _, _ = _alone(engine, Row(a, ids))
    assert (enc.hidden[0, : len(ids)] - alone_a).abs().max() <= TOL


def _hf_reference_hidden(model, adapter, ids: tuple[int, ...], start: int) -> torch.Tensor:
    """HF's own eager forward of one row, the prefix given as a cache (PEFT's and THUDM's way) and the real
    tokens' position ids given explicitly as start, start + 1, ...: [T, hidden]."""
    from transformers import DynamicCache

    fp, p, t = adapter.config.backbone, adapter.config.num_virtual_tokens, len(ids)
    kv = adapter.prompt_embeddings.view(1, p, fp.num_layers * 2, fp.num_kv_heads, fp.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4).split(2)  # per layer: [2 (key, value), 1, heads, P, head_dim]
    cache = DynamicCache(ddp_cache_data=[(x[0], x[1]) for x in kv])
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, p + t, dtype=torch.long),
                    token_type_ids=torch.zeros(1, t, dtype=torch.long), position_ids=(start + torch.arange(t))[None],
                    **{cache_arg: cache})
    return out.last_hidden_state[0]


def test_positions_start_at_the_rows_prefix_length(minilm_engine):
    """Each row's real tokens take positions P_row, P_row + 1, ... (DESIGN decision 1) whatever the longest prefix
    in its batch: every row of a batch mixing P = 1, 5 and 64 equals HF's eager forward given the row's prefix as
    a cache and those position ids explicitly; positions from 0, or from the batch's longest prefix, differ far
    beyond the tolerance, so the check bites."""
    from transformers import AutoModel

    engine = minilm_engine
    adapters = [make_adapter(engine.fp, p, seed=30 + i) for i, p in enumerate([1, 5, 64])]
    residents = [engine.make_resident(a, f"t/pos{i}", 1) for i, a in enumerate(adapters)]
    ids = engine.tokenize(["positions matter here, in every layer of the model"], 64)[0]
    mixed, _ = engine.encode([Row(r, ids) for r in residents])
    model = AutoModel.from_pretrained(engine.backbone.path, attn_implementation="eager", local_files_only=True)
    first, p_max = engine.backbone.family.first_position, 64
    for i, adapter in enumerate(adapters):
        p = adapter.config.num_virtual_tokens
        got = mixed.hidden[i, : len(ids)]
        reference = _hf_reference_hidden(model.eval(), adapter, ids, first + p)
        scale = max(1.0, float(reference.abs().max()))
        assert float((got - reference).abs().max()) / scale <= TOL, p
        for wrong in {first, first + p_max} - {first + p}:
            assert float((got - _hf_reference_hidden(model, adapter, ids, wrong)).abs().max()) > 1e-2, (p, wrong)


# --- bfloat16 -------------------------------------------------------------------------------------------------
BF16_FACTOR = 2.0  # ptserve may be this many times HF's own batch-vs-alone noise (measured 1.1x on the Xeon)
BF16_EPS = 2.0 ** -8  # bfloat16's unit roundoff: the floor of the bound, should HF's own noise happen to be 0
MIN_LABEL_AGREEMENT = 0.995
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sentiment"


@pytest.fixture(scope="module")
def bf16_engine() -> Engine:
    return Engine(load_backbone("minilm", device="cpu", dtype="bfloat16"))


def _row_noise(hidden, pooled, logits, hidden1, pooled1, logits1) -> tuple[float, float, float]:
    """(hidden relative to the row's scale, pooler absolute, logits relative to their scale) of one row."""
    h_scale = max(1.0, float(hidden1.abs().max()))
    l_scale = max(1.0, float(logits1.abs().max()))
    return (float((hidden.float() - hidden1.float()).abs().max()) / h_scale,
            float((pooled.float() - pooled1.float()).abs().max()),
            float((logits - logits1).abs().max()) / l_scale)


def _hf_bf16_noise(engine: Engine, texts: list[str], heads: list) -> tuple[float, float, float]:
    """HF's bare bf16 backbone (sdpa, no prefix): each text in one padded batch vs alone, worst per quantity;
    logits through ``heads[i]`` in float32, as ptserve applies them."""
    from transformers import AutoModel

    dev = engine.backbone.device
    model = AutoModel.from_pretrained(engine.backbone.path, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = model.to(dev).eval()
    tok = engine.backbone.tokenizer

    def logits(head, pooled):
        return HEADS[head.config.head](pooled.float()[None], None, head.head)[0]

    worst = [0.0, 0.0, 0.0]
    with torch.inference_mode():
        batch = model(**tok(texts, padding=True, return_tensors="pt").to(dev))
        for i, text in enumerate(texts):
            alone = model(**tok([text], return_tensors="pt").to(dev))
            n = alone.last_hidden_state.shape[1]
            noise = _row_noise(batch.last_hidden_state[i, :n], batch.pooler_output[i],
                               logits(heads[i], batch.pooler_output[i]), alone.last_hidden_state[0],
                               alone.pooler_output[0], logits(heads[i], alone.pooler_output[0]))
            worst = [max(w, x) for w, x in zip(worst, noise)]
    return tuple(worst)


def test_in_bfloat16_a_mixed_batch_equals_alone_within_hf_own_rounding(bf16_engine):
    assert_bf16_rows_match_alone(bf16_engine)


def assert_bf16_rows_match_alone(engine: Engine) -> None:
    """The bf16 contract on ``engine`` (any device): mixed rows vs alone within BF16_FACTOR x HF's own noise."""
    residents = _residents(engine, [16, 16, 1, 8, 64, 3])
    texts = _texts(18, seed=6)
    rows = [Row(residents[i % 6], engine.tokenize([t], residents[i % 6].num_virtual_tokens)[0])
            for i, t in enumerate(texts)]
    baseline = _hf_bf16_noise(engine, texts, [r.adapter for r in rows])
    bounds = [BF16_FACTOR * max(b, BF16_EPS) for b in baseline]
    enc, _ = engine.encode(rows)
    logits, _ = engine.classify(rows)
    assert enc.hidden.dtype == torch.bfloat16 and logits[0].dtype == torch.float32  # heads in float32
    worst = [0.0, 0.0, 0.0]
    for i, row in enumerate(rows):
        hidden, pooled, alone_logits = _alone(engine, row)
        n = len(row.input_ids)
        noise = _row_noise(enc.hidden[i, :n], enc.pooled[i], logits[i], hidden, pooled, alone_logits)
        worst = [max(w, x) for w, x in zip(worst, noise)]
    for name, w, b, bound in zip(("hidden", "pooler", "logits"), worst, baseline, bounds):
        assert w <= bound, f"bf16 {name}: mixed vs alone {w:.3g} > {bound:.3g} ({BF16_FACTOR} x HF's own {b:.3g})"
    # the bound bites: the same text under another adapter's prefix differs far beyond it
    a, b = residents[0], residents[1]
    ids = engine.tokenize([texts[0]], 16)[0]
    swapped, _ = engine.encode([Row(a, ids), Row(b, ids)])
    h = swapped.hidden[:, : len(ids)].float()
    assert float((h[0] - h[1]).abs().max()) / max(1.0, float(h[0].abs().max())) > 5 * bounds[0]


@pytest.fixture(scope="module")
def sentiment_adapter(minilm):
    """A prefix trained on the example reviews (2 epochs, ~3 s): real margins, unlike a random head."""
    cfg = TrainConfig(virtual_tokens=8, epochs=2, lr=2e-2, batch_size=16, seed=0)
    return train_classifier(minilm, load_examples(EXAMPLES / "train.jsonl"), None, cfg).adapter


def _classify_all(engine: Engine, adapter, texts: list[str]) -> torch.Tensor:
    resident = engine.make_resident(adapter, "t/sentiment", 1)
    rows = [Row(resident, ids) for ids in engine.tokenize(texts, resident.num_virtual_tokens, truncate=True)]
    return torch.stack([x for k in range(0, len(rows), 32) for x in engine.classify(rows[k: k + 32])[0]])


def test_bfloat16_labels_agree_with_float32_on_real_texts(minilm_engine, bf16_engine, sentiment_adapter):
    assert_labels_agree(minilm_engine, bf16_engine, sentiment_adapter)


def assert_labels_agree(fp32_engine: Engine, bf16_engine: Engine, adapter) -> None:
    texts = real_texts()
    assert len(texts) >= 360
    fp32 = _classify_all(fp32_engine, adapter, texts)
    bf16 = _classify_all(bf16_engine, adapter, texts)
    agree = fp32.argmax(1) == bf16.argmax(1)
    assert float(agree.float().mean()) >= MIN_LABEL_AGREEMENT, f"{int((~agree).sum())} of {len(texts)} differ"
    # and every label that does differ is a near-tie in float32, within bf16's own logit noise
    top2 = fp32.topk(2, dim=1).values
    margin, noise = top2[:, 0] - top2[:, 1], float((fp32 - bf16).abs().max())
    assert bool((margin[~agree] <= 2 * noise).all()), [texts[i] for i in (~agree).nonzero().flatten().tolist()]
