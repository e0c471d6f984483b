"""Equivalence is the first test (DESIGN decision 2): any batch mixing adapters, prefix lengths and input lengths
gives, row by row, what each request gives alone (fp32, max abs diff <= 1e-5) on the backbone outputs, the pooler
and the head logits. Run on the real MiniLM and on tiny random BERT / RoBERTa built from configs."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from server.backbone import load_backbone
from server.engine import Engine, Row
from tests.factories import make_adapter, save_tiny_encoder

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


def _assert_rows_match_alone(engine: Engine, rows: list[Row]) -> float:
    enc, stats = engine.encode(rows)
    logits, _ = engine.classify(rows)
    worst = 0.0
    for i, row in enumerate(rows):
        hidden, pooled, alone_logits = _alone(engine, row)
        n = len(row.input_ids)
        diffs = [(enc.hidden[i, :n] - hidden).abs().max(), (logits[i] - alone_logits).abs().max()]
        if pooled is not None:
            diffs.append((enc.pooled[i] - pooled).abs().max())
        worst = max(worst, *(float(d) for d in diffs))
    assert worst <= TOL, f"mixed batch differs from alone by {worst:.3g}"
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


def test_every_pairing_of_prefix_and_input_length(minilm_engine):
    """All combinations of prefix lengths x input lengths (incl. one-token-long and near-limit inputs) in one batch."""
    engine = minilm_engine
    residents = _residents(engine, [1, 8, 16, 64], seed=10)
    lengths = [1, 5, 40, 200]
    rows = []
    for r, n in itertools.product(residents, lengths):
        ids = engine.tokenize([" ".join(["word"] * n)], r.num_virtual_tokens, truncate=True)[0]
        rows.append(Row(r, ids))
    _assert_rows_match_alone(engine, rows)


def test_prefix_changes_the_output_and_rows_do_not_leak(minilm_engine):
    """The comparison above bites: swapping a row's prefix changes its outputs far beyond the tolerance."""
    engine = minilm_engine
    a, b = _residents(engine, [16, 16], seed=20)
    ids = engine.tokenize(["the food was cold"], 16)[0]
    enc, _ = engine.encode([Row(a, ids), Row(b, ids)])
    assert (enc.hidden[0] - enc.hidden[1]).abs().max() > 1e-2
    alone_a, _, _ = _alone(engine, Row(a, ids))
    assert (enc.hidden[0, : len(ids)] - alone_a).abs().max() <= TOL


def test_positions_start_at_the_rows_prefix_length(minilm_engine):
    """A row keeps its own position offset (P) whatever the longest prefix in its batch is."""
    engine = minilm_engine
    short, long_ = _residents(engine, [1, 64], seed=30)
    ids = engine.tokenize(["positions matter here"], 64)[0]
    mixed, _ = engine.encode([Row(short, ids), Row(long_, ids)])
    enc_long, _ = engine.encode([Row(long_, ids)])
    assert (mixed.hidden[1, : len(ids)] - enc_long.hidden[0, : len(ids)]).abs().max() <= TOL

