"""PEFT numerical reference for ptserve, run where PEFT prefix tuning works for SEQ_CLS (transformers 4.57.x).

PEFT 0.21 cannot run SEQ_CLS prefix tuning on transformers 5.x, which ptserve runs on; the tests call this script
with a second interpreter (``PTSERVE_REF_PYTHON``, built by ``make ref-venv``) and compare its logits with the
server's. Only the standard PEFT/transformers API is used here, so it is PEFT's answer, not ours.

  make    --model M --out DIR --virtual-tokens P --labels C --seed S --texts T.json --result R.json
          builds a random PEFT SEQ_CLS PREFIX_TUNING adapter, saves it as a PEFT folder, writes PEFT's logits
  logits  --model M --adapter DIR --texts T.json --result R.json
          loads a PEFT folder (e.g. one ptserve exported) with PeftModel.from_pretrained, writes its logits
  generate --model M --adapter DIR --prompts P.json --max-new N --result R.json
          PEFT greedy ``generate`` of a CAUSAL_LM PEFT folder on token-id prompts (EOS ignored), writes the tokens
          and each step's raw logits (PEFT 0.21.2's generate ignores the prefix on transformers 5.24, so this
          reference needs 4.57)
"""
from __future__ import annotations

import argparse
import json

import torch
from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def logits_for(model, tokenizer, texts: list[str]) -> list[list[float]]:
    """Each text alone (no padding), so the reference involves no batching at all."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer([text], return_tensors="pt")
            out.append(model(**enc).logits[0].tolist())
    return out


def cmd_make(a) -> None:
    torch.manual_seed(a.seed)
    base = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=a.labels)
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=a.virtual_tokens))
    with torch.no_grad():  # random but non-trivial values, so a wrong layout or offset shows up in the logits
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 1.0 if "prompt_encoder" in name else 0.2)
    model.eval()
    model.save_pretrained(a.out)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    _write(a.result, logits_for(model, tokenizer, _texts(a.texts)))


def cmd_logits(a) -> None:
    with open(f"{a.adapter}/adapter_config.json") as f:
        num_labels = None
        cfg = json.load(f)
    from safetensors import safe_open

    with safe_open(f"{a.adapter}/adapter_model.safetensors", "pt") as st:
        for key in st.keys():
            if key.endswith("classifier.weight"):
                num_labels = st.get_slice(key).get_shape()[0]
    base = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    assert cfg["peft_type"] == "PREFIX_TUNING"
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    _write(a.result, logits_for(model, tokenizer, _texts(a.texts)))


def cmd_generate(a) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(a.model)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    outputs, logits = [], []
    with torch.no_grad():
        for ids in _texts(a.prompts):
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new,
                                 min_new_tokens=a.max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
            outputs.append(out.sequences[0, len(ids):].tolist())
            logits.append([step[0].tolist() for step in out.logits])  # [steps][vocab], before any processor
    _write(a.result, outputs, key="tokens", logits=logits)


def _texts(path: str) -> list[str]:
    with open(path) as f:
        return json.load(f)


def _write(path: str, values: list, key: str = "logits", **more) -> None:
    import peft
    import transformers

    with open(path, "w") as f:
        json.dump({key: values, **more, "transformers": transformers.__version__, "peft": peft.__version__}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make")
    make.add_argument("--out", required=True)
    make.add_argument("--virtual-tokens", type=int, required=True)
    make.add_argument("--labels", type=int, default=3)
    make.add_argument("--seed", type=int, default=0)
    logits = sub.add_parser("logits")
    logits.add_argument("--adapter", required=True)
    for p in (make, logits):
        p.add_argument("--texts", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--adapter", required=True)
    gen.add_argument("--prompts", required=True)
    gen.add_argument("--max-new", type=int, required=True)
    for p in (make, logits, gen):
        p.add_argument("--model", required=True)
        p.add_argument("--result", required=True)
    a = parser.parse_args()
    {"make": cmd_make, "logits": cmd_logits, "generate": cmd_generate}[a.cmd](a)


if __name__ == "__main__":
    main()
