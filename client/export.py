"""Client-side conversion of a downloaded blob to a PEFT folder (needs torch; imported only when used)."""

from __future__ import annotations

import json
import os
from pathlib import Path


from adapters_store.format import AdapterConfig
from adapters_store.peft_folder import write_peft_folder
from adapters_store.validation import decode_blob

LABELS_FILE = "labels.json"


def blob_to_adapter(blob: bytes):
    """Decode a ptserve blob against the fingerprint it records (checks it is self-consistent and finite)."""
    from adapters_store.validation import read_header

    metadata, _ = read_header(blob)
    config = AdapterConfig.from_metadata(metadata)
    return decode_blob(blob, config.backbone, config.head)


def blob_to_peft_folder(blob: bytes, out_dir: str | os.PathLike) -> Path:
    adapter = blob_to_adapter(blob)
    folder = write_peft_folder(adapter, out_dir)
    if adapter.config.labels:
        (folder / LABELS_FILE).write_text(json.dumps(list(adapter.config.labels)))
    return folder


__all__ = ["blob_to_adapter", "blob_to_peft_folder"]
