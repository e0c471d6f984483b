"""Training data loading: formats, messages that name the line, label checks, and the shipped example set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ptserve.server.training.data import DataError, Example, label_set, load_examples, stratified_split

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "sentiment"


def test_jsonl_json_csv_tsv_give_the_same_examples(tmp_path):
    rows = [{"sentence": "good, very good", "y": 1}, {"sentence": 'a "quoted" bad one', "y": 0}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for name, delim in (("a.csv", ","), ("a.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, ["sentence", "y"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    want = [Example("good, very good", "1"), Example('a "quoted" bad one', "0")]
    for name in ("a.jsonl", "a.json", "a.csv", "a.tsv"):
        assert load_examples(tmp_path / name, "sentence", "y") == want, name


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "x", "label": "a"}\n{"text": "y"}\n', "line 2: no field 'label'"),
        ('{"text": "x", "label": "a"}\nnot json\n', "line 2: not JSON"),
        ('{"text": "", "label": "a"}\n', "line 1: 'text' must be a non-empty string"),
        ('{"text": "x", "label": ["a"]}\n', "line 1: 'label' must be a non-empty string or number"),
        ('["x", "a"]\n', "line 1: expected an object"),
        ("\n\n", "no examples"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_csv_errors_use_file_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,a\n,b\n")
    with pytest.raises(DataError, match="line 3: 'text' must be a non-empty string"):
        load_examples(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_examples(tmp_path / "d.parquet")


def test_label_set_is_sorted_and_checks_eval_labels():
    train = [Example("a", "pos"), Example("b", "neg"), Example("c", "pos")]
    assert label_set(train, [Example("d", "neg")]) == ["neg", "pos"]
    with pytest.raises(DataError, match=r"evaluation labels \['meh'\] never occur"):
        label_set(train, [Example("d", "meh")])
    with pytest.raises(DataError, match="at least 2"):
        label_set([Example("a", "pos")])


def test_example_sentiment_split_is_disjoint_balanced_and_complete():
    full = load_examples(EXAMPLES / "reviews.csv")
    train, held_out = load_examples(EXAMPLES / "train.jsonl"), load_examples(EXAMPLES / "eval.jsonl")
    assert len(full) == 360 and len(train) == 270 and len(held_out) == 90
    assert not {e.text for e in train} & {e.text for e in held_out}
    assert sorted(train + held_out, key=lambda e: e.text) == sorted(full, key=lambda e: e.text)
    assert len({e.text for e in full}) == 360  # no duplicate sentences
    for part, n in ((train, 90), (held_out, 30)):
        assert {label: sum(e.label == label for e in part) for label in label_set(part)} == {
            "negative": n,
            "neutral": n,
            "positive": n,
        }


def _labelled(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_stratified_split_is_stratified_disjoint_and_seeded():
    examples = _labelled({"a": 40, "b": 20, "c": 7, "d": 1})
    rest, held = stratified_split(examples, 0.15, seed=3)
    assert sorted(rest + held, key=examples.index) == examples  # a partition: nothing lost or repeated
    assert not set(rest) & set(held)
    count = lambda xs, label: sum(e.label == label for e in xs)  # noqa: E731
    assert [count(held, x) for x in "abcd"] == [6, 3, 1, 0]  # 15 % of each label, at least one, never a lone one
    assert [count(rest, x) for x in "abcd"] == [34, 17, 6, 1]
    assert stratified_split(examples, 0.15, seed=3) == (rest, held)  # seeded: the same split again
    assert stratified_split(examples, 0.15, seed=4)[1] != held  # another seed, another dev split
    with pytest.raises(DataError, match="fraction"):
        stratified_split(examples, 1.0, seed=0)
