"""The real components the suite runs against (redis-server, nginx, promtool, the PEFT reference environment):
where one is missing, its tests skip on a developer's machine and fail under CI (``CI=true``; ``.ci/run``
installs them all), so a CI run can never pass with its strongest tests skipped."""
from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, how: str) -> None:
    """``what`` is not here: fail under CI, skip elsewhere; ``how`` says how to get it."""
    if IN_CI:
        pytest.fail(f"{what} is missing under CI ({how}); CI must run every test", pytrace=False)
    pytest.skip(f"{what} is missing ({how})")


def need_binary(name: str, package: str | None = None) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not found:
        missing(name, f".ci/run installs it: apt-get install -y {package or name}")
    return found


def ref_python() -> str:
    """The PEFT reference interpreter (``PTSERVE_REF_PYTHON``: transformers 4.57.6 + PEFT 0.21.2)."""
    path = os.environ.get("PTSERVE_REF_PYTHON", "")
    if not path or not os.access(path, os.X_OK):
        missing(f"the PEFT reference environment (PTSERVE_REF_PYTHON={path!r})",
                "make ref-venv; make test sets PTSERVE_REF_PYTHON")
    return path
