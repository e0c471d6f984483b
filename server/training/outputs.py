"""Writes what ``ptserve train --out DIR`` leaves (the layout is ``ptserve.client.wire``'s, which uploads read)."""

from __future__ import annotations

import json
from pathlib import Path

from ptserve.adapters_store.format import Adapter, encode_blob
from ptserve.adapters_store.peft_folder import NoPeftEquivalent, write_peft_folder
from ptserve.client.wire import BLOB_FILE, LABELS_FILE, PEFT_DIR, RECORD_FILE
from ptserve.server.training.chart import training_svg
from ptserve.server.training.loop import FitResult

CHART_FILE = "training.svg"  # next to training.json


def write_outputs(adapter: Adapter, out_dir: str | Path, record: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = encode_blob(adapter)
    (out / BLOB_FILE).write_bytes(blob)
    try:
        peft = write_peft_folder(adapter, out / PEFT_DIR)
    except NoPeftEquivalent as exc:  # a mean_linear head: no peft/ folder, and training.json says why
        record = {**(record or {}), "peft_export": str(exc)}
    else:
        if adapter.config.labels:
            (peft / LABELS_FILE).write_text(json.dumps(list(adapter.config.labels)))
    if record is not None:
        (out / RECORD_FILE).write_text(json.dumps(record, indent=1))
        if record.get("history"):
            (out / CHART_FILE).write_text(training_svg(record))
    return out


def history_record(fit: FitResult) -> dict:
    """The training run as ``training.json`` records it, whatever the task."""
    return {
        "best_epoch": fit.best_epoch,
        "stopped_early": fit.stopped_early,
        "train_seconds": round(fit.seconds, 3),
        "history": [
            {
                "epoch": s.epoch,
                "train_loss": s.train_loss,
                "seconds": round(s.seconds, 3),
                **({"eval_loss": s.eval.loss, **s.eval.metrics} if s.eval else {}),
            }
            for s in fit.history
        ],
        "step_losses": fit.step_losses,
        **({"start_eval": {"eval_loss": fit.start.loss, **fit.start.metrics}} if fit.start else {}),
    }
