"""File content kept on local disk until it is on the grid: files being written, and written files waiting for
their upload. Each is one plain file `private/blackmatch/roots/KEY/files/<id>` (0600), named by a random id.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class LocalFile:
    """One file's content on local disk, with a version counter that says whether the grid has caught up."""

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        self.id = path.name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.version = 1 if create else 0  # a new file is dirty (its emptiness is not on the grid yet)
        self.uploaded_version = 0
        self.writers = 0

    @property
    def dirty(self) -> bool:
        return self.version != self.uploaded_version

    def mark_dirty(self) -> None:
        self.version += 1

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, max(0, min(size, self.size - offset)), offset) if offset < self.size else b""

    def pwrite(self, offset: int, data: bytes) -> int:
        written = os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + written)
        self.mark_dirty()
        return written

    def fill(self, data: bytes) -> None:
        """Append content the grid already holds (a copy being made): all of it, or OSError. A short write is
        the disk filling up, and must never leave a hole that would be uploaded as zeros."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.size)
            self.size += written
            view = view[written:]

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size
        self.mark_dirty()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class LocalFiles:
    """The directory of local files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def new(self) -> LocalFile:
        return LocalFile(self.directory / secrets.token_hex(16), create=True)

    def existing(self, file_id: str) -> LocalFile | None:
        path = self.directory / file_id
        if not file_id.isalnum() or not path.is_file():
            return None
        return LocalFile(path, create=False)

    def ids(self) -> set[str]:
        return {p.name for p in self.directory.iterdir() if p.is_file()}
