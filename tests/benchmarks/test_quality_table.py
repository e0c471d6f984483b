"""bench_quality's table (issue 14): the target's Δ against full fine-tuning, and, where runs were also scored on
held-out train examples, that second sample's accuracy and its Δ on the seeds both methods have."""

from __future__ import annotations

from benchmarks.bench_quality import Run, table
from benchmarks.quality.data import Task
from ptserve.server.training.data import Example


def run(method, seed, acc, held=None):
    return Run("t", method, seed, acc, 0.9, 100.0, 5, 20.0, holdout_accuracy=held)


TASK = Task("t", [Example("a", "x"), Example("b", "y")], [Example("c", "x")], 32, "")


def rows(text: str) -> dict[str, str]:
    return {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| t (")}


def test_runs_without_a_held_out_score_keep_the_table_as_it_was():
    text = table([run("full", 0, 0.90), run("prefix", 0, 0.85)], [TASK])
    assert "held-out" not in text
    assert rows(text)["prefix"].endswith("| -5.0 |")


def test_the_held_out_column_gives_its_own_delta_against_full_on_shared_seeds():
    runs = [run("full", 0, 0.90, 0.88), run("full", 1, 0.80, 0.84), run("prefix", 0, 0.85, 0.87),
            run("prefix", 1, 0.82, 0.86), run("prefix", 2, 0.70, 0.50), run("probe", 0, 0.80)]
    text = table(runs, [TASK])
    assert "held-out accuracy (Δ vs full) |" in text.splitlines()[0]
    r = rows(text)
    assert r["full"].endswith("| 0.860 ± 0.028 |")
    # prefix: seeds 0 and 1 are compared (-1, +2 points), seed 2 has no full run to compare with
    assert r["prefix"].endswith("(+0.5) |") and "0.743 ± 0.211 (+0.5)" in r["prefix"]
    assert r["probe"].endswith("| -5.0 | |")  # no held-out score: an empty cell, the columns still line up
    assert all(line.count("|") == text.splitlines()[0].count("|") for line in text.splitlines()[:5])


def test_bf16_runs_are_rows_of_their_own_compared_with_full_in_float32():
    def bf(method, seed, acc, bf16):
        return Run("t", method, seed, acc, 0.9, 100.0, 5, 20.0, bf16=bf16)

    runs = [bf("full", 0, 0.90, False), bf("full", 0, 0.80, True), bf("prefix", 0, 0.88, False),
            bf("prefix", 0, 0.86, True)]
    r = rows(table(runs, [TASK]))
    assert list(r) == ["prefix", "prefix (bf16)", "full", "full (bf16)"]  # METHODS order, float32 first
    assert r["prefix"].endswith("| -2.0 |") and r["prefix (bf16)"].endswith("| -4.0 |")
    assert r["full (bf16)"].endswith("| -10.0 |") and r["full"].endswith("|  |")
    # runs saved before the field (None) are the method's plain row, as before
    assert list(rows(table([run("full", 0, 0.9), run("prefix", 0, 0.8)], [TASK]))) == ["prefix", "full"]


def test_a_run_samples_each_split_and_may_cut_texts_shorter_for_every_method():
    from argparse import Namespace

    from benchmarks.bench_quality import sampled

    task = Task("t", [Example(f"a{i}", "x" if i % 2 else "y") for i in range(10)],
                [Example("c", "x"), Example("d", "z"), Example("e", "y")], 96, "d")
    cut = sampled(task, Namespace(max_train=4, max_test=0, max_length=0))
    assert cut.train == task.train[:4] and cut.max_length == 96
    assert [e.text for e in cut.test] == ["c", "e"]  # "z" is no label of the train sample: it cannot be scored
    longer = sampled(task, Namespace(max_train=0, max_test=1, max_length=192))
    assert longer.train == task.train and longer.test == task.test[:1] and longer.max_length == 192
