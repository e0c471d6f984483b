"""THUDM P-tuning-v2 checkpoints -> ptserve adapters, checked against THUDM's formula run directly.

The reference below is written from THUDM's code (``model/prefix_encoder.py``,
``BertPrefixForSequenceClassification`` and ``RobertaPrefixForSequenceClassification``): PrefixEncoder ->
``view(B, P, 2L, H, D)`` -> ``permute(2, 0, 3, 1, 4) .split(2)`` -> HF ``past_key_values`` with an all-ones
prefix attention mask, eager attention, the model's pooled output -> ``classifier``. It shares no code with
ptserve's engine (HF's own cache path, not ptserve's attention).
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter
from ptserve.adapters_store.format import encode_blob
from ptserve.adapters_store.thudm import read_checkpoint, thudm_to_adapter
from ptserve.adapters_store.validation import decode_blob
from ptserve.server.cli import app
from ptserve.server.engine import Engine, Row
from tests.factories import save_tiny_encoder

TEXTS = [
    "The soup was cold and the waiter rude.",
    "A lovely, quiet hotel near the beach.",
    "It opens at nine.",
]


def thudm_state(
    fp, hidden: int, p: int, projection: bool, num_labels: int = 3, seed: int = 0, prefix_hidden: int = 32
) -> dict[str, torch.Tensor]:
    """A THUDM checkpoint's trainable tensors, random but non-trivial, named as THUDM saves them (bert.* etc.
    are
    added by the caller to check they are ignored)."""
    g = torch.Generator().manual_seed(seed)
    width = fp.num_layers * 2 * hidden
    state = {}
    if projection:
        state["prefix_encoder.embedding.weight"] = torch.randn(p, hidden, generator=g)
        state["prefix_encoder.trans.0.weight"] = torch.randn(prefix_hidden, hidden, generator=g) * 0.3
        state["prefix_encoder.trans.0.bias"] = torch.randn(prefix_hidden, generator=g) * 0.1
        state["prefix_encoder.trans.2.weight"] = torch.randn(width, prefix_hidden, generator=g) * 0.5
        state["prefix_encoder.trans.2.bias"] = torch.randn(width, generator=g) * 0.1
    else:
        state["prefix_encoder.embedding.weight"] = torch.randn(p, width, generator=g)
    state["classifier.weight"] = torch.randn(num_labels, hidden, generator=g) * 0.3
    state["classifier.bias"] = torch.randn(num_labels, generator=g) * 0.1
    return state


def thudm_reference_logits(model_path: str, state: dict, texts: list[str]) -> torch.Tensor:
    """THUDM's forward, each text alone (batch size 1, no padding)."""
    from transformers import AutoModel, AutoTokenizer, DynamicCache

    model = AutoModel.from_pretrained(model_path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    cfg = model.config
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_embd = cfg.hidden_size // n_head
    emb = state["prefix_encoder.embedding.weight"]
    pre_seq_len = emb.shape[0]
    prefix_encoder = torch.nn.Embedding.from_pretrained(emb)
    trans = None
    if "prefix_encoder.trans.0.weight" in state:  # prefix_projection=True
        w0, w2 = state["prefix_encoder.trans.0.weight"], state["prefix_encoder.trans.2.weight"]
        trans = torch.nn.Sequential(
            torch.nn.Linear(w0.shape[1], w0.shape[0]),
            torch.nn.Tanh(),
            torch.nn.Linear(w2.shape[1], w2.shape[0]),
        )
        trans.load_state_dict(
            {
                k.removeprefix("prefix_encoder.trans."): v
                for k, v in state.items()
                if k.startswith("prefix_encoder.trans.")
            }
        )
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], return_tensors="pt")
            batch_size = 1
            prefix_tokens = torch.arange(pre_seq_len).long().unsqueeze(0).expand(batch_size, -1)
            past_key_values = prefix_encoder(prefix_tokens)
            if trans is not None:
                past_key_values = trans(past_key_values)
            past_key_values = past_key_values.view(batch_size, pre_seq_len, n_layer * 2, n_head, n_embd)
            past_key_values = past_key_values.permute([2, 0, 3, 1, 4]).split(2)  # per layer: [2, B, H, P, D]
            cache = DynamicCache(ddp_cache_data=[(kv[0], kv[1]) for kv in past_key_values])
            attention_mask = torch.cat(
                [torch.ones(batch_size, pre_seq_len, dtype=torch.long), enc["attention_mask"]], dim=1
            )
            kwargs = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}
            outputs = model(
                input_ids=enc["input_ids"], attention_mask=attention_mask, **kwargs, **{cache_arg: cache}
            )
            pooled_output = outputs[1]
            out.append(F.linear(pooled_output, state["classifier.weight"], state["classifier.bias"])[0])
    return torch.stack(out)


def served_logits(engine: Engine, adapter, texts: list[str]) -> torch.Tensor:
    blob = encode_blob(adapter)  # through the one validation path every upload takes
    decoded = decode_blob(blob, engine.fp, engine.backbone.family.head_kind)
    resident = engine.make_resident(decoded, "t/thudm", 1)
    rows = [Row(resident, ids) for ids in engine.tokenize(texts, resident.num_virtual_tokens)]
    logits, _ = engine.classify(rows)
    return torch.stack(logits)


@pytest.mark.parametrize("projection, p", [(False, 7), (True, 5)])
def test_minilm_thudm_checkpoint_gives_thudm_logits(minilm, minilm_engine, projection, p):
    fp = minilm.fingerprint
    state = thudm_state(fp, fp.hidden_size, p, projection, seed=p)
    checkpoint = {f"bert.embeddings.fake.{i}": torch.zeros(2) for i in range(3)}  # backbone weights: ignored
    checkpoint.update(state)
    adapter = thudm_to_adapter(checkpoint, fp, "pooler_linear", ["neg", "neu", "pos"], "minilm")
    assert adapter.config.task == "classify" and adapter.config.num_virtual_tokens == p
    assert adapter.prompt_embeddings.shape == (p, fp.prefix_width)  # projection materialised once
    reference = thudm_reference_logits(minilm.path, state, TEXTS)
    ours = served_logits(minilm_engine, adapter, TEXTS)
    assert (ours - reference).abs().max() <= 1e-5
    assert (
        reference[0] - reference[1]
    ).abs().max() > 1e-3  # different texts, different answers: the check bites


def test_roberta_thudm_head_becomes_cls_mlp_on_the_pooler(minilm, tmp_path):
    """RoBERTa's THUDM classifier sits on the pooler (dense + tanh on <s>): imported as ptserve's cls_mlp."""
    from ptserve.server.backbone import load_backbone

    path = save_tiny_encoder("roberta", tmp_path / "roberta", minilm.path, seed=3)
    bb = load_backbone(str(path), device="cpu", dtype="float32")
    fp = bb.fingerprint
    state = thudm_state(fp, fp.hidden_size, 4, projection=True, num_labels=2, seed=9, prefix_hidden=16)
    checkpoint = dict(state)
    checkpoint["roberta.pooler.dense.weight"] = bb.model.pooler.dense.weight.detach().clone()
    checkpoint["roberta.pooler.dense.bias"] = bb.model.pooler.dense.bias.detach().clone()
    adapter = thudm_to_adapter(checkpoint, fp, "cls_mlp", None, str(path))
    assert adapter.config.head == "cls_mlp" and adapter.config.labels == ("LABEL_0", "LABEL_1")
    reference = thudm_reference_logits(str(path), state, TEXTS)
    assert (served_logits(Engine(bb), adapter, TEXTS) - reference).abs().max() <= 1e-5
    # without pooler weights in the checkpoint, the backbone's may be given instead
    pooler = {k.removeprefix("roberta."): v for k, v in checkpoint.items() if "pooler" in k}
    again = thudm_to_adapter(state, fp, "cls_mlp", None, pooler=pooler)
    assert all(torch.equal(again.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    with pytest.raises(InvalidAdapter, match="needs the pooler weights"):
        thudm_to_adapter(state, fp, "cls_mlp")


def test_checkpoint_without_classifier_is_a_generate_adapter(minilm):
    fp = minilm.fingerprint
    state = {"transformer.prefix_encoder.embedding.weight": torch.randn(3, fp.prefix_width)}
    adapter = thudm_to_adapter(state, fp, "pooler_linear")
    assert adapter.config.task == "generate" and adapter.config.head is None and not adapter.head_tensors()


def test_import_errors_say_what_is_wrong(minilm):
    fp = minilm.fingerprint
    with pytest.raises(InvalidAdapter, match="no 'prefix_encoder.embedding.weight'"):
        thudm_to_adapter({"classifier.weight": torch.zeros(2, 384)}, fp, "pooler_linear")
    with pytest.raises(
        BackboneMismatch,
        match=f"needs layers\\*2\\*kv_heads\\*head_dim = 6\\*2\\*12\\*32 = {fp.prefix_width}",
    ):
        thudm_to_adapter(
            {"prefix_encoder.embedding.weight": torch.zeros(4, 12 * 2 * 768)}, fp, "pooler_linear"
        )
    partial = thudm_state(fp, fp.hidden_size, 2, projection=True)
    del partial["prefix_encoder.trans.2.bias"]
    with pytest.raises(InvalidAdapter, match="projected prefix encoder is incomplete"):
        thudm_to_adapter(partial, fp, "pooler_linear")
    bad = thudm_state(fp, fp.hidden_size, 2, projection=False)
    bad["prefix_encoder.embedding.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidAdapter, match="NaN or Inf"):
        thudm_to_adapter(bad, fp, "pooler_linear")
    with pytest.raises(InvalidAdapter, match="2 labels given, the classifier has 3 outputs"):
        thudm_to_adapter(thudm_state(fp, fp.hidden_size, 2, False), fp, "pooler_linear", ["a", "b"])
    with pytest.raises(InvalidAdapter, match="two tensors for"):
        thudm_to_adapter(
            {
                "a.prefix_encoder.embedding.weight": torch.zeros(1, fp.prefix_width),
                "b.prefix_encoder.embedding.weight": torch.zeros(1, fp.prefix_width),
            },
            fp,
            "pooler_linear",
        )


def test_checkpoint_files_safetensors_folder_and_pickle_opt_in(minilm, tmp_path):
    fp = minilm.fingerprint
    state = thudm_state(fp, fp.hidden_size, 3, projection=False)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(
        {**state, "bert.pooler.dense.weight": torch.zeros(384, 384), "bert.other": torch.zeros(1)},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text(
        json.dumps({"id2label": {"1": "neutral", "0": "negative", "2": "positive"}})
    )
    tensors, labels = read_checkpoint(folder)
    assert labels == ["negative", "neutral", "positive"] and "bert.other" not in tensors
    assert torch.equal(tensors["prefix_encoder.embedding.weight"], state["prefix_encoder.embedding.weight"])

    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(InvalidAdapter, match="pickle .* --allow-pickle"):
        read_checkpoint(tmp_path / "pytorch_model.bin")
    tensors, _ = read_checkpoint(tmp_path / "pytorch_model.bin", allow_pickle=True)
    assert torch.equal(tensors["classifier.weight"], state["classifier.weight"])


def test_import_thudm_cli_writes_a_served_adapter(minilm, minilm_engine, tmp_path):
    fp = minilm.fingerprint
    state = thudm_state(fp, fp.hidden_size, 6, projection=True, seed=4)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "neu", "2": "pos"}}))
    runner = CliRunner()
    res = runner.invoke(
        app, ["adapters", "import-thudm", str(folder), "--out", str(tmp_path / "out"), "--json"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["labels"] == ["neg", "neu", "pos"] and summary["num_virtual_tokens"] == 6
    adapter = decode_blob((tmp_path / "out" / "adapter.safetensors").read_bytes(), fp, "pooler_linear")
    assert (
        served_logits(minilm_engine, adapter, TEXTS) - thudm_reference_logits(minilm.path, state, TEXTS)
    ).abs().max() <= 1e-5
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()

    torch.save(state, tmp_path / "model.bin")
    res = runner.invoke(
        app, ["adapters", "import-thudm", str(tmp_path / "model.bin"), "--out", str(tmp_path / "o2")]
    )
    assert res.exit_code == 2 and "--allow-pickle" in res.output
    res = runner.invoke(
        app,
        [
            "adapters",
            "import-thudm",
            str(tmp_path / "model.bin"),
            "--out",
            str(tmp_path / "o2"),
            "--allow-pickle",
            "--labels",
            "a,b",
        ],
    )
    assert res.exit_code == 2 and "2 labels given, the classifier has 3 outputs" in res.output
