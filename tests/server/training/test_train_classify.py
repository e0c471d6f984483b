"""The classification trainer: what is trained is what is served.

Fast checks: the trainer's logits equal the engine's for the saved adapter (plain and MLP-projected prefixes),
the PrefixEncoder's names and formula are THUDM's. Slow checks (one training run on examples/sentiment,
shared): accuracy well above chance, the adapter served by a real ``ptserve serve`` predicts exactly what the
trainer's own evaluation predicted, and PEFT loads the exported folder with the same logits (transformers 4.57
subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ptserve.adapters_store.format import PREFIX_KEY
from ptserve.adapters_store.validation import decode_blob
from ptserve.client import Client
from ptserve.server.engine import Row
from ptserve.server.training.classify import PrefixClassifier, TrainConfig, tokenize, train_classifier
from ptserve.server.training.data import load_examples
from ptserve.server.training.outputs import BLOB_FILE, PEFT_DIR, RECORD_FILE, write_outputs
from ptserve.server.training.prefix_encoder import PrefixEncoder
from tests.factories import running_server

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "sentiment"
REF_PYTHON = os.environ.get("PTSERVE_REF_PYTHON")
# The stated bar for the shipped example task (3 balanced classes: chance is 1/3). The full defaults reach
# ~0.95; this short run (4 epochs, 8 virtual tokens) reaches ~0.9 and must stay at or above 0.8.
MIN_ACCURACY = 0.8
# The pooler head (PEFT's): the run below is also exported to PEFT and compared there (MiniLM's default head,
# mean_linear, has no PEFT form: tests/server/training/test_mean_head.py).
FAST = TrainConfig(virtual_tokens=8, epochs=4, lr=2e-2, batch_size=16, seed=0, patience=2, head="pooler_linear")


def _texts(n=5) -> list[str]:
    return [e.text for e in load_examples(EXAMPLES / "eval.jsonl")[:n]]


@pytest.mark.parametrize("projection", [False, True])
def test_trainer_forward_is_the_serving_forward(minilm, minilm_engine, projection):
    torch.manual_seed(1)
    cfg = TrainConfig(virtual_tokens=6, prefix_projection=projection, projection_hidden=32)
    model = PrefixClassifier(minilm, 3, cfg).eval()
    with torch.no_grad():  # a non-trivial head, so the comparison bites
        for p in model.head.values():
            p.normal_(0, 0.5)
    texts = _texts()
    ids = tokenize(minilm, texts, 6, None)
    with torch.no_grad():
        trained = model(ids)
    adapter = model.to_adapter(["a", "b", "c"])
    assert adapter.prompt_embeddings.shape == (6, minilm.fingerprint.prefix_width)  # projection materialised
    resident = minilm_engine.make_resident(adapter, "t/x", 1)
    served, _ = minilm_engine.classify([Row(resident, i) for i in ids])
    assert (torch.stack(served) - trained).abs().max() <= 1e-5
    assert (trained[0] - trained[1]).abs().max() > 1e-3


def test_prefix_encoder_uses_thudm_names_and_formula():
    enc = PrefixEncoder(4, 24, hidden_size=8, projection_hidden=16)
    assert sorted(enc.state_dict()) == [
        "embedding.weight",
        "trans.0.bias",
        "trans.0.weight",
        "trans.2.bias",
        "trans.2.weight",
    ]
    e = enc.embedding.weight
    want = enc.trans[2](torch.tanh(enc.trans[0](e)))
    assert torch.allclose(enc(), want) and torch.equal(enc.materialise(), want.detach())
    plain = PrefixEncoder(4, 24, hidden_size=8)
    assert sorted(plain.state_dict()) == ["embedding.weight"] and plain().shape == (4, 24)


def test_backbone_without_classification_head_is_refused(minilm):
    from dataclasses import replace

    no_head = replace(minilm, family=replace(minilm.family, head_kind=None))
    with pytest.raises(ValueError, match="serves no classification head"):
        PrefixClassifier(no_head, 2, TrainConfig())


# --- one real training run, shared by the slow tests --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(minilm, tmp_path_factory):
    train = load_examples(EXAMPLES / "train.jsonl")
    held_out = load_examples(EXAMPLES / "eval.jsonl")
    result = train_classifier(minilm, train, held_out, FAST)
    out = write_outputs(result.adapter, tmp_path_factory.mktemp("trained"), result.record())
    return result, out, held_out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server({"PTSERVE_STORE": f"file://{tmp_path_factory.mktemp('store')}"}) as url:
        yield url


@pytest.mark.slow
def test_trained_prefix_beats_chance_by_far(trained):
    result, _, held_out = trained
    assert result.labels == ["negative", "neutral", "positive"]
    assert result.eval.accuracy >= MIN_ACCURACY, result.record()["history"]
    first, last = result.fit.history[0], result.fit.history[result.fit.best_epoch - 1]
    assert last.train_loss < first.train_loss
    assert len(result.eval.predictions) == len(held_out)
    # only the prefix and the head trained: 8 virtual tokens x 6 layers x 2 x 384, and a 3 x 384 linear layer
    assert result.trainable_parameters == {
        "prefix": 8 * 6 * 2 * 384,
        "head": 3 * 384 + 3,
        "total": 8 * 6 * 2 * 384 + 3 * 384 + 3,
        "served_prefix": 8 * 6 * 2 * 384,
    }


@pytest.mark.slow
def test_outputs_carry_labels_fingerprint_and_history(trained, minilm):
    result, out, _ = trained
    adapter = decode_blob((out / BLOB_FILE).read_bytes(), minilm.fingerprint, "pooler_linear")
    assert adapter.config.labels == ("negative", "neutral", "positive")
    assert adapter.config.backbone == minilm.fingerprint and adapter.config.task == "classify"
    assert torch.equal(adapter.prompt_embeddings, result.adapter.prompt_embeddings)
    cfg = json.loads((out / PEFT_DIR / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "PREFIX_TUNING"
        and cfg["task_type"] == "SEQ_CLS"
        and cfg["num_virtual_tokens"] == 8
    )
    assert json.loads((out / PEFT_DIR / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert (
        record["eval"]["accuracy"] == result.eval.accuracy and record["best_epoch"] == result.fit.best_epoch
    )
    assert len(record["history"]) == len(result.fit.history) and record["step_losses"]


@pytest.mark.slow
def test_served_adapter_predicts_what_the_trainer_evaluated(trained, server):
    result, out, held_out = trained
    with Client(server) as c:
        info = c.upload("acme/sentiment", out)  # the `--out` folder: its adapter.safetensors
        assert info.labels == ["negative", "neutral", "positive"] and info.num_virtual_tokens == 8
        got = c.classify("acme/sentiment", [e.text for e in held_out], return_logits=True)
    assert [p.label for p in got.predictions] == result.eval.predictions
    served = torch.tensor([p.logits for p in got.predictions])
    assert (served - result.eval.logits).abs().max() <= 1e-4
    accuracy = sum(p.label == e.label for p, e in zip(got.predictions, held_out)) / len(held_out)
    assert accuracy == pytest.approx(result.eval.accuracy)


@pytest.mark.slow
@pytest.mark.peft_ref
def test_exported_peft_folder_gives_the_same_logits_in_peft(trained, minilm, tmp_path):
    result, out, held_out = trained
    texts = [e.text for e in held_out[:8]]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    proc = subprocess.run(
        [
            REF_PYTHON,
            "scripts/peft_reference.py",
            "logits",
            "--model",
            minilm.path,
            "--adapter",
            str(out / PEFT_DIR),
            "--texts",
            str(tmp_path / "texts.json"),
            "--result",
            str(tmp_path / "ref.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = torch.tensor(json.loads((tmp_path / "ref.json").read_text())["logits"])
    assert (reference - result.eval.logits[:8]).abs().max() <= 1e-4
    assert reference.argmax(-1).tolist() == [result.labels.index(p) for p in result.eval.predictions[:8]]


@pytest.mark.slow
def test_projected_prefix_trains_and_is_served_materialised(minilm, minilm_engine):
    """A short run with the MLP reparameterisation: the materialised prefix serves the trainer's logits."""
    train = load_examples(EXAMPLES / "train.jsonl")[:48]
    held_out = load_examples(EXAMPLES / "eval.jsonl")[:24]
    cfg = TrainConfig(virtual_tokens=4, prefix_projection=True, projection_hidden=64, epochs=1, batch_size=16)
    result = train_classifier(minilm, train, held_out, cfg)
    assert result.trainable_parameters["prefix"] > result.trainable_parameters["served_prefix"]
    assert result.adapter.tensors[PREFIX_KEY].shape == (4, minilm.fingerprint.prefix_width)
    resident = minilm_engine.make_resident(result.adapter, "t/proj", 1)
    rows = [Row(resident, ids) for ids in tokenize(minilm, [e.text for e in held_out], 4, None)]
    served, _ = minilm_engine.classify(rows)
    assert (torch.stack(served) - result.eval.logits).abs().max() <= 1e-5


def test_bf16_autocast_follows_the_setting_and_saves_float32(minilm):
    """--autocast on runs the forward in bf16 (emulated on a CPU without fast bf16, where "auto" is off, as the
    serving dtype rule says); the saved adapter is float32 either way; training.json says which dtype attention
    ran in, as measured on this CPU."""
    from ptserve.server.hardware import pick_dtype
    from ptserve.server.training.classify import autocast_bf16

    assert autocast_bf16("auto", minilm.device) == (pick_dtype("auto", minilm.device).dtype == "bfloat16")
    assert autocast_bf16("on", minilm.device) and not autocast_bf16("off", minilm.device)
    train = load_examples(EXAMPLES / "train.jsonl")[:16]
    held_out = load_examples(EXAMPLES / "eval.jsonl")[:8]
    result = train_classifier(minilm, train, held_out, TrainConfig(virtual_tokens=4, epochs=1, autocast="on"))
    assert result.bf16 and result.record()["autocast_bf16"] is True
    attention = result.record()["attention"]
    assert attention["dtype"] in (None, "float32") and set(attention["ms"]) == {"bfloat16", "float32"}
    assert result.model.attention_dtype == (torch.float32 if attention["dtype"] else None)
    assert all(t.dtype == torch.float32 for t in result.adapter.tensors.values())
    assert all(torch.isfinite(t).all() for t in result.adapter.tensors.values())
    assert result.fit.history[0].train_loss == result.fit.history[0].train_loss  # not NaN
