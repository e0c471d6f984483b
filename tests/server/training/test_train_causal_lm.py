"""Causal-LM prefix training on a tiny random Llama (grouped-query attention): the loss falls on the
completion tokens, the served adapter generates (greedy, over real HTTP) exactly the trainer's own greedy
completions, and PEFT (transformers 4.57 subprocess) generates the same tokens from the exported CAUSAL_LM
folder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ptserve.client import Client
from ptserve.server.backbone import load_backbone
from ptserve.server.cli import app
from ptserve.server.training.causal_lm import PrefixLM, eos_ids, tokenise_pairs, train_causal_lm
from ptserve.server.training.classify import TrainConfig
from ptserve.server.training.data import DataError, Pair
from ptserve.server.training.outputs import BLOB_FILE, PEFT_DIR, write_outputs
from tests.factories import running_server, save_tiny_decoder

ROOT = Path(__file__).resolve().parents[3]
REF_PYTHON = os.environ.get("PTSERVE_REF_PYTHON")
PAIRS = [
    Pair("the quick brown", " fox jumps"),
    Pair("hello world", " this is a"),
    Pair("many tenants", " share one frozen backbone"),
    Pair("prefix tuning adds", " virtual tokens"),
    Pair("continuous batching lets", " requests join"),
    Pair("the lazy", " dog"),
]
CFG = TrainConfig(virtual_tokens=8, epochs=30, batch_size=2, lr=0.1, patience=0, seed=0)


def save_decoder(out: Path) -> Path:
    """The factories' tiny Llama (GQA: 4 heads, 2 kv heads), re-initialised with std 0.2 instead of 0.02: with
    HF's default the random model's logits are nearly flat and no prefix can move them far."""
    from transformers import AutoConfig, AutoModelForCausalLM

    save_tiny_decoder("llama", out)
    config = AutoConfig.from_pretrained(out)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return load_backbone(str(save_decoder(tmp_path_factory.mktemp("llama"))), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def trained(decoder, tmp_path_factory):
    result = train_causal_lm(decoder, PAIRS, PAIRS, CFG)
    return result, write_outputs(result.adapter, tmp_path_factory.mktemp("lm"), result.record())


def test_completion_tokens_only_carry_the_loss(decoder, minilm):
    items = tokenise_pairs(decoder, PAIRS[:2], 8, None)
    tok = decoder.tokenizer
    for item, pair in zip(items, PAIRS):
        assert list(item.ids[: item.prompt_len]) == tok(pair.prompt)["input_ids"]  # as the server tokenises
        assert list(item.ids[item.prompt_len :]) == tok(pair.completion, add_special_tokens=False)[
            "input_ids"
        ] + [tok.eos_token_id]
    model = PrefixLM(decoder, TrainConfig(virtual_tokens=3))
    logits, targets = model.completion_logits(items)
    assert logits.shape == (len(targets), len(tok)) and len(targets) == sum(
        len(i.ids) - i.prompt_len for i in items
    )
    with pytest.raises(DataError, match="the prompt has"):
        tokenise_pairs(decoder, [Pair("word " * 300, "x")], 8, None)
    with pytest.raises(ValueError, match="is not a causal LM"):
        PrefixLM(minilm, TrainConfig())


@pytest.mark.slow
def test_prefix_learns_the_completions(trained):
    result, _ = trained
    first = result.fit.history[0]
    assert first.eval.loss > 4.0  # ~ln(vocab) for the random model
    assert result.eval.loss < 1.0 and result.eval.token_accuracy >= 0.9
    assert result.eval.exact_match >= 0.8, result.eval.completions
    assert result.adapter.config.task == "generate" and result.trainable_parameters["head"] == 0


@pytest.mark.slow
def test_served_adapter_generates_the_trainers_greedy_completions(decoder, trained, tmp_path):
    result, out = trained
    env = {"PTSERVE_BACKBONE": decoder.path, "PTSERVE_STORE": f"file://{tmp_path / 'store'}"}
    with running_server(env) as url, Client(url) as c:
        info = c.upload("acme/lm", out)
        assert info.task == "generate" and info.num_virtual_tokens == 8
        for pair, ids, text in zip(PAIRS, result.eval.completion_ids, result.eval.completions):
            n = len(decoder.tokenizer(pair.completion, add_special_tokens=False)["input_ids"]) + 1
            got = c.generate("acme/lm", pair.prompt, max_new_tokens=n, temperature=0)
            assert got.text == text, pair
            assert got.usage["completion_tokens"] == len(ids)  # the EOS ends it and is not counted
            assert got.finish_reason == ("stop" if len(ids) < n else "length")


@pytest.mark.slow
@pytest.mark.peft_ref
def test_exported_causal_lm_folder_generates_the_same_tokens_in_peft(decoder, trained, tmp_path):
    result, out = trained
    cfg = json.loads((out / PEFT_DIR / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["num_attention_heads"] == 2  # GQA: kv heads
    prompts = [decoder.tokenizer(p.prompt)["input_ids"] for p in PAIRS]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    max_new = max(len(ids) for ids in result.eval.completion_ids) + 1
    proc = subprocess.run(
        [
            REF_PYTHON,
            "scripts/peft_reference.py",
            "generate",
            "--model",
            decoder.path,
            "--adapter",
            str(out / PEFT_DIR),
            "--prompts",
            str(tmp_path / "prompts.json"),
            "--max-new",
            str(max_new),
            "--result",
            str(tmp_path / "ref.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((tmp_path / "ref.json").read_text())["tokens"]  # EOS not treated as the end
    stop = eos_ids(decoder)
    for ours, ref in zip(result.eval.completion_ids, reference):
        assert ref[: len(ours)] == ours
        if len(ours) < max_new:
            assert ref[len(ours)] in stop  # where the trainer stopped, PEFT produced the EOS


@pytest.mark.slow
def test_train_cli_picks_generate_for_a_decoder(decoder, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"q": p.prompt, "a": p.completion}) + "\n" for p in PAIRS))
    args = [
        "train",
        "--backbone",
        decoder.path,
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--prompt-field",
        "q",
        "--completion-field",
        "a",
        "--virtual-tokens",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--lr",
        "0.1",
        "--out",
        str(tmp_path / "out"),
        "--json",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["task"] == "generate" and summary["eval_loss"] is not None and summary["epochs_run"] == 2
    assert (tmp_path / "out" / BLOB_FILE).is_file()
    assert "eval token accuracy" in res.stderr
    wrong = CliRunner().invoke(app, [*args[:-1], "--task", "classify"])
    assert wrong.exit_code == 2 and "a decoder trains 'generate' adapters" in wrong.stderr
