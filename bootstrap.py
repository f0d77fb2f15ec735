"""Bring a fresh Debian machine to the point where blackmatch runs: system packages and the `.venv`.

Used by `./runtests.py` and `./blackmatch` (the two README commands) so that both work on a machine that has
only Python. Standard library only: nothing else can be assumed to be installed when this runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".blackmatch-installed"
DEBIAN_PACKAGES = ("fuse3", "libfuse3-dev", "pkg-config")


def log(message: str) -> None:
    print(f"[bootstrap] {message}", file=sys.stderr, flush=True)


def missing_debian_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []  # not Debian: trust that the packages are there, pip will say otherwise
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_debian_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> None:
    missing = missing_debian_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"blackmatch needs the Debian packages {' '.join(missing)}; install them as root and rerun")
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def _install_fingerprint() -> str:
    """Changes whenever what `pip install` would do changes: the project metadata or the interpreter."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_venv() -> Path:
    """Create `.venv` with the project installed editable, test tools included; return its python.

    One environment serves both commands, so switching between them never reinstalls.
    """
    fingerprint = _install_fingerprint()
    if VENV_PYTHON.exists() and STAMP.exists() and STAMP.read_text() == fingerprint:
        return VENV_PYTHON
    if not VENV_PYTHON.exists():
        log(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    log("installing blackmatch and its dependencies into .venv")
    pip = [str(VENV_PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", ".[test]"], check=True, cwd=ROOT)
    STAMP.write_text(fingerprint)
    return VENV_PYTHON


def ensure_all() -> Path:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs under whatever python3 the machine has
        sys.exit("blackmatch needs Python 3.11 or newer")
    ensure_debian_packages()
    return ensure_venv()
