"""bench_quality_grid (issue 14): settings parse into typed TrainConfig changes, and the table compares each
setting with the defaults on the same seeds, task by task."""

from __future__ import annotations

import pytest

from benchmarks.bench_quality_grid import Trial, parse_setting, table
from benchmarks.quality.data import Task, holdout_of
from ptserve.server.training.data import Example


def test_settings_parse_into_typed_train_config_fields():
    assert parse_setting("mix:lr=3e-3,virtual_tokens=32,prefix_projection=true,prefix_init=tokens") == (
        "mix", {"lr": 3e-3, "virtual_tokens": 32, "prefix_projection": True, "prefix_init": "tokens"})
    assert parse_setting("wd:weight_decay=0.01")[1] == {"weight_decay": 0.01}
    with pytest.raises(SystemExit, match="no field 'learning_rate'"):
        parse_setting("bad:learning_rate=1")


def test_the_table_compares_each_setting_with_the_defaults_on_the_same_seeds():
    def t(task, setting, seed, acc):
        return Trial(task, setting, seed, acc, 0.5, 10.0, 3, 2)

    trials = [t("a", "defaults", 0, 0.80), t("a", "defaults", 1, 0.90), t("a", "x", 0, 0.85), t("a", "x", 1, 0.93),
              t("b", "defaults", 0, 0.70), t("b", "x", 0, 0.68), t("b", "x", 1, 0.99)]  # b seed 1: no defaults
    rows = {line.split(" | ")[0].strip("| "): line for line in table(trials, ["a", "b"], ["defaults", "x"]).splitlines()}
    assert "0.850 |" in rows["defaults"] and "0.700 |" in rows["defaults"]
    assert "0.890 (+4.0)" in rows["x"]  # mean of 0.85, 0.93; Δ mean of +5, +3 points
    assert "(-2.0)" in rows["x"]  # b: only seed 0 is compared
    assert "| +1.0 | 1 / 1 |" in rows["x"]


def test_the_table_scores_on_the_held_out_train_examples_where_a_run_has_them():
    trials = [Trial("a", "defaults", 0, 0.80, 0.5, 10.0, 3, 2, holdout_accuracy=0.70),
              Trial("a", "x", 0, 0.95, 0.5, 10.0, 3, 2, holdout_accuracy=0.75)]
    out = table(trials, ["a"], ["defaults", "x"])
    assert "a held-out acc (Δ)" in out
    assert "0.750 (+5.0)" in out  # the held-out accuracies, not the dev ones (+15)


def test_the_held_out_set_is_the_train_examples_past_max_train_with_labels_training_saw():
    train = [Example(f"t{i}", "x" if i % 2 else "y") for i in range(6)] + [Example("new", "z"), Example("t6", "x")]
    task = Task("a", train, [], 32, "")
    assert holdout_of(task, 4, 400) == train[4:6] + [train[7]]  # never the first 4; "z" was never trained on
    assert holdout_of(task, 4, 1) == train[4:5]
    assert holdout_of(task, 0, 400) == []  # all of train is trained on: no held-out set
