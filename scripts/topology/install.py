"""Finding the binaries the topology runs (redis-server, nginx, prometheus), apt-installing a missing one when
allowed."""
from __future__ import annotations

import os
import shutil
import subprocess

PACKAGES = {"nginx": "nginx", "redis-server": "redis-server", "prometheus": "prometheus"}


def find_binary(name: str, install: bool) -> str:
    """``name`` on PATH or in /usr/sbin; installs its Debian package when missing and allowed (root + apt)."""
    def which() -> str | None:
        return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")

    if found := which():
        return found
    package = PACKAGES.get(name, name)
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True)
        if found := which():
            return found
    raise FileNotFoundError(f"{name} not found: install it first (apt-get install -y {package})")
