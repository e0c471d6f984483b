"""Property-based fuzzing of the whole HTTP API from its own OpenAPI spec (schemathesis), against a live server
with an admin key set so the auth paths run: bounded in time, and not one 5xx (every route in the spec, the
OpenAI-compatible ones included). The encoder server takes every route; a tiny decoder (with a chat template)
takes the generation routes, so they run past the 'wrong task' 422. Path parameters also carry control characters
(``schemathesis_hooks.py``), on generated ids and on ids that exist."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.factories import CHAT_TEMPLATE, make_blob, save_tiny_decoder, server_process

ADMIN = "fuzz-admin-key"
BUDGET_S = 40
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


def _schemathesis(server, tmp_path, *extra: str) -> list[dict]:
    """Run schemathesis against ``server``; fails on any 5xx. Returns the server's JSON log lines."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.fail("schemathesis is missing: pip install -e '.[test]'")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [st, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error,ignored_auth,control_characters_in_ids_are_refused",
         "--header", f"Authorization: Bearer {ADMIN}", "--max-examples", "15", "--max-time", str(BUDGET_S),
         # one worker: with two, hypothesis describes filter lambdas by ast.parse from two threads, which
         # CPython 3.11 does not survive ("SystemError: AST constructor recursion depth mismatch", a CI flake)
         "--seed", "5", "--generation-database", "none", "--workers", "1", "--request-timeout", "30",
         "--no-color", "--report", "json", "--report-json-path", str(report), *extra],
        capture_output=True, text=True, timeout=BUDGET_S + 90, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    lines = [json.loads(x) for x in server.log_lines() if x.startswith("{")]
    server_errors = [x for x in lines if x.get("status", 0) >= 500
                     and x.get("path") != "/readyz"]  # 503 while the backbone loaded
    assert not server_errors, server_errors[:5]
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    return lines


def _put(server, adapter_id: str, blob: bytes) -> None:
    r = httpx.put(f"{server.url}/v1/adapters/{adapter_id}", content=blob, timeout=30,
                  headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text


def _reached(lines: list[dict], *paths: str) -> None:
    """The spec's examples reach real work on these routes, not only their 4xx answers."""
    for path in paths:
        assert any(x.get("path") == path and x.get("status") == 200 for x in lines), f"no 200 from {path}"


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tmp_path, minilm):
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_ADMIN_KEY": ADMIN,
           "PTSERVE_REQUEST_TIMEOUT_S": "10"}
    with server_process(env) as server:
        # the spec's own example ids exist, so examples reach real classification and reads
        _put(server, "acme/sentiment", make_blob(minilm.fingerprint, 4))
        lines = _schemathesis(server, tmp_path)
        _reached(lines, "/v1/classify", "/v1/embeddings")
        with_controls = [x.get("path", "") for x in lines
                         if any(c in x.get("path", "") for c in ("\n", "\r", "\x00", "\x1b", "\t"))]
        assert len(with_controls) >= 5, "the hooks sent no id with a control character"


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_in_generation(tmp_path):
    from ptserve.server.backbone import load_backbone

    model = save_tiny_decoder("llama", tmp_path / "llama", chat_template=CHAT_TEMPLATE)
    fp = load_backbone(str(model), device="cpu", dtype="float32").fingerprint
    env = {"PTSERVE_STORE": f"file://{tmp_path / 'store'}", "PTSERVE_ADMIN_KEY": ADMIN, "PTSERVE_BACKBONE": str(model),
           "PTSERVE_REQUEST_TIMEOUT_S": "10", "PTSERVE_MAX_SEQ_TOKENS": "128", "PTSERVE_MAX_NEW_TOKENS_LIMIT": "32",
           "PTSERVE_MAX_INPUTS_PER_REQUEST": "16"}
    with server_process(env) as server:
        for adapter_id in ("acme/support-bot", "acme/sentiment"):  # the spec's example ids
            _put(server, adapter_id, make_blob(fp, 4, task="generate"))
        lines = _schemathesis(server, tmp_path, "--include-path-regex",
                              "^/v1/(generate|completions|chat/completions|models)$")
        _reached(lines, "/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/models")
