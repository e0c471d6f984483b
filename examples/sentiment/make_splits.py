"""Split ``reviews.csv`` (360 hand-written review sentences, 120 per label) into ``train.jsonl`` and
``eval.jsonl``.

Stratified by label, 3 of every 4 sentences to train, with a fixed seed, so the split is reproducible:
``python examples/sentiment/make_splits.py`` rewrites the two files identically.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
EVAL_SHARE = 0.25
SEED = 0


def main() -> None:
    with open(HERE / "reviews.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(SEED)
    train, held_out = [], []
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        n_eval = round(len(group) * EVAL_SHARE)
        held_out += group[:n_eval]
        train += group[n_eval:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    for name, part in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
        print(f"{name}: {len(part)} examples")


if __name__ == "__main__":
    main()
