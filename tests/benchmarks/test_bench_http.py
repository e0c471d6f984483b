"""``bench_http --smoke`` runs every row end to end in seconds (tiny encoder, 1 s wrk runs, nothing written):
the server starts, adapters upload, wrk's Lua script answers, and each row of the table has a figure."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components import need_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_smoke_run_fills_every_row():
    need_binary("wrk")
    before = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_http", "--smoke", "--no-write"], cwd=ROOT,
                          env={**os.environ, "BENCH_WORKERS_MODE": "auto"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| (.+?) \| (.+?) \| .+? \|$", done.stdout, re.M)}
    ratios = [k for k in rows if k.startswith("HTTP ÷ offline")]
    assert len(ratios) == 2, rows
    for name in (*ratios, "ptserve over HTTP ÷ PEFT one request at a time in process, float32"):
        assert float(re.search(r"\*\*([\d.]+)", rows[name])[1]) > 0, rows[name]
    api = next(v for k, v in rows.items() if k.startswith("CPU of the API path"))
    assert float(re.search(r"\*\*(\d+) µs", api)[1]) > 0
    assert re.search(r"[\d.]+ / [\d.]+ ms at \d+ req/s · [\d.]+ / [\d.]+ ms", rows[next(
        k for k in rows if k.startswith("p50 / p99"))])
    workers = rows["2 API workers ÷ 1 worker, tiny random encoder"]
    assert workers == "n/a (no multi-worker mode)" or re.match(r"\*\*[\d.]+×\*\*", workers), workers
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == before  # --no-write
