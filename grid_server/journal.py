"""The write-back journal: an append-only file of JSON lines recording changes not yet on the grid.

Each change is appended (and flushed to the kernel) before the operation that made it returns, so a killed process
loses nothing the kernel acknowledged; `sync` adds an fsync, for `fsync` callers, and the filesystem fsyncs it (with
the closed files' content) shortly after every close, against power loss. A torn last line (a power loss mid-append)
is ignored on replay and cut off when the journal is opened, so no record is ever written behind it. When nothing is
pending the journal is rewritten empty, so it never grows without bound. The journal holds caps: it lives under
private/ (0700) and is 0600.

A full disk: the journal keeps disk blocks claimed ahead of its end (`RESERVE`, without growing the file), so when
the disk fills up, file data stops but changes go on being recorded for a while, above all the unlink that makes
room again. An append the disk refuses all the same is cut off again, so the next record never lands behind a
torn one (replay would take the two for one damaged line and skip both). Records are written at the end of the
last whole one (pwrite, not O_APPEND), so even a cut that fails is overwritten by the next record.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import orjson

from . import disk_space
from .journal_records import MalformedRecord, Record, parse_record, serialize_record

log = logging.getLogger("blackmatch.journal")

RESERVE = 256 * 1024  # bytes claimed past the end: some 700 changes still recorded on a full disk


class WriteJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._end = _whole_records_end(self._fd)  # where the last whole record ends
        self._reserved_to = self._end
        self._can_reserve = True  # until the filesystem says it cannot
        self._unsynced = False
        if os.fstat(self._fd).st_size != self._end:
            self._cut_back()
        self._keep_reserve()

    def replay(self) -> list[Record]:
        """The records written so far, oldest first."""
        records: list[Record] = []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                records.append(parse_record(orjson.loads(line)))
            except orjson.JSONDecodeError:
                if number < len(lines) - 1:
                    log.warning("journal line %d is damaged; skipped", number)
            except MalformedRecord as exc:
                log.warning("journal line %d is not a record this version knows (%s); skipped", number, exc)
        return records

    def append(self, record: Record) -> None:
        """Add one record whole, or raise OSError (ENOSPC, say) with the journal as it was."""
        line = _line(record)
        try:
            written = os.pwrite(self._fd, line, self._end)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"the journal took {written} of {len(line)} bytes")
        except OSError:
            self._cut_back()
            raise
        self._end += written
        self._unsynced = True
        self._keep_reserve()

    def _keep_reserve(self) -> None:
        """Claim the next RESERVE bytes once half of the last claim is used, while the disk has room."""
        if not self._can_reserve or self._reserved_to - self._end >= RESERVE // 2:
            return
        try:
            disk_space.reserve(self._fd, self._end, RESERVE)
        except OSError as exc:
            self._can_reserve = exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS)
            return  # the disk is full: what is claimed already still serves
        self._reserved_to = self._end + RESERVE

    def _cut_back(self) -> None:
        self._reserved_to = self._end  # the claim is used up (that is why the append failed), or cut with it
        try:
            os.ftruncate(self._fd, self._end)
        except OSError as exc:  # replay skips the torn line, and the next record is written over it
            log.error("cannot cut a failed append off the journal: %s", exc)

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False

    def fileno(self) -> int:
        return self._fd

    def rewrite(self, records: list[Record]) -> None:
        """Replace the journal by `records` atomically (write aside, fsync, rename)."""
        temporary = self.path.with_suffix(".new")
        fd = -1
        try:
            with open(temporary, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                out.write(b"".join(_line(record) for record in records))
                out.flush()
                os.fsync(out.fileno())
            fd = os.open(temporary, os.O_RDWR)
            os.replace(temporary, self.path)
        except OSError:
            if fd >= 0:
                os.close(fd)
            temporary.unlink(missing_ok=True)  # the journal itself is untouched
            raise
        os.close(self._fd)
        self._fd = fd
        self._end = self._reserved_to = os.fstat(self._fd).st_size
        self._unsynced = False
        self._keep_reserve()  # the old journal's claim went with it

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


def _line(record: Record) -> bytes:
    return orjson.dumps(serialize_record(record)) + b"\n"


def _whole_records_end(fd: int) -> int:
    """The length of the file up to and including its last newline: what follows is a torn record."""
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0
