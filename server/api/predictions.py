"""The ``/v1/classify`` answer, built in one step from a request's logits: one softmax over all its rows (not
one per row), plain floats, and the JSON bytes written directly (the route returns them as a ``Response``, so
FastAPI neither revalidates a ``ClassifyResponse`` nor walks it with ``jsonable_encoder``). The bytes are what
the response model gave: same keys in the same order, ``logits: null`` when not asked for, floats as Python
writes them (float32 values widened), the encoding of FastAPI's ``JSONResponse``. ``ClassifyResponse`` stays
the route's ``response_model``: the OpenAPI document does not change.
"""
from __future__ import annotations

import json

import torch
from fastapi.responses import Response

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode  # JSONResponse's


def classify_body(adapter: str, version: int, labels: tuple[str, ...], logits: torch.Tensor | list[torch.Tensor],
                  with_logits: bool, input_tokens: int) -> bytes:
    """``logits``: [inputs, labels] float32, or one [labels] tensor per input, in input order."""
    stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(logits)  # [inputs, labels]
    probs = torch.softmax(stacked, dim=-1)
    best = probs.argmax(dim=-1).tolist()
    rows = probs.tolist()
    raw = stacked.tolist() if with_logits else None
    predictions = [
        {"label": labels[b], "score": row[b], "scores": dict(zip(labels, row)),
         "logits": raw[i] if raw is not None else None}
        for i, (b, row) in enumerate(zip(best, rows))
    ]
    return _encode({"adapter": adapter, "version": version, "predictions": predictions,
                    "usage": {"input_tokens": input_tokens}}).encode("utf-8")


def classify_response(*args, **kwargs) -> Response:
    return Response(classify_body(*args, **kwargs), media_type="application/json")
