"""The client alone, as the README installs it (``pip install ./client``; ``make client-venv`` builds that
environment and ``make test`` passes its python as ``PTSERVE_CLIENT_PYTHON``): in an environment without
torch, ``from ptserve.client import Client`` uploads an adapter to a live server and classifies with it, and
``torch``, ``transformers`` and ``numpy`` are not in ``sys.modules`` afterwards. Under CI a missing
environment fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ptserve.client import Client
from tests.client.conftest import ADMIN
from tests.components import missing
from tests.factories import make_blob

MODEL_STACK = ("torch", "transformers", "numpy")
TEXTS = ["The soup was cold.", "Lovely staff, great view."]

SCRIPT = """
import importlib.util, json, sys
import ptserve.client
from ptserve.client import Client

url, key, blob_file = sys.argv[1:4]
with Client(url, key) as c:
    info = c.upload("solo/cls", blob_file)
    result = c.classify("solo/cls", %r, return_logits=True)
print(json.dumps({
    "version": info.version,
    "sha256": info.sha256,
    "adapter": result.adapter,
    "logits": [p.logits for p in result.predictions],
    "loaded": [m for m in %r if m in sys.modules],
    "installed": [m for m in ("torch", "transformers", "numpy", "ptserve.server", "ptserve.adapters_store")
                  if importlib.util.find_spec(m) is not None],
    "client_file": ptserve.client.__file__,
}))
""" % (TEXTS, MODEL_STACK)


@pytest.fixture(scope="module")
def client_python() -> Path:
    value = os.environ.get("PTSERVE_CLIENT_PYTHON")
    if value and Path(value).is_file():
        return Path(value)
    missing(f"the client-only install (PTSERVE_CLIENT_PYTHON={value!r} names no python)",
            "`make client-venv` builds .venv-client; make test sets PTSERVE_CLIENT_PYTHON")


def run(python: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # Outside the repository and without the test environment's variables: only the installed client counts.
    clean = {"PATH": os.environ["PATH"], "HOME": str(cwd), "COLUMNS": "200", **env}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=clean)


def test_the_client_alone_uploads_and_classifies_without_the_model_stack(
    client_python, server, minilm, tmp_path
):
    blob_file = tmp_path / "adapter.safetensors"
    blob_file.write_bytes(make_blob(minilm.fingerprint, 4, seed=41))
    done = run(client_python, "-c", SCRIPT, server, ADMIN, str(blob_file), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] == [] and report["installed"] == []  # torch is not even installable there
    venv = client_python.parent.parent
    assert Path(report["client_file"]).is_relative_to(venv), report["client_file"]  # the installed copy
    with Client(server, ADMIN) as c:  # the full environment's client reads the same adapter and answers
        info = c.get_adapter("solo/cls")
        again = c.classify("solo/cls", TEXTS, return_logits=True)
    assert (report["version"], report["sha256"], report["adapter"]) == (info.version, info.sha256, "solo/cls")
    assert report["logits"] == [p.logits for p in again.predictions]


def test_the_client_alones_command_talks_to_a_server_and_names_what_needs_the_server(
    client_python, server, tmp_path
):
    ptserve = client_python.parent / "ptserve"
    listed = run(ptserve, "adapters", "list", "--server", server, "--api-key", ADMIN, "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    for args in (["serve"], ["train", "--data", "x.jsonl"], ["adapters", "import-thudm", "ckpt"]):
        refused = run(ptserve, *args, cwd=tmp_path)
        assert refused.returncode == 2 and "pip install ptserve" in refused.stderr, (args, refused.stderr)
    version = run(ptserve, "version", cwd=tmp_path)
    assert "ptserve-client 0.1.0" in version.stdout and "ptserve not installed" in version.stdout
