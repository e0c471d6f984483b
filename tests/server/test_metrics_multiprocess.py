"""One /metrics for a server of several processes: two real processes write metrics into one
``PROMETHEUS_MULTIPROC_DIR``; one scrape shows both processes' counts summed, gauges combined by their mode, the
process metrics of both, and passes ``promtool check metrics``; a process marked dead leaves the live sums."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ptserve.server.metrics import mark_process_dead, prepare_multiprocess_dir, scrape
from tests.components import need_binary

# One process of the server: ``requests`` classify answers, ``inflight`` requests open, a queue depth, one pass.
WRITER = textwrap.dedent("""
    import sys
    from ptserve.server.batcher import PassReport
    from ptserve.server.metrics import Metrics

    directory, requests, inflight, depth, rows = sys.argv[1], *map(int, sys.argv[2:6])
    m = Metrics(multiprocess_dir=directory)
    for _ in range(requests):
        m.observe_request("/v1/classify", 200, 0.004)
    m.observe_request("/v1/adapters", 401, 0.001)
    m.observe_error("unauthorized")
    for _ in range(inflight):
        m.inflight.inc()
    m.queue_depth.set(depth)
    m.observe_pass(PassReport(rows, [0.01] * rows, 0.02, None))
    m.build.info({"version": "0.1.0", "backbone": "minilm"})
    m.refresh()
    print("ready", flush=True)
    sys.stdin.readline()  # stay alive (its live gauges count) until the test says go
    m.close()
""")


@pytest.fixture
def writers(tmp_path):
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    procs = []
    for args in (("3", "2", "5", "4"), ("4", "1", "7", "6")):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"  # one after the other: the second sets its gauges last
    yield directory, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _samples(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_one_scrape_sums_both_processes(writers):
    directory, procs = writers
    s = _samples(scrape(directory))
    assert s[("ptserve_requests_total", (("endpoint", "/v1/classify"), ("status_class", "2xx")))] == 3 + 4
    assert s[("ptserve_requests_total", (("endpoint", "/v1/adapters"), ("status_class", "4xx")))] == 2
    assert s[("ptserve_requests_rejected_total", (("reason", "unauthorized"),))] == 2
    assert s[("ptserve_request_duration_seconds_count", (("endpoint", "/v1/classify"),))] == 7
    assert s[("ptserve_batch_size_count", ())] == 2 and s[("ptserve_batch_size_sum", ())] == 4 + 6
    assert s[("ptserve_queue_wait_seconds_count", ())] == 10
    assert s[("ptserve_requests_in_flight", ())] == 2 + 1  # livesum
    assert s[("ptserve_queue_depth", ())] == 7  # mostrecent: the process that set it last
    assert s[("ptserve_build_info", (("backbone", "minilm"), ("version", "0.1.0")))] == 1
    assert s[("process_resident_memory_bytes", ())] > 2 * 10e6  # both processes' memory
    assert s[("process_cpu_seconds_total", ())] > 0
    assert not any(("pid", str(p.pid)) in labels for _, labels in s for p in procs)  # no per-process series


def test_the_scrape_is_promtool_clean(writers):
    promtool = need_binary("promtool", "prometheus")
    directory, _ = writers
    done = subprocess.run([promtool, "check", "metrics"], input=scrape(directory), capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_a_dead_process_leaves_the_live_sums_not_the_counts(writers):
    directory, procs = writers
    procs[0].communicate("go\n", timeout=30)
    assert procs[0].returncode == 0
    mark_process_dead(procs[0].pid, directory)
    s = _samples(scrape(directory))
    assert s[("ptserve_requests_in_flight", ())] == 1  # only the live process's
    assert s[("ptserve_requests_total", (("endpoint", "/v1/classify"), ("status_class", "2xx")))] == 7  # kept


def test_prepare_empties_the_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "counter_123.db").write_bytes(b"stale")
    assert list(prepare_multiprocess_dir(tmp_path / "m").iterdir()) == []
