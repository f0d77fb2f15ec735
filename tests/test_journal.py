"""The write-back journal's own guarantees: a refused append leaves it whole, and replay reads what was appended."""

from __future__ import annotations

import contextlib
import errno
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from grid_server.journal import RESERVE, WriteJournal
from grid_server.journal_records import Removal, serialize_record

from .small_disk import fill_up, needs_root, small_tmpfs


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process: a write past `limit` is cut short (or EFBIG), as a filling disk cuts it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def removal(seq: int, name: str = "n") -> Removal:
    return Removal(seq, "URI:DIR2:x:y", name)


@pytest.mark.parametrize("room", [0, 10])
def test_a_refused_append_leaves_the_journal_whole(tmp_path: Path, room: int) -> None:
    """With `room` bytes left the append is cut short (a torn line) or refused outright; either way it raises,
    and the next record is not glued to a torn one (replay would skip both)."""
    path = tmp_path / "journal"
    journal = WriteJournal(path)
    journal.append(removal(1))
    size = path.stat().st_size
    with file_size_limit(size + room), pytest.raises(OSError):
        journal.append(removal(2, "x" * 100))
    assert path.stat().st_size == size
    journal.append(removal(3))
    journal.close()
    assert [record.seq for record in WriteJournal(path).replay()] == [1, 3]  # type: ignore[union-attr]


def test_a_failed_rewrite_keeps_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = WriteJournal(path)
    for seq in range(5):
        journal.append(removal(seq))
    with file_size_limit(10), pytest.raises(OSError):
        journal.rewrite([removal(99, "y" * 100)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal"]  # no half-written replacement left
    journal.append(removal(5))
    assert [record.seq for record in journal.replay()] == list(range(6))  # type: ignore[union-attr]


@needs_root
def test_a_full_disk_still_takes_changes_from_the_reserve(tmp_path: Path) -> None:
    """Blocks claimed ahead of the end take records when nothing else fits; a compaction claims them again."""
    name = "n" * 200
    with small_tmpfs(tmp_path / "disk", 1 << 20) as disk:
        journal = WriteJournal(disk / "journal")
        fill_up(disk / "filler")
        taken = 0
        with pytest.raises(OSError) as full:
            while True:
                journal.append(removal(taken, name))
                taken += 1
        assert full.value.errno == errno.ENOSPC
        assert taken * len(orjson.dumps(serialize_record(removal(0, name)))) > RESERVE * 0.9
        assert [r.seq for r in journal.replay()] == list(range(taken))  # type: ignore[union-attr]
        journal.rewrite([])  # the old journal's blocks come back, and are claimed again
        for seq in range(100):
            journal.append(removal(seq, name))
        journal.close()


def test_a_torn_tail_is_cut_off_when_the_journal_opens(tmp_path: Path) -> None:
    """A power loss mid-append leaves a line without its newline: the next run's first record must not be glued
    to it (replay would skip both as one damaged line)."""
    path = tmp_path / "journal"
    path.write_bytes(orjson.dumps(serialize_record(removal(1))) + b"\n" + b'{"op":"set","se')
    journal = WriteJournal(path)
    journal.append(removal(3))
    assert [record.seq for record in journal.replay()] == [1, 3]  # type: ignore[union-attr]
    assert path.read_bytes().endswith(b"\n")
