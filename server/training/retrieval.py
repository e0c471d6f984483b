"""Retrieval quality of embeddings on held-out data: recall@1 and MRR, the numbers ``ptserve train --task embed``
early-stops on and ``benchmarks/bench_embed.py`` reports for the bare backbone and a trained prefix.

Two kinds of evaluation data: query/positive pairs (each query must find its positive among every distinct
positive and negative text of the set) and labelled texts (each text must find a text of its own label among
the others, itself left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ptserve.server.training.data import Example, TextPair


@dataclass(frozen=True)
class RetrievalSet:
    queries: list[str]
    corpus: list[str]
    relevant: list[frozenset[int]]  # per query: the corpus entries that count as a hit
    itself: list[int | None]  # per query: its own corpus entry, never ranked (labelled texts)


@dataclass(frozen=True)
class RetrievalEval:
    recall_at_1: float
    mrr: float
    loss: float  # cross-entropy of the relevant entries under softmax(cosine / temperature)
    queries: int  # queries with at least one relevant entry (the others are not scored)


def from_pairs(pairs: list[TextPair]) -> RetrievalSet:
    corpus = sorted({p.positive for p in pairs} | {p.negative for p in pairs if p.negative})
    index = {text: i for i, text in enumerate(corpus)}
    return RetrievalSet([p.query for p in pairs], corpus, [frozenset({index[p.positive]}) for p in pairs],
                        [None] * len(pairs))


def from_examples(examples: list[Example]) -> RetrievalSet:
    texts = [e.text for e in examples]
    relevant = [frozenset(j for j, o in enumerate(examples) if o.label == e.label and j != i)
                for i, e in enumerate(examples)]
    return RetrievalSet(texts, texts, relevant, list(range(len(texts))))


def retrieval_set(data: list[TextPair] | list[Example]) -> RetrievalSet:
    return from_pairs(data) if isinstance(data[0], TextPair) else from_examples(data)


def evaluate_retrieval(
    embed: Callable[[list[str]], torch.Tensor],  # texts -> [N, H] unit vectors
    rs: RetrievalSet,
    temperature: float = 0.05,
) -> RetrievalEval:
    scores = embed(rs.queries).float() @ embed(rs.corpus).float().T  # [Q, C] cosine similarities
    for q, own in enumerate(rs.itself):
        if own is not None:
            scores[q, own] = float("-inf")
    hits, reciprocal, losses = [], [], []
    for q, relevant in enumerate(rs.relevant):
        if not relevant:
            continue
        row, rel = scores[q], torch.tensor(sorted(relevant))
        best = row[rel].max()
        rank = 1 + int((row > best).sum())  # ties count in the query's favour
        hits.append(rank == 1)
        reciprocal.append(1.0 / rank)
        logits = row / temperature
        losses.append(float(torch.logsumexp(logits, 0) - torch.logsumexp(logits[rel], 0)))
    n = len(hits)
    if n == 0:
        raise ValueError("no evaluation query has a relevant entry (labelled texts need 2+ of a label)")
    return RetrievalEval(sum(hits) / n, sum(reciprocal) / n, sum(losses) / n, n)
