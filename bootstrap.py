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
# Tools the mount tests drive on the mounted filesystem, as a user would.
TEST_DEBIAN_PACKAGES = ("rsync", "git", "tar", "diffutils", "findutils", "coreutils")


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


# Tahoe-LAFS itself, for the interoperability tests (tests/interop) that run a real grid next to blackmatch. It gets a
# venv of its own: its dependency set (Twisted, foolscap, pyOpenSSL, ...) has nothing to do with blackmatch's.
TAHOE_VERSION = "1.20.0"
TAHOE_VENV = ROOT / ".venv-tahoe"
TAHOE_STAMP = TAHOE_VENV / ".tahoe-installed"
# Every dependency pinned to a set under which tahoe-lafs 1.20.0 was seen to run a grid (Python 3.11): 1.20.0 is
# frozen, its dependencies are not, and a new Twisted or pyOpenSSL release must not break the interop tests overnight.
TAHOE_CONSTRAINTS = [
    "appdirs==1.4.4",
    "attrs==26.1.0",
    "autobahn==26.10.2",
    "Automat==25.4.16",
    "bcrypt==5.0.0",
    "boltons==26.2.0",
    "cbor2==6.2.1",
    "cffi==2.1.1",
    "click==8.5.1",
    "collections-extended==2.0.2",
    "constantly==23.10.4",
    "cryptography==50.0.2",
    "distro==1.9.0",
    "eliot==1.18.0",
    "filelock==4.2.11",
    "foolscap==24.9.0",
    "future==1.0.0",
    "humanize==4.17.0",
    "hyperlink==21.0.0",
    "idna==3.20",
    "Incremental==24.11.0",
    "iterable-io==1.0.4",
    "klein==24.8.0",
    "magic-wormhole==0.24.0",
    "MarkupSafe==3.0.4",
    "msgpack==1.2.4",
    "multipart==2.0.1",
    "netifaces==0.11.0",
    "orjson==3.13.0",
    "packaging==26.3",
    "psutil==7.2.2",
    "pycddl==0.6.4",
    "pycparser==3.12",
    "PyNaCl==1.6.2",
    "pyOpenSSL==26.4.0",
    "pyrsistent==0.20.0",
    "pyutil==3.4.1",
    "PyYAML==6.0.3",
    "qrcode==8.2",
    "service-identity==26.1.0",
    "simplejson==4.3.0",
    "six==1.17.0",
    "spake2==0.9",
    "tqdm==4.70.1",
    "treq==26.7.0",
    "Tubes==0.2.1",
    "Twisted==26.10.0",
    "txaio==26.6.1",
    "txtorcon==26.6.0",
    "typing_extensions==4.16.0",
    "ujson==6.1.0",
    "Werkzeug==3.1.9",
    "zfec==1.6.0.0",
    "zipstream-ng==1.9.3",
    "zope.interface==8.7",
]


def _tahoe_fingerprint() -> str:
    """Changes whenever the Tahoe install would: the pinned versions or the interpreter."""
    digest = hashlib.sha256(f"tahoe-lafs=={TAHOE_VERSION}\n".encode())
    digest.update("\n".join(TAHOE_CONSTRAINTS).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_tahoe_venv() -> Path:
    """Create `.venv-tahoe` with tahoe-lafs 1.20.0 from PyPI; return its `tahoe` executable.

    Uses the interpreter running this (Python 3.11 here; 3.12 and 3.13 also install and print `tahoe --version`).
    About 30 s the first time on a 2-core machine, then free: a stamp records what was installed, as in ensure_venv.
    """
    tahoe = TAHOE_VENV / "bin" / "tahoe"
    python = TAHOE_VENV / "bin" / "python"
    fingerprint = _tahoe_fingerprint()
    if tahoe.exists() and TAHOE_STAMP.exists() and TAHOE_STAMP.read_text() == fingerprint:
        return tahoe
    if not python.exists():
        log(f"creating {TAHOE_VENV}")
        venv.EnvBuilder(with_pip=True).create(TAHOE_VENV)
    log(f"installing tahoe-lafs {TAHOE_VERSION} into {TAHOE_VENV.name}")
    constraints = TAHOE_VENV / "constraints.txt"
    constraints.write_text("\n".join(TAHOE_CONSTRAINTS) + "\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-c", str(constraints), f"tahoe-lafs=={TAHOE_VERSION}"], check=True)
    subprocess.run([str(tahoe), "--version"], check=True, stdout=subprocess.DEVNULL)
    TAHOE_STAMP.write_text(fingerprint)
    return tahoe


def ensure_all() -> Path:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs under whatever python3 the machine has
        sys.exit("blackmatch needs Python 3.11 or newer")
    ensure_debian_packages()
    return ensure_venv()
