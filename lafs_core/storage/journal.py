"""A write-ahead journal that makes in-place changes to share files survive a kill at any instant.

A change to existing share files (a mutable slot write, a lease record) is first written as one journal file:
every (path, offset, bytes) piece plus a checksum, fsynced. Only then are the pieces applied and fsynced, and
the journal removed. At start-up, complete journals are applied again (the pieces are absolute, so applying
twice is harmless) and torn ones, whose change never started, are dropped.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"blackmatch-journal-1\n"
_RECORD = struct.Struct(">HQQq")  # path length, offset, data length, truncate-to (-1: none)


@dataclass
class FileChange:
    """Writes to one file (created if missing), then an optional truncation."""

    path: Path
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    truncate: int | None = None
    delete: bool = False


def _encode(changes: list[FileChange], root: Path) -> bytes:
    parts = [MAGIC]
    for change in changes:
        rel = str(change.path.relative_to(root)).encode()
        if change.delete:
            parts.append(_RECORD.pack(len(rel), 0, 0, -2) + rel)
            continue
        truncate = -1 if change.truncate is None else change.truncate
        if not change.writes:
            parts.append(_RECORD.pack(len(rel), 0, 0, truncate) + rel)
        for offset, data in change.writes:
            parts.append(_RECORD.pack(len(rel), offset, len(data), truncate) + rel + data)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _decode(blob: bytes, root: Path) -> list[FileChange] | None:
    """The changes of a complete journal, or None if it is torn or not ours."""
    if len(blob) < len(MAGIC) + 32 or not blob.startswith(MAGIC):
        return None
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        return None
    changes: dict[str, FileChange] = {}
    pos = len(MAGIC)
    while pos < len(body):
        path_len, offset, length, truncate = _RECORD.unpack_from(body, pos)
        pos += _RECORD.size
        rel = body[pos : pos + path_len].decode()
        pos += path_len
        data = body[pos : pos + length]
        pos += length
        change = changes.setdefault(rel, FileChange(root / rel))
        if truncate == -2:
            change.delete = True
            continue
        if length or offset:
            change.writes.append((offset, data))
        change.truncate = None if truncate < 0 else truncate
    return list(changes.values())


def fsync_directory(path: Path) -> None:
    """Make the names in a directory (created, renamed or removed entries) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(changes: list[FileChange]) -> None:
    for change in changes:
        if change.delete:
            change.path.unlink(missing_ok=True)
            continue
        change.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(change.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for offset, data in change.writes:
                os.pwrite(fd, data, offset)
            if change.truncate is not None:
                os.ftruncate(fd, change.truncate)
            os.fsync(fd)
        finally:
            os.close(fd)
    for parent in {change.path.parent for change in changes if change.path.parent.exists()}:
        fsync_directory(parent)


class Journal:
    """Atomic multi-file changes under `root` (journal files live in `root/journal`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory = root / "journal"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._counter = 0

    def commit(self, changes: list[FileChange]) -> None:
        """Make all the changes, or (if killed before the journal is durable) none of them."""
        if not changes:
            return
        self._counter += 1
        path = self.directory / f"{os.getpid()}-{self._counter}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_encode(changes, self.root))
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)
        fsync_directory(self.directory)
        _apply(changes)
        path.unlink()
        fsync_directory(self.directory)

    def recover(self) -> int:
        """Finish the changes of every complete journal left by a killed process; drop torn ones."""
        applied = 0
        for path in sorted(self.directory.iterdir()):
            changes = _decode(path.read_bytes(), self.root) if path.suffix != ".tmp" else None
            if changes is not None:
                _apply(changes)
                applied += 1
            path.unlink()
        fsync_directory(self.directory)
        return applied
