"""The ``mean_linear`` head (issue 14): a linear layer on the mean of the real tokens' last hidden states.

Served == trained (the engine's logits for the saved adapter equal the trainer's, batched with other head kinds),
the blob validation stays strict (kind per backbone, shapes, unknown kinds), the PEFT export is refused with a
reason (PEFT has no such head) and ``ptserve train`` writes no peft/ folder for it but says why in training.json.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ptserve.adapters_store.errors import InvalidAdapter
from ptserve.adapters_store.format import Adapter, encode_blob
from ptserve.adapters_store.heads import MEAN_HEAD, served_heads
from ptserve.adapters_store.peft_folder import NoPeftEquivalent, adapter_to_peft, blob_to_peft_folder
from ptserve.adapters_store.validation import decode_blob
from ptserve.server.backbone import trained_for_mean_pooling
from ptserve.server.engine import Row, encoder_forward
from ptserve.server.resident import prefix_kv
from ptserve.server.training.classify import PrefixClassifier, TrainConfig, default_head, tokenize
from ptserve.server.training.data import load_examples
from ptserve.server.training.outputs import BLOB_FILE, CHART_FILE, PEFT_DIR, RECORD_FILE, write_outputs
from tests.factories import make_adapter

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "sentiment"


def _model(minilm, head: str, p: int = 5, seed: int = 1) -> PrefixClassifier:
    torch.manual_seed(seed)
    model = PrefixClassifier(minilm, 3, TrainConfig(virtual_tokens=p, head=head)).eval()
    with torch.no_grad():  # a non-trivial head, so the comparison bites
        for t in model.head.values():
            t.normal_(0, 0.5)
    return model


def test_served_logits_equal_the_trainers_next_to_a_pooler_head(minilm, minilm_engine):
    texts = [e.text for e in load_examples(EXAMPLES / "eval.jsonl")[:4]]  # different lengths: padding matters
    mean, pooler = _model(minilm, MEAN_HEAD, 5, 1), _model(minilm, "pooler_linear", 3, 2)
    with torch.no_grad():
        want_mean = mean(tokenize(minilm, texts, 5, None))
        want_pooler = pooler(tokenize(minilm, texts, 3, None))
    a = minilm_engine.make_resident(mean.to_adapter(["a", "b", "c"]), "t/mean", 1)
    b = minilm_engine.make_resident(pooler.to_adapter(["a", "b", "c"]), "t/pooler", 1)
    assert a.config.head == MEAN_HEAD and b.config.head == "pooler_linear"
    rows = [Row(a, ids) for ids in tokenize(minilm, texts, 5, None)]
    rows += [Row(b, ids) for ids in tokenize(minilm, texts, 3, None)]
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # the two kinds interleaved in one pass
    served, _ = minilm_engine.classify([rows[i] for i in order])
    got = torch.stack([served[order.index(i)] for i in range(8)])
    assert (got[:4] - want_mean).abs().max() <= 1e-5
    assert (got[4:] - want_pooler).abs().max() <= 1e-5
    assert (want_mean - want_pooler).abs().max() > 1e-2  # the kinds differ, so a mix-up would show


def test_the_mean_head_reads_the_mean_not_the_first_token(minilm):
    model = _model(minilm, MEAN_HEAD)
    ids = tokenize(minilm, ["a short one", "a rather longer sentence about something else entirely"], 5, None)
    with torch.no_grad():
        logits = model(ids)
        # by hand: the prefixed forward, the mean over each row's real tokens, then the linear layer
        kv = prefix_kv(model.prefix(), minilm.fingerprint).unsqueeze(2).expand(-1, -1, 2, -1, -1, -1)
        hidden, _ = encoder_forward(minilm, ids, kv, [5, 5])
        means = torch.stack([hidden[i, : len(r)].mean(0) for i, r in enumerate(ids)])
        head = model.head_tensors()
        want = means @ head["classifier.weight"].T + head["classifier.bias"]
    assert (logits - want).abs().max() <= 1e-5


def test_minilm_defaults_to_the_mean_head_and_the_family_serves_both(minilm, tmp_path):
    assert trained_for_mean_pooling(minilm.path)
    assert default_head(minilm) == MEAN_HEAD
    assert not trained_for_mean_pooling(tmp_path)  # no modules.json
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                     "pooling_mode_mean_tokens": False}))
    assert not trained_for_mean_pooling(tmp_path)  # CLS pooling
    assert served_heads("pooler_linear") == ("pooler_linear", MEAN_HEAD)
    assert served_heads("cls_mlp") == ("cls_mlp", MEAN_HEAD)
    assert served_heads(None) == ()


def test_blob_validation_stays_strict(minilm):
    fp = minilm.fingerprint
    ok = decode_blob(encode_blob(make_adapter(fp, 4, head=MEAN_HEAD)), fp, "pooler_linear")
    assert ok.config.head == MEAN_HEAD
    with pytest.raises(InvalidAdapter, match="does not fit this backbone"):  # a RoBERTa head on a BERT backbone
        decode_blob(encode_blob(make_adapter(fp, 4, head="cls_mlp")), fp, "pooler_linear")
    with pytest.raises(InvalidAdapter, match="serves no classification heads"):  # a decoder serves none
        decode_blob(encode_blob(make_adapter(fp, 4, head=MEAN_HEAD)), fp, None)
    bad = make_adapter(fp, 4, head=MEAN_HEAD)
    bad.tensors["classifier.weight"] = torch.zeros(3, fp.hidden_size + 1)  # wrong shape
    with pytest.raises(InvalidAdapter):
        decode_blob(encode_blob(bad), fp, "pooler_linear")
    mean = make_adapter(fp, 4, head=MEAN_HEAD)
    unknown = Adapter(replace(mean.config, head="max_linear"), mean.tensors)  # same tensors, a kind nobody serves
    with pytest.raises(InvalidAdapter, match="does not fit this backbone"):
        decode_blob(encode_blob(unknown), fp, "pooler_linear")


def test_peft_export_is_refused_with_the_reason_and_train_outputs_say_so(minilm, tmp_path):
    adapter = make_adapter(minilm.fingerprint, 4, head=MEAN_HEAD)
    with pytest.raises(NoPeftEquivalent, match="PEFT has no mean-pooled classification head"):
        adapter_to_peft(adapter)
    with pytest.raises(NoPeftEquivalent):
        blob_to_peft_folder(encode_blob(adapter), tmp_path / "peft-dl")
    assert not (tmp_path / "peft-dl").exists()
    record = {"history": [{"epoch": 1, "train_loss": 1.0, "eval_loss": 0.9, "eval_accuracy": 0.5},
                          {"epoch": 2, "train_loss": 0.5, "eval_loss": 0.7, "eval_accuracy": 0.7}], "best_epoch": 2}
    out = write_outputs(adapter, tmp_path / "out", record)
    assert (out / BLOB_FILE).is_file() and not (out / PEFT_DIR).exists()
    assert "PEFT has no mean-pooled" in json.loads((out / RECORD_FILE).read_text())["peft_export"]
    svg = (out / CHART_FILE).read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3
    # the PEFT head still exports as before
    out2 = write_outputs(make_adapter(minilm.fingerprint, 4), tmp_path / "out2", {})
    assert (out2 / PEFT_DIR / "adapter_config.json").is_file()
    assert "peft_export" not in json.loads((out2 / RECORD_FILE).read_text())
