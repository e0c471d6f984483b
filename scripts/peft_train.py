"""PEFT P-Tuning v2 training for benchmarks/bench_quality.py, run by the PEFT reference interpreter
(``PTSERVE_REF_PYTHON``: transformers 4.57, where PEFT's SEQ_CLS prefix tuning works).

PEFT's documented recipe for prefix tuning a sequence classifier (the ``peft`` docs / examples
``sequence_classification/prefix_tuning``): ``PrefixTuningConfig(task_type=SEQ_CLS, num_virtual_tokens=20)`` with
its other defaults (no projection), AdamW at lr 1e-2, a linear schedule with 6 % warm-up, batch 32 (here the
benchmark's batch size); the epoch with the best dev accuracy is kept (as every method of the benchmark does) and
scored on test. Only PEFT/transformers/torch API is used.

    python scripts/peft_train.py SPEC.json OUT.json
SPEC: model, labels, seed, max_length, virtual_tokens, lr, epochs, batch_size, train/dev/test ([text, label id])
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.nn.functional as F
from peft import PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    base = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=len(spec["labels"]))
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_CLS,
                                                    num_virtual_tokens=spec["virtual_tokens"]))
    train, bs = spec["train"], spec["batch_size"]

    def enc(rows):
        return tok([t for t, _ in rows], padding=True, truncation=True, max_length=spec["max_length"],
                   return_tensors="pt")

    @torch.no_grad()
    def accuracy(rows) -> float:
        model.eval()
        right = 0
        for i in range(0, len(rows), 64):
            part = rows[i : i + 64]
            pred = model(**enc(part)).logits.argmax(-1)
            right += int((pred == torch.tensor([y for _, y in part])).sum())
        return right / len(rows)

    steps = -(-len(train) // bs) * spec["epochs"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    g = torch.Generator().manual_seed(spec["seed"])
    best, best_state, history = -1.0, None, []
    t0 = time.perf_counter()
    for _ in range(spec["epochs"]):
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), bs):
            rows = [train[j] for j in order[i : i + bs]]
            loss = F.cross_entropy(model(**enc(rows)).logits, torch.tensor([y for _, y in rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        dev = accuracy(spec["dev"])
        history.append(dev)
        if dev > best:
            best, best_state = dev, copy.deepcopy({k: v for k, v in model.state_dict().items()})
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    json.dump({"test_accuracy": accuracy(spec["test"]), "dev_accuracy": best, "dev_history": history,
               "epochs_run": len(history), "seconds": seconds}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
