"""What the HTTP benchmarks share: the texts, the adapters, a tiny random encoder, a ``ptserve serve`` subprocess
and ``wrk`` with its Lua script (``classify.lua``).

Texts are the project's own review sentences (``examples/sentiment/reviews.csv``), one to three of them joined
into texts of 8–40 words; adapters are random classify adapters of 16 virtual tokens (the recipe of
``bench_classify.make_adapter``), uploaded over HTTP before any timed run.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LUA = Path(__file__).with_name("classify.lua")
REVIEWS = ROOT / "examples" / "sentiment" / "reviews.csv"
VIRTUAL_TOKENS = 16
ADMIN_KEY = "bench-admin-key"


def review_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 8–40 words, each one to three review sentences (deterministic)."""
    from ptserve.server.training.data import load_examples

    sentences = [e.text for e in load_examples(REVIEWS)]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = " ".join(rng.sample(sentences, rng.randint(1, 3)))
        if 8 <= len(text.split()) <= 40:
            out.append(text)
    return out


def save_tiny_encoder(out: Path, tokenizer_from: str) -> Path:
    """A tiny random BERT (2 layers, hidden 32) with MiniLM's tokenizer: an engine that costs nearly nothing,
    so what a request costs is the API path's (the recipe of ``tests.factories.save_tiny_encoder``)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """The server's process and its descendants (API workers, an engine core), from /proc."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_seconds(self, main_thread_only: bool = False) -> float:
        """User + system CPU of the server's processes now (live ones); with ``main_thread_only``, of each
        process's main thread (tid = pid: the event loop)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            stat = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def metric(self, name: str) -> float:
        """The sum of a metric's samples named ``name`` on the server's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@contextmanager
def serve(env: dict[str, str], timeout: float = 300.0):
    """``ptserve serve`` in a subprocess on a free port, ready (``/readyz`` 200) when yielded; stopped after."""
    port = free_port()
    full = {**os.environ, "PTSERVE_HOST": "127.0.0.1", "PTSERVE_PORT": str(port), "PTSERVE_ADMIN_KEY": ADMIN_KEY,
            **env}  # logs at the default level: the access log is part of the request path
    exe = shutil.which("ptserve", path=str(Path(sys.executable).parent)) or "ptserve"
    log = Path(tempfile.mkstemp(prefix="bench-http-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "serve"], env=full, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.unlink(missing_ok=True)


def upload_adapters(url: str, blobs: list[bytes]) -> list[str]:
    """PUT blob ``i`` as ``t<i>/sentiment`` (one adapter per tenant: the per-tenant queue and concurrency limits
    are not what is measured); the adapter ids."""
    ids = []
    with httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as c:
        for i, blob in enumerate(blobs):
            r = c.put(f"/v1/adapters/t{i}/sentiment", content=blob,
                      headers={"content-type": "application/octet-stream"})
            if r.status_code not in (200, 201):
                raise RuntimeError(f"upload a{i}: {r.status_code} {r.text}")
            ids.append(f"t{i}/sentiment")
    return ids


def request_bodies(texts: list[str], adapter_ids: list[str], per_request: int) -> list[str]:
    """One JSON body per request: ``per_request`` consecutive texts, adapters round-robin."""
    bodies = []
    for k in range(0, len(texts) - per_request + 1, per_request):
        bodies.append(json.dumps({"adapter": adapter_ids[(k // per_request) % len(adapter_ids)],
                                  "inputs": texts[k:k + per_request]}))
    return bodies


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    errors: int
    latency_us: dict[str, float]  # p50, p90, p99 (wrk's own, over every request)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def run_wrk(url: str, bodies: list[str], seconds: float, connections: int, rate: float = 0.0,
            threads: int = 1) -> WrkResult:
    """``wrk`` with ``classify.lua`` posting ``bodies`` round-robin; closed loop (each connection sends its next
    request when the last is answered) unless ``rate`` > 0: then each connection paces its requests to
    ``rate / connections`` per second from a schedule (open loop, wrk's ``delay()``), so the load does not
    slow down when the server does. The script writes its summary as one JSON line."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bodies.jsonl").write_text("".join(b + "\n" for b in bodies))
        env = {**os.environ, "BENCH_BODIES": str(Path(tmp) / "bodies.jsonl"), "BENCH_AUTH": f"Bearer {ADMIN_KEY}",
               "BENCH_RATE": str(rate / threads if rate else 0)}
        done = subprocess.run(
            [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s",
             "-s", str(LUA), f"{url}/v1/classify"],
            env=env, capture_output=True, text=True, timeout=seconds + 120,
        )
    line = next((x for x in done.stdout.splitlines() if x.startswith("{\"requests\"")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(line)
    return WrkResult(r["requests"], r["seconds"], r["non_2xx"], r["errors"],
                     {k: r[k] for k in ("p50", "p90", "p99")})


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text()
    found = re.search(r"model name\s*:\s*(.+)", text)
    return found.group(1).strip() if found else "unknown"
