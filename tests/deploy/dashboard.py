"""The Grafana dashboard as the tests see it: its panels, their PromQL and the ptserve metrics they read."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "ptserve.json"
DECODER_ROW = "Generation (decoder backbones only)"  # panels that stay empty on an encoder backbone
# Grafana's own variables, as a query evaluated by hand (or by the tests' Prometheus) would fill them
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$replica": ".*"}
METRIC = re.compile(r"\bptserve_[a-z0-9_]+\b")


@dataclass(frozen=True)
class Query:
    row: str
    panel: str
    expr: str

    @property
    def metrics(self) -> set[str]:
        return set(METRIC.findall(self.expr))

    def evaluable(self) -> str:
        expr = self.expr
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        return expr


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[tuple[str, dict]]:
    """(row title, panel) for every non-row panel, rows' nested panels included."""
    out, row = [], ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            out += [(row, p) for p in panel.get("panels", [])]
        else:
            out.append((row, panel))
    return out


def queries(dashboard: dict) -> list[Query]:
    return [Query(row, p["title"], t["expr"]) for row, p in panels(dashboard) for t in p.get("targets", [])]


def exported_names(exposition: str) -> set[str]:
    """Every sample name in a /metrics answer (``_total``, ``_bucket``, ``_sum``, ``_count`` included)."""
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}
