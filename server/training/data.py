"""Training data from JSONL, JSON or CSV/TSV files: labelled texts (classification, embeddings), prompt/completion
pairs (causal LM) or query/positive[/negative] pairs (embeddings), checked with messages that name the file and
line."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Pair:
    """A causal-LM training pair: the model learns to continue ``prompt`` with ``completion``."""

    prompt: str
    completion: str


def load_examples(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Labelled texts from ``.jsonl`` (object per line), ``.json`` (a list of objects), ``.csv``, ``.tsv``."""
    path = Path(path)
    examples = [_example(path, where, rec, text_field, label_field) for where, rec in _records(path)]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_pairs(
    path: str | Path, prompt_field: str = "prompt", completion_field: str = "completion"
) -> list[Pair]:
    """Prompt/completion pairs, from the same file formats as ``load_examples``."""
    path = Path(path)
    pairs = []
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise DataError(
                f"{path} {where}: expected an object with {prompt_field!r} and {completion_field!r}"
            )
        for field in (prompt_field, completion_field):
            value = rec.get(field)
            if not isinstance(value, str) or not value:
                raise DataError(
                    f"{path} {where}: {field!r} must be a non-empty string (has {sorted(rec)}); "
                    "see --prompt-field/--completion-field"
                )
        pairs.append(Pair(rec[prompt_field], rec[completion_field]))
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


@dataclass(frozen=True)
class TextPair:
    """An embedding training pair: ``query`` should lie closer to ``positive`` than to any other text (and
    in particular to ``negative``, a hard negative, when given)."""

    query: str
    positive: str
    negative: str | None = None


def load_text_pairs(
    path: str | Path, query_field: str = "query", positive_field: str = "positive",
    negative_field: str = "negative",
) -> list[TextPair]:
    """Query/positive pairs (the negative is optional, per record), from the same formats as ``load_examples``."""
    path = Path(path)
    pairs = []
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path} {where}: expected an object with {query_field!r} and {positive_field!r}")
        for field in (query_field, positive_field):
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{path} {where}: {field!r} must be a non-empty string (has {sorted(rec)}); "
                    "see --query-field/--positive-field"
                )
        negative = rec.get(negative_field)
        if negative in (None, ""):
            negative = None
        elif not isinstance(negative, str) or not negative.strip():
            raise DataError(f"{path} {where}: {negative_field!r} must be a non-empty string when given")
        pairs.append(TextPair(rec[query_field], rec[positive_field], negative))
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


def has_field(path: str | Path, field: str) -> bool:
    """Whether the first record of a data file has ``field`` (tells pairs from labelled texts)."""
    records = _records(Path(path))
    return bool(records) and isinstance(records[0][1], dict) and field in records[0][1]


def _records(path: Path) -> list[tuple[str, object]]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl(path)
    elif suffix == ".json":
        records = _json(path)
    elif suffix in (".csv", ".tsv"):
        records = _csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown format {suffix!r} (use .jsonl, .json, .csv or .tsv)")
    return records


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not JSON ({exc.msg})") from None
    return out


def _json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of objects")
    return [(f"item {i}", rec) for i, rec in enumerate(data)]


def _csv(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        # DictReader counts the header as line 1; report the file's own line numbers.
        return [(f"line {reader.line_num}", row) for row in reader]


def _example(path: Path, where: str, rec, text_field: str, label_field: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{path} {where}: expected an object with {text_field!r} and {label_field!r}")
    for field in (text_field, label_field):
        if rec.get(field) is None:
            raise DataError(
                f"{path} {where}: no field {field!r} (has {sorted(rec)}); see --text-field/--label-field"
            )
    text, label = rec[text_field], rec[label_field]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path} {where}: {text_field!r} must be a non-empty string")
    if isinstance(label, (dict, list)) or str(label).strip() == "":
        raise DataError(f"{path} {where}: {label_field!r} must be a non-empty string or number")
    return Example(text, str(label))


def label_set(train: list[Example], held_out: list[Example] | None = None) -> list[str]:
    """The labels, sorted; every evaluation label must occur in the training data."""
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise DataError(f"training data has {len(labels)} distinct label(s); a classifier needs at least 2")
    unknown = sorted({e.label for e in held_out or []} - set(labels))
    if unknown:
        raise DataError(f"evaluation labels {unknown} never occur in the training data")
    return labels


def stratified_split(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(rest, held_out): ``fraction`` of every label's examples held out (at least one from each label that has
    two or more), chosen by ``seed``; disjoint, order within each part kept. The trainer's dev split."""
    import random

    if not 0.0 < fraction < 1.0:
        raise DataError(f"a held-out fraction must lie in (0, 1), not {fraction}")
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held.update(rng.sample(idx, n) if n > 0 else [])
    rest = [e for i, e in enumerate(examples) if i not in held]
    return rest, [e for i, e in enumerate(examples) if i in held]
