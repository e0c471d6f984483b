"""``ptserve train`` end to end: CSV/JSONL data in, adapter files out, uploaded to a real server that then
answers with the trainer's predictions; and a clear message with exit code 2 for every bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptserve.client import Client
from ptserve.server.cli import app
from ptserve.server.training.data import load_examples
from tests.factories import free_port, running_server

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "sentiment"
runner = CliRunner()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """60 training examples as CSV (custom column names) and 30 evaluation examples as JSONL."""
    d = tmp_path_factory.mktemp("data")
    train = load_examples(EXAMPLES / "train.jsonl")
    per_label = {
        label: [e for e in train if e.label == label][:20] for label in ("negative", "neutral", "positive")
    }
    with open(d / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows((e.text, e.label) for group in per_label.values() for e in group)
    held_out = load_examples(EXAMPLES / "eval.jsonl")[:30]
    (d / "eval.jsonl").write_text(
        "".join(json.dumps({"review": e.text, "sentiment": e.label}) + "\n" for e in held_out)
    )
    return d, [e.text for e in held_out]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server({"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}"}) as url:
        yield url


def train_args(d: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(d / "train.csv"),
        "--eval-data",
        str(d / "eval.jsonl"),
        "--text-field",
        "review",
        "--label-field",
        "sentiment",
        "--virtual-tokens",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "2e-2",
        "--threads",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_train_writes_uploads_and_serves_what_it_evaluated(small_data, server, tmp_path):
    d, eval_texts = small_data
    res = runner.invoke(
        app, train_args(d, tmp_path / "out", "--upload", "acme/cli-trained", "--server", server, "--json")
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["labels"] == ["negative", "neutral", "positive"] and summary["epochs_run"] == 2
    assert summary["uploaded"]["id"] == "acme/cli-trained" and summary["uploaded"]["num_virtual_tokens"] == 4
    assert "epoch 1: train loss" in res.stderr and "eval accuracy" in res.stderr  # the progress lines
    for name in ("adapter.safetensors", "training.json", "training.svg"):
        assert (tmp_path / "out" / name).is_file(), name
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["config"]["virtual_tokens"] == 4 and len(record["history"]) == 2
    # MiniLM's default head is the mean-pooled one, which PEFT does not have: no peft/ folder, and the reason
    assert summary["head"] == record["head"] == "mean_linear" and not (tmp_path / "out" / "peft").exists()
    assert "PEFT has no mean-pooled classification head" in record["peft_export"]
    with Client(server) as c:
        served = c.classify("acme/cli-trained", eval_texts)
    assert [p.label for p in served.predictions] == record["eval"]["predictions"]


@pytest.mark.slow
def test_projection_flag_and_human_summary(small_data, tmp_path):
    d, _ = small_data
    res = runner.invoke(
        app,
        train_args(d, tmp_path / "out", "--prefix-projection", "--projection-hidden", "32", "--epochs", "1",
                   "--head", "pooler_linear"),
    )
    assert res.exit_code == 0, res.output
    assert "best epoch 1 of 1" in res.stderr
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert (
        record["config"]["prefix_projection"]
        and record["trainable_parameters"]["prefix"] > record["trainable_parameters"]["served_prefix"]
    )
    cfg = json.loads((tmp_path / "out" / "peft" / "adapter_config.json").read_text())
    assert cfg["prefix_projection"] is False  # materialised: PEFT sees plain prefix K/V
    for name in ("peft/adapter_model.safetensors", "peft/labels.json"):  # the PEFT head exports as before
        assert (tmp_path / "out" / name).is_file(), name


@pytest.mark.slow
def test_upload_failure_keeps_the_adapter_and_says_so(small_data, tmp_path):
    d, _ = small_data
    dead = f"http://127.0.0.1:{free_port()}"
    res = runner.invoke(
        app, train_args(d, tmp_path / "out", "--epochs", "1", "--upload", "acme/x", "--server", dead)
    )
    assert res.exit_code == 1 and "upload failed" in res.stderr and "the adapter is saved in" in res.stderr
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


def test_bad_inputs_exit_2_with_a_clear_message(small_data, tmp_path):
    d, _ = small_data
    (tmp_path / "odd.jsonl").write_text(json.dumps({"review": "x", "sentiment": "sarcastic"}) + "\n")
    cases = [
        (["--text-field", "text"], "no field 'text'"),  # the CSV calls it "review"
        (["--eval-data", str(tmp_path / "odd.jsonl")], "evaluation labels ['sarcastic'] never occur"),
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--upload", "no-slash"], "must be tenant/name"),
        (["--backbone", str(tmp_path / "not-a-model")], "cannot load backbone"),
        (["--prefix-init", "vocab"], "--prefix-init 'vocab': use tokens or random"),
        (["--prefix-init", "tokens", "--prefix-projection"], "cannot start a reparameterised prefix"),
    ]
    for extra, message in cases:
        res = runner.invoke(app, train_args(d, tmp_path / "out", *extra))
        assert res.exit_code == 2 and message in res.stderr, (extra, res.output)


@pytest.mark.slow
def test_search_is_time_bounded_records_its_choice_and_fits_with_it(small_data, tmp_path):
    d, _ = small_data
    budget = 4.0
    args = [a for a in train_args(d, tmp_path / "out", "--epochs", "1", "--search", "--search-budget-s", str(budget))]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "search trial 1/" in res.stderr and "search chose" in res.stderr  # progress shown
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    search = record["search"]
    trials, chosen = search["trials"], search["chosen"]
    assert trials and search["budget_s"] == budget
    # bounded: no trial starts after the budget; the last one may run past it by at most its own length
    assert search["search_seconds"] <= budget + max(t["seconds"] for t in trials) + 1.0
    best = max(trials, key=lambda t: (t["dev_accuracy"], -t["dev_loss"]))
    assert chosen == {"lr": best["lr"], "virtual_tokens": best["virtual_tokens"], "head": best["head"]}
    # the final fit used the chosen settings: they are its config and its adapter's geometry
    assert (record["config"]["lr"], record["config"]["virtual_tokens"], record["head"]) == (
        chosen["lr"], chosen["virtual_tokens"], chosen["head"])
    assert trials[0]["lr"] == 1e-2 and trials[0]["virtual_tokens"] == 16  # the defaults are tried first
    # ... with MiniLM's default head, named as trained: a trial's head is the head its adapter has
    assert trials[0]["head"] == "mean_linear"
    tried = [(t["lr"], t["virtual_tokens"], t["head"]) for t in trials]
    assert len(tried) == len(set(tried))  # no setting tried twice under two names


def test_search_needs_a_dev_split_and_the_dev_split_is_carved_without_eval_data(small_data, tmp_path):
    d, _ = small_data
    no_eval = [a for a in train_args(d, tmp_path / "out") if a not in ("--eval-data", str(d / "eval.jsonl"))]
    res = runner.invoke(app, [*no_eval, "--search", "--dev-fraction", "0"])
    assert res.exit_code == 2 and "--search needs" in res.stderr, res.output
    res = runner.invoke(app, [*no_eval, "--epochs", "1", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["eval_accuracy"] is not None  # 15 % of the 60 examples (3 per label) became the dev split
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert len(record["eval"]["predictions"]) == 9
