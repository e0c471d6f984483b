"""Build the help-desk retrieval data set from ``articles.jsonl`` (16 hand-written help articles of a made-up
bike-sharing service) and ``queries.csv`` (240 hand-written customer questions, 15 per article, worded unlike
their article on purpose).

``train.jsonl``: 10 questions per article as ``{"query", "positive", "negative"}`` (the positive is the article's
text, the negative the text of an article it is easily confused with); ``eval.jsonl``: the other 5 per article as
``{"query", "positive"}``. The retrieval task: find each question's article among all 16. Split by article with a
fixed seed, so ``python examples/helpdesk/make_splits.py`` rewrites both files identically.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
EVAL_PER_ARTICLE = 5
SEED = 0
# The article a question is most easily mistaken for: the hard negative of its training pairs.
CONFUSED_WITH = {
    "unlock": "battery", "end-ride": "parking", "parking": "end-ride", "pricing": "student",
    "plan-cancel": "account-delete", "refund": "payment-failed", "payment-failed": "refund", "damage": "accident",
    "accident": "damage", "lost-item": "damage", "account-delete": "plan-cancel", "sign-in": "account-delete",
    "battery": "unlock", "student": "pricing", "group-ride": "unlock", "fines": "parking",
}


def main() -> None:
    articles = {}
    for line in (HERE / "articles.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        articles[rec["id"]] = rec["text"]
    with open(HERE / "queries.csv", newline="", encoding="utf-8") as f:
        queries = list(csv.DictReader(f))
    rng = random.Random(SEED)
    train, held_out = [], []
    for article in articles:
        group = [q["query"] for q in queries if q["article"] == article]
        rng.shuffle(group)
        positive, negative = articles[article], articles[CONFUSED_WITH[article]]
        held_out += [{"query": q, "positive": positive} for q in group[:EVAL_PER_ARTICLE]]
        train += [{"query": q, "positive": positive, "negative": negative} for q in group[EVAL_PER_ARTICLE:]]
    rng.shuffle(train)
    rng.shuffle(held_out)
    for name, part in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for rec in part:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{name}: {len(part)} pairs")


if __name__ == "__main__":
    main()
