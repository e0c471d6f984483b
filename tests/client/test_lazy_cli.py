"""The ``ptserve`` command loads no model stack for what only talks to a server: ``--help``, ``adapters
list`` and ``classify`` (against a live server and a refused connection), and ``serve --help``, run through
the installed entry point in a fresh interpreter, leave ``torch`` and ``transformers`` (and, for the client
commands, ``numpy``) out of ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ptserve.adapters_store.format import encode_blob
from ptserve.client import Client
from tests.client.conftest import ADMIN
from tests.factories import free_port, make_adapter

MODEL_STACK = ("torch", "transformers", "numpy")

# Runs the `ptserve` console script the distributions declare, then reports what it imported.
DRIVER = """
import json, sys
from importlib.metadata import entry_points
report, args = sys.argv[1], json.loads(sys.argv[2])
(script,) = entry_points(group="console_scripts", name="ptserve")
sys.argv = ["ptserve", *args]
code = 0
try:
    script.load()()
except SystemExit as exc:
    code = exc.code or 0
with open(report, "w") as f:
    json.dump({"code": code, "loaded": [m for m in %r if m in sys.modules]}, f)
""" % (MODEL_STACK,)


def ptserve(tmp_path, *args: str, url: str | None = None, key: str | None = None):
    report = tmp_path / "report.json"
    env = {**os.environ, "COLUMNS": "200", "PTSERVE_URL": url or "", "PTSERVE_API_KEY": key or ""}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(report), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert report.exists(), done.stderr
    return json.loads(report.read_text()), done


@pytest.fixture(scope="module")
def live(server, minilm):
    with Client(server, ADMIN) as c:
        c.upload("lazy/cls", encode_blob(make_adapter(minilm.fingerprint, 4, seed=31)))
    return server


def test_help_loads_no_model_stack(tmp_path):
    report, done = ptserve(tmp_path, "--help")
    assert report == {"code": 0, "loaded": []} and "classify" in done.stdout and "serve" in done.stdout


def test_client_commands_against_a_live_server_load_no_model_stack(tmp_path, live):
    listed, done = ptserve(tmp_path, "adapters", "list", "--json", url=live, key=ADMIN)
    assert listed == {"code": 0, "loaded": []} and "lazy/cls" in done.stdout
    classified, done = ptserve(tmp_path, "classify", "lazy/cls", "fine food", "--json", url=live, key=ADMIN)
    assert classified == {"code": 0, "loaded": []} and json.loads(done.stdout)["predictions"][0]["label"]


@pytest.mark.parametrize("args", [["adapters", "list"], ["classify", "a/b", "some text"]])
def test_client_commands_against_a_refused_connection_load_no_model_stack(tmp_path, args):
    report, done = ptserve(tmp_path, *args, url=f"http://127.0.0.1:{free_port()}")
    assert report == {"code": 1, "loaded": []} and "cannot reach the server" in done.stderr


def test_serve_help_loads_no_torch(tmp_path):
    report, done = ptserve(tmp_path, "serve", "--help")
    assert report["code"] == 0 and "--max-batch-size" in done.stdout
    assert not {"torch", "transformers"} & set(report["loaded"]), report
