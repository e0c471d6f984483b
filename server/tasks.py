"""Which adapter tasks a backbone serves, decided by its kind (decoder or encoder) in this one table: uploads of
another task are refused (``Family.tasks``), and ``/v1/models`` lists the adapters of these tasks."""
from __future__ import annotations

from typing import Literal

Kind = Literal["decoder", "encoder"]

TASK_KIND: dict[str, Kind] = {
    "generate": "decoder",  # /v1/generate, /v1/completions, /v1/chat/completions
    "classify": "encoder",  # /v1/classify
    "embed": "encoder",  # /v1/embeddings
}
# Backbone kinds whose bare backbone is itself a model a client may name (encoders: embeddings without a prefix).
BARE_BACKBONE_SERVES: dict[Kind, bool] = {"decoder": False, "encoder": True}


def backbone_kind(causal: bool) -> Kind:
    return "decoder" if causal else "encoder"


def served_tasks(kind: Kind) -> frozenset[str]:
    return frozenset(task for task, k in TASK_KIND.items() if k == kind)
