"""The folder layout that ``ptserve train --out`` writes and uploads read; the PEFT folder's file names."""

from __future__ import annotations

# DIR/adapter.safetensors   the ptserve blob (prefix K/V, head, labels, backbone fingerprint): upload as is
# DIR/peft/                 the same adapter as a PEFT PREFIX_TUNING folder (adapter_config.json +
#                           adapter_model.safetensors; PEFT loads it) plus labels.json, which PEFT ignores
# DIR/training.json         hyper-parameters, per-epoch history, step losses, evaluation results
BLOB_FILE = "adapter.safetensors"
PEFT_DIR = "peft"
LABELS_FILE = "labels.json"
RECORD_FILE = "training.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
