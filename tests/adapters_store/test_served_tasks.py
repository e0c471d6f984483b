"""An adapter the server can never serve is refused at decode time (issue 10 finding 7): a task the
server's backbone does not serve, as a blob or as a PEFT folder."""
from __future__ import annotations

import json

import pytest

from ptserve.adapters_store.errors import InvalidAdapter
from ptserve.adapters_store.peft_folder import peft_to_blob
from ptserve.adapters_store.validation import Limits, decode_blob
from tests.adapters_store.refusals import peft_files
from tests.factories import make_blob


def test_generate_adapter_is_refused_by_a_server_that_serves_classify(fp, head, tmp_path):
    gen = make_blob(fp, 2, task="generate")
    assert decode_blob(gen, fp, head).config.task == "generate"  # offline tools convert either task
    with pytest.raises(InvalidAdapter) as refused:
        decode_blob(gen, fp, head, Limits(), serves={"classify", "embed"})
    assert "'generate' adapter (PEFT task_type CAUSAL_LM) cannot be served here" in refused.value.message
    assert "serves only 'classify' and 'embed' adapters (PEFT task_type SEQ_CLS, FEATURE_EXTRACTION)" in (
        refused.value.message)
    cfg, weights = peft_files(fp, tmp_path, task="generate")
    with pytest.raises(InvalidAdapter, match="CAUSAL_LM"):
        peft_to_blob(json.dumps(cfg).encode(), weights, fp, "minilm", head, None, Limits(), serves={"classify"})


def test_embed_adapter_is_served_by_an_encoder_and_refused_by_a_decoder(fp, head):
    embed = make_blob(fp, 2, task="embed")
    assert decode_blob(embed, fp, head, Limits(), serves={"classify", "embed"}).config.task == "embed"
    with pytest.raises(InvalidAdapter, match="'embed' adapter .* cannot be served here"):
        decode_blob(embed, fp, None, Limits(), serves={"generate"})


def test_classify_adapter_is_refused_by_a_server_that_serves_generate(fp, head, tmp_path):
    with pytest.raises(InvalidAdapter) as refused:
        decode_blob(make_blob(fp, 2), fp, None, Limits(), serves={"generate"})
    assert "'classify' adapter (PEFT task_type SEQ_CLS) cannot be served here" in refused.value.message
    cfg, weights = peft_files(fp, tmp_path)
    with pytest.raises(InvalidAdapter, match="SEQ_CLS"):
        peft_to_blob(json.dumps(cfg).encode(), weights, fp, "tiny", None, None, Limits(), serves={"generate"})
