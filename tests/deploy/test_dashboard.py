"""docker/grafana/dashboards/ptserve.json, read: every panel's PromQL parses (promtool), the panels the issue
asks for are there, and the layout has no overlaps. (That its metrics are exported and Prometheus evaluates
every query with data is checked against live servers in test_topology.py.)"""
from __future__ import annotations

import subprocess

import yaml

from tests.deploy import dashboard
from tests.deploy.conftest import need_binary


def test_every_query_is_valid_promql(tmp_path):
    promtool = need_binary("promtool")
    queries = dashboard.queries(dashboard.load())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.evaluable()} for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_query(tmp_path):
    # the check above can fail: the same call on a query with an unbalanced parenthesis
    promtool = need_binary("promtool")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum(rate(ptserve_requests_total[1m])"}]}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60)
    assert done.returncode != 0


def test_the_issues_panels_are_there():
    titles = " | ".join(p["title"].lower() for _, p in dashboard.panels(dashboard.load()))
    for topic in ("throughput", "latency quantiles", "batch size", "padding", "queue", "cache hit ratio",
                  "errors", "time to first token"):
        assert topic in titles, topic


def test_every_panel_queries_ptserve_metrics_through_the_replica_variable():
    d = dashboard.load()
    for q in dashboard.queries(d):
        assert q.metrics, q.panel
        assert q.expr.count('replica=~"$replica"') >= len(dashboard.METRIC.findall(q.expr)), (q.panel, q.expr)
    assert [v["name"] for v in d["templating"]["list"]] == ["replica"]


def test_layout_has_unique_ids_and_no_overlaps():
    d = dashboard.load()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
