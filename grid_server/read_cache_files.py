"""The read cache's files: the directory and its lock, each entry's two files, and how many stay open.

This is the only read-cache module that calls the operating system on cache files; what the bytes mean is
`read_cache_format`'s business. Descriptors are kept open for recently read entries only (`OpenFiles`, an LRU
of at most `max_open_files` idle entries), so a cache of thousands of files holds a bounded number of them.
Files are created 0600 in a directory made 0700; the directory's `lock` file is flock'ed while one ReadCache
uses it. Nothing is fsynced: every slot is checked against its data before it is trusted (see `read_cache`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from .disk_space import punch_hole
from .read_cache_format import EMPTY_SLOT, SLOT_SIZE, ParsedEntry, pack_slot, parse_entry, segment_digest, slot_offset

log = logging.getLogger("blackmatch.read_cache")


class CacheInUseError(RuntimeError):
    """Another ReadCache (in this process or another) holds the cache directory."""


@dataclass(frozen=True)
class ScannedEntry:
    """A good entry found on disk at start-up, with when it was last read (its meta file's mtime)."""

    parsed: ParsedEntry
    mtime_ns: int


def lock_directory(directory: Path) -> int:
    """Create the directory 0700 and take its lock; the returned descriptor holds the lock until closed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise CacheInUseError(f"cache directory {directory} is in use by another read cache") from None
    return lock_fd


def scan_directory(directory: Path) -> list[ScannedEntry]:
    """Every good entry in the directory, least recently read first; unusable files are deleted."""
    names = os.listdir(directory)
    metas = {n[: -len(".meta")] for n in names if n.endswith(".meta")}
    datas = {n[: -len(".data")] for n in names if n.endswith(".data")}
    found: list[ScannedEntry] = []
    for stem in sorted(metas | datas):
        entry = _load_entry(directory, stem) if stem in metas and stem in datas else None
        if entry is None:
            log.info("read cache: discarding unusable entry %s", stem[:10])
            for suffix in (".data", ".meta"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / (stem + suffix))
        else:
            found.append(entry)
    return sorted(found, key=lambda s: s.mtime_ns)


def _load_entry(directory: Path, stem: str) -> ScannedEntry | None:
    try:
        meta = (directory / (stem + ".meta")).read_bytes()
        data_size = os.stat(directory / (stem + ".data")).st_size
        mtime_ns = os.stat(directory / (stem + ".meta")).st_mtime_ns
    except OSError:
        return None
    parsed = parse_entry(stem, meta, data_size)
    return None if parsed is None else ScannedEntry(parsed, mtime_ns)


def set_access_times(paths: list[tuple[Path, int]]) -> None:
    """Record when each entry was last read in its meta file's mtime, for the next run's eviction order."""
    for path, ns in paths:
        with contextlib.suppress(OSError):
            os.utime(path, ns=(ns, ns))


def write_segment(data_fd: int, meta_fd: int, header_check: bytes, segnum: int, offset: int, data: bytes) -> bytes:
    """Data first, then its slot: a crash in between leaves the segment absent. Returns the data's digest."""
    digest = segment_digest(data)
    view = memoryview(data)
    written = 0
    while written < len(data):
        n = os.pwrite(data_fd, view[written:], offset + written)
        if n <= 0:
            raise OSError(28, "short write to the cache file")
        written += n
    slot = pack_slot(header_check, segnum, digest)
    if os.pwrite(meta_fd, slot, slot_offset(segnum)) != SLOT_SIZE:
        raise OSError(28, "short write to the cache metadata")
    return digest


def pread_nowait(fd: int, length: int, offset: int) -> bytes | None:
    """The bytes if the page cache holds all of them (never waits for the disk); None otherwise."""
    global _nowait_supported
    if not _nowait_supported:
        return None
    buffer = bytearray(length)
    try:
        n = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except (OSError, AttributeError, ValueError):
        _nowait_supported = False  # an old kernel or a file system without it: always use a worker thread
        return None
    return bytes(buffer) if n == length else None


_nowait_supported = hasattr(os, "RWF_NOWAIT")


def pread_checked(fd: int, offset: int, length: int, digest: bytes) -> bytes | None:
    """A whole segment from disk if it is all there and matches its recorded digest."""
    data = os.pread(fd, length, offset)
    if len(data) != length or segment_digest(data) != digest:
        return None
    return data


class EntryFiles:
    """One entry's `.data` and `.meta` files: whether they exist, and their descriptors while open.

    Opening and creating run on the trio thread, between two checkpoints, so no other task can remove the
    entry or create files of the same name in the middle.
    """

    def __init__(self, directory: Path, name: str, *, on_disk: bool = False) -> None:
        self.data_path = directory / (name + ".data")
        self.meta_path = directory / (name + ".meta")
        self.on_disk = on_disk  # the files exist with a good header
        self.data_fd: int | None = None
        self.meta_fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self.data_fd is not None

    def open(self) -> bool:
        """Open the existing files; False if there are none. OSError (and no longer on disk) if they vanished."""
        if self.data_fd is not None:
            return True
        if not self.on_disk:
            return False
        try:
            data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                meta_fd = os.open(self.meta_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                os.close(data_fd)
                raise
        except OSError:
            self.on_disk = False
            raise
        self.data_fd, self.meta_fd = data_fd, meta_fd
        return True

    def create(self, header: bytes) -> None:
        """Make the files afresh (0600, whatever the umask), the meta file starting with `header`."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        data_fd = os.open(self.data_path, flags, 0o600)
        try:
            meta_fd = os.open(self.meta_path, flags, 0o600)
            try:
                os.fchmod(data_fd, 0o600)
                os.fchmod(meta_fd, 0o600)
                os.pwrite(meta_fd, header, 0)
            except OSError:
                os.close(meta_fd)
                raise
        except OSError:
            os.close(data_fd)
            for path in (self.data_path, self.meta_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        self.data_fd, self.meta_fd, self.on_disk = data_fd, meta_fd, True

    def close(self) -> None:
        for fd in (self.data_fd, self.meta_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.data_fd = self.meta_fd = None

    def remove(self) -> None:
        """Delete the files; open descriptors keep working until closed."""
        if self.on_disk:
            for path in (self.data_path, self.meta_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            self.on_disk = False

    def clear_slot(self, segnum: int) -> None:
        """Mark a segment absent on disk (best effort: a slot left behind fails the digest check later)."""
        if self.meta_fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self.meta_fd, EMPTY_SLOT, slot_offset(segnum))

    def punch(self, start: int, length: int) -> None:
        """Free the disk blocks of [start, start+length) of the open data file; OSError if not supported."""
        assert self.data_fd is not None
        punch_hole(self.data_fd, start, length)


class _Openable(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def users(self) -> int: ...


T = TypeVar("T", bound=_Openable)


class OpenFiles(Generic[T]):
    """Entries that may hold open resources, least recently used first: at most `max_open` once idle ones go."""

    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def entries(self) -> list[T]:
        return list(self._open.values())

    def touch(self, entry: T) -> list[T]:
        """Mark the entry most recently used; returns the idle ones past `max_open`, which the caller closes."""
        self._open[entry.name] = entry
        self._open.move_to_end(entry.name)
        return self.trim()

    def trim(self) -> list[T]:
        """Take idle entries (least recently used first) out until at most `max_open` are left; returns them."""
        victims: list[T] = []
        while len(self._open) > self.max_open:
            victim = next((e for e in self._open.values() if e.users == 0), None)
            if victim is None:
                break
            del self._open[victim.name]
            victims.append(victim)
        return victims

    def remove(self, entry: T) -> None:
        if self._open.get(entry.name) is entry:
            del self._open[entry.name]
