"""The write-back journal: an append-only file of JSON lines recording changes not yet on the grid.

Each change is appended (and flushed to the kernel) before the operation that made it returns, so a killed
process loses nothing the kernel acknowledged; `sync` adds an fsync, for `fsync` callers, and the filesystem
fsyncs it (with the closed files' content) shortly after every close, against power loss. A torn
last line (the process died mid-append) is ignored on replay. When nothing is pending the journal is rewritten
empty, so it never grows without bound. The journal holds caps: it lives under private/ (0700) and is 0600.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("blackmatch.journal")


class WriteJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._unsynced = False

    def replay(self) -> list[dict[str, Any]]:
        """The records written so far, oldest first."""
        records = []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                if number < len(lines) - 1:
                    log.warning("journal line %d is damaged; skipped", number)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        os.write(self._fd, orjson.dumps(record) + b"\n")
        self._unsynced = True

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False

    def fileno(self) -> int:
        return self._fd

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the journal by `records` atomically (write aside, fsync, rename)."""
        temporary = self.path.with_suffix(".new")
        with open(temporary, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
            out.write(b"".join(orjson.dumps(r) + b"\n" for r in records))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._unsynced = False

    def close(self) -> None:
        self.sync()
        os.close(self._fd)
