"""The lean classify answer (issue 12): ``classify_body`` writes the bytes the response model wrote (one softmax
over all rows instead of one per row, no revalidation), and the engine's direct tokenizer gives the wrapper's ids."""
from __future__ import annotations

import torch
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ptserve.server.api.predictions import classify_body
from ptserve.server.api.schemas import ClassifyResponse, Prediction, Usage
from tests.factories import real_texts


def model_bytes(adapter, version, labels, logits, with_logits, tokens) -> bytes:
    """What the route answered before: a ``ClassifyResponse`` of per-row softmaxes, through FastAPI's encoder."""
    predictions = []
    for row in logits:
        probs = torch.softmax(row, dim=-1)
        best = int(probs.argmax())
        predictions.append(Prediction(label=labels[best], score=float(probs[best]),
                                      scores={label: float(p) for label, p in zip(labels, probs)},
                                      logits=[float(x) for x in row] if with_logits else None))
    response = ClassifyResponse(adapter=adapter, version=version, predictions=predictions,
                                usage=Usage(input_tokens=tokens))
    assert isinstance(response, BaseModel)
    return JSONResponse(jsonable_encoder(response)).body


def test_the_body_is_the_response_models_bytes():
    labels = ("negative", "neutral", "positivé ☃")  # non-ASCII: written as UTF-8, not escaped
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        logits = [torch.randn(3, generator=g) * 6 for _ in range(1 + seed % 17)]
        for with_logits in (False, True):
            new = classify_body("acme/sentiment", 7, labels, logits, with_logits, 40 + seed)
            assert new == model_bytes("acme/sentiment", 7, labels, logits, with_logits, 40 + seed), seed


def test_ties_pick_the_first_label_like_argmax_did():
    body = classify_body("a/b", 1, ("x", "y"), [torch.zeros(2)], False, 1)
    assert b'"label":"x"' in body and body == model_bytes("a/b", 1, ("x", "y"), [torch.zeros(2)], False, 1)


def test_the_direct_tokenizer_gives_the_wrappers_ids(minilm_engine):
    texts = real_texts()[:200] + ["", " ", "héllo wörld ☃ 日本語", "a\u0301b", "UPPER lower MiXeD"]
    tok = minilm_engine.backbone.tokenizer
    want = [tuple(r) for r in tok(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    assert minilm_engine.tokenize(texts, 16) == want
    assert [minilm_engine.tokenize([t], 16)[0] for t in texts] == want
    # a call of the wrapper that truncates leaves no state behind that the direct path would pick up
    tok(texts[:3], truncation=True, max_length=5, padding="max_length")
    assert minilm_engine.tokenize(texts[:3], 16) == want[:3]
