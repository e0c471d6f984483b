"""What the upload suites check a server's answers with: the ``{"error": {"type", "message"}}`` body, a snapshot of
the store that must stay unchanged after a bad request, raw HTTP bytes, PEFT folder parts."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import torch
from safetensors.torch import save as st_save

from ptserve.adapters_store.format import AdapterConfig
from ptserve.adapters_store.peft_folder import CONFIG_FILE, WEIGHTS_FILE, read_peft_folder, write_peft_folder
from tests.factories import make_adapter

MAX_ADAPTER_BYTES = 2_000_000
MAX_INPUTS = 8
OCTET = {"content-type": "application/octet-stream"}


def raw_blob(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=config.to_metadata())


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (relative path -> size): what "nothing stored" compares."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.stat().st_size
    return out


class Snapshot:
    """What the server holds before a bad request; ``unchanged`` checks it still holds exactly that."""

    def __init__(self, server, client):
        self.server, self.client = server, client
        self.listing = self._listing()
        self.files = tree(self.server.root)

    def _listing(self) -> list[dict]:
        r = self.client.get("/v1/adapters", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def unchanged(self, adapter_id: str | None = None) -> None:
        assert self._listing() == self.listing
        assert tree(self.server.root) == self.files  # nothing written, also not outside the store
        if adapter_id is not None:
            r = self.client.get(f"/v1/adapters/{adapter_id}")
            assert_error(r, 404, "adapter_not_found", adapter_id)
        assert self.client.get("/healthz").status_code == 200
        assert self.client.get("/readyz").status_code == 200


def assert_error(r: httpx.Response, status: int, type_: str, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def raw_http(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side path normalisation); (status, response body)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                headers = data[:head_end].decode().lower()
                length = next((int(line.split(":")[1]) for line in headers.split("\r\n")
                               if line.startswith("content-length:")), None)
                if length is not None and len(data) >= head_end + 4 + length:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data[data.find(b"\r\n\r\n") + 4:]


def peft_parts(fp, tmp_path: Path, p: int = 4, seed: int = 0, task: str = "classify", **cfg_changes) -> dict:
    adapter = make_adapter(fp, p, seed, task=task)
    config_raw, weights_raw = read_peft_folder(write_peft_folder(adapter, tmp_path / f"peft-{p}-{seed}-{task}"))
    cfg = {**json.loads(config_raw), **cfg_changes}
    return {CONFIG_FILE: (CONFIG_FILE, json.dumps(cfg).encode(), "application/json"),
            WEIGHTS_FILE: (WEIGHTS_FILE, weights_raw, "application/octet-stream")}
