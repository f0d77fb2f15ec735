"""A small tmpfs to fill up: the node directory's disk running full, for real (mounting one needs root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (created 0700), unmounted again however the body ends."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", os.fspath(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", os.fspath(path)], check=False)


def fill_up(path: Path) -> Path:
    """A file at `path` grown until its filesystem has no byte left: the disk is full from here on."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while f.write(chunk[:size]):
                    pass
    return path
