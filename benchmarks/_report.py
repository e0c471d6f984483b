"""What the benchmark scripts write about a run: the machine it ran on, and its section of ``RESULTS.md``.

A section is a title and a block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; running a
benchmark again replaces its block and leaves the rest of the file alone.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

NEW_FILE = "# ptserve benchmark results\n"


def machine_info(**versions: str) -> dict[str, str]:
    """``date``, ``cpu`` (lscpu's model name, nproc) and ``versions``: python, torch, then ``versions``.

    Pass names that are not identifiers as ``**{"redis-py": redis.__version__}``.
    """
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown"
    libs = {"python": platform.python_version(), "torch": torch.__version__, **versions}
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{model}, nproc={os.cpu_count()}",
        "versions": ", ".join(f"{name} {version}" for name, version in libs.items()),
    }


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, title: str, body: str, *, title_in_block: bool = False) -> None:
    """Replace the block of ``name`` in ``path`` with ``body``, keeping the rest; add the section if missing.

    By default ``title`` stands above the block (a new block goes under that title if the file has it, else
    at the end with the title); with ``title_in_block`` the title is the block's first line, and a new block
    goes at the end.
    """
    begin, end = markers(name)
    inner = f"{title}\n\n{body.strip()}" if title_in_block else body.strip()
    block = f"{begin}\n{inner}\n{end}"
    text = path.read_text() if path.exists() else NEW_FILE
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    elif title_in_block:
        text = f"{text.rstrip()}\n\n{block}\n"
    elif title in text:
        head, _, tail = text.partition(title)
        text = f"{head}{title}\n\n{block}\n{tail}"
    else:
        text = f"{text.rstrip()}\n\n{title}\n\n{block}\n"
    path.write_text(text)
