"""Times on the mount, each case run on tmpfs too (mounted noatime, the mount's policy): which of atime, mtime and
ctime each call changes, on the file and on the directories around it, must be what Linux does. Values differ
between the places, so the cases compare what changed, and the values only where the caller chose them. Then
that times survive an unmount, a wiped cache and a new mount, the root's included.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

from .mounting import MOUNT_MARKS, Mount, wipe_cache
from .posix_compare import (
    RENAME_EXCHANGE,
    TIMES,
    Places,
    outcome,
    places_fixture,
    renameat2,
    stat_fields,
    times_changed,
)

pytestmark = MOUNT_MARKS

places = places_fixture()

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_FDCWD = -100
A_TIME = 1_500_000_000_123_456_789  # explicit times, with nanoseconds
M_TIME = 1_400_000_000_987_654_321


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (seconds, nanoseconds) pairs, so UTIME_NOW and UTIME_OMIT can be given (os.utime cannot)."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))


def split_ns(ns: int) -> tuple[int, int]:
    return divmod(ns, 1_000_000_000)


def test_file_content_calls(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "d").mkdir()
        f = root / "d" / "f"
        f.write_bytes(b"hello")
        around = {"f": f, "d": root / "d"}
        with open(f, "r+b") as handle:
            steps = [
                times_changed(around, lambda: os.pwrite(handle.fileno(), b"HE", 0)),
                times_changed(around, lambda: os.pread(handle.fileno(), 5, 0)),
                times_changed(around, lambda: os.ftruncate(handle.fileno(), 2)),
            ]
        steps += [
            times_changed(around, f.read_bytes),
            times_changed(around, lambda: os.truncate(f, 10)),
            times_changed(around, lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))),
            times_changed(around, lambda: os.close(os.open(f, os.O_WRONLY))),
            times_changed(around, lambda: os.listdir(root / "d")),
        ]
        return steps

    places.same(case)


def test_attribute_calls(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "d").mkdir()
        f = root / "d" / "f"
        f.write_bytes(b"x")
        around = {"f": f, "d": root / "d"}
        return [
            times_changed(around, lambda: os.chmod(f, 0o600)),
            times_changed(around, lambda: os.chown(f, os.getuid(), os.getgid())),
            times_changed(around, lambda: os.setxattr(f, "user.a", b"1")),
            times_changed(around, lambda: os.setxattr(f, "user.a", b"2")),
            times_changed(around, lambda: os.removexattr(f, "user.a")),
            times_changed(around, lambda: outcome(os.removexattr, f, "user.a")),
            times_changed(around, lambda: os.chmod(root / "d", 0o700)),
        ]

    places.same(case)


def test_utimensat(places: Places) -> None:
    """Explicit times are kept to the nanosecond; UTIME_NOW sets one time to now and UTIME_OMIT leaves it."""

    def case(root: Path) -> object:
        f = root / "f"
        f.write_bytes(b"x")
        around = {"f": f, "root": root}

        def explicit() -> object:
            os.utime(f, ns=(A_TIME, M_TIME))
            return stat_fields(f, "atime_ns", "mtime_ns")

        return [
            times_changed(around, explicit),
            times_changed(around, lambda: utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))),
            times_changed(around, lambda: utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))),
            times_changed(around, lambda: utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))),
            times_changed(around, lambda: utimensat(f, split_ns(A_TIME), (0, UTIME_OMIT))),
            stat_fields(f, "atime_ns"),
            times_changed(around, lambda: utimensat(f, (0, UTIME_NOW), (0, UTIME_NOW))),
            times_changed(around, lambda: subprocess.run(["touch", "-a", str(f)], check=True).returncode),
            times_changed(around, lambda: subprocess.run(["touch", "-m", str(f)], check=True).returncode),
            times_changed(around, lambda: os.utime(root, ns=(A_TIME, M_TIME))),
            stat_fields(root, "atime_ns", "mtime_ns"),
        ]

    places.same(case)


def test_names_change_their_directory(places: Places) -> None:
    """Making, removing and renaming names changes the directory's mtime and ctime (not its parent's); a rename
    changes the ctime of what it moves (followed through a descriptor, as its name changes)."""

    def case(root: Path) -> object:
        d, e = root / "d", root / "e"
        d.mkdir()
        e.mkdir()
        around = {"d": d, "e": e, "root": root}

        def moving(path: Path, to: Path) -> object:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                return times_changed({**around, "moved": descriptor}, lambda: os.rename(path, to))
            finally:
                os.close(descriptor)

        return [
            times_changed(around, lambda: (d / "f").write_bytes(b"x")),
            times_changed(around, lambda: (d / "sub").mkdir()),
            times_changed(around, lambda: (d / "link").symlink_to("f")),
            times_changed(around, lambda: os.close(os.open(d / "g", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))),
            times_changed(around, lambda: os.link(d / "g", d / "h")),
            times_changed(around, lambda: outcome(os.mkdir, d / "sub")),
            moving(d / "f", d / "f2"),
            moving(d / "f2", e / "f"),
            moving(d / "sub", e / "sub"),
            moving(d / "g", e / "f"),
            times_changed(around, lambda: os.unlink(d / "link")),
            times_changed(around, lambda: os.rmdir(e / "sub")),
            times_changed(around, lambda: outcome(os.rmdir, d / "missing")),
        ]

    places.same(case)


def test_an_exchange_changes_both_and_their_directories(places: Places) -> None:
    """RENAME_EXCHANGE changes the ctime of both things it swaps (followed through descriptors) and the mtime and
    ctime of both directories."""

    def case(root: Path) -> object:
        d, e = root / "d", root / "e"
        d.mkdir()
        e.mkdir()
        (d / "f").write_bytes(b"x")
        (e / "sub").mkdir()
        descriptors = {name: os.open(path, os.O_RDONLY) for name, path in (("f", d / "f"), ("sub", e / "sub"))}
        try:
            return times_changed(
                {"d": d, "e": e, **descriptors}, lambda: renameat2(d / "f", e / "sub", RENAME_EXCHANGE)
            )
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)

    places.same(case)


def test_link_changes_ctime(places: Places) -> None:
    """link changes the file's ctime (its link count), which both names show."""

    def case(root: Path) -> object:
        f = root / "f"
        f.write_bytes(b"x")
        step = times_changed({"f": f}, lambda: os.link(f, root / "g"))
        return step, stat_fields(f, "ctime_ns") == stat_fields(root / "g", "ctime_ns")

    places.same(case)


def test_hard_links_share_times(places: Places) -> None:
    def case(root: Path) -> object:
        f, g = root / "f", root / "g"
        f.write_bytes(b"x")
        os.link(f, g)
        return [
            times_changed({"g": g}, lambda: os.chmod(f, 0o600)),
            times_changed({"g": g}, lambda: f.write_bytes(b"yy")),
            times_changed({"f": f}, lambda: os.utime(g, ns=(A_TIME, M_TIME))),
        ]

    places.same(case)


def all_times(path: Path) -> dict[str, int]:
    return stat_fields(path, *(f"{time}_ns" for time in TIMES))


def test_times_survive_remount(tmp_path: Path) -> None:
    """Times set explicitly, changed by calls, and the root's own, are the same after an unmount, a wiped cache and
    a new mount (the directories' times included, which reach the grid with their parents' next update)."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint):
        root_before = all_times(mountpoint)
        assert root_before["mtime_ns"] > 1_600_000_000 * 10**9  # a real time, not the epoch
        d = mountpoint / "d"
        d.mkdir()
        (d / "inner").mkdir()
        (d / "f").write_bytes(b"some content")
        (d / "set").write_bytes(b"x")
        os.utime(d / "set", ns=(A_TIME, M_TIME))
        os.chmod(d / "f", 0o600)
        (d / "inner" / "g").write_bytes(b"y")
        os.utime(mountpoint, ns=(A_TIME, M_TIME))
        paths = [mountpoint, d, d / "inner", d / "f", d / "set", d / "inner" / "g"]
        before = {str(path): all_times(path) for path in paths}
        assert before[str(mountpoint)] != root_before
        assert before[str(d / "set")]["atime_ns"] == A_TIME and before[str(d / "set")]["mtime_ns"] == M_TIME
    wipe_cache(node)
    with Mount(node, mountpoint):
        assert {str(path): all_times(path) for path in paths} == before
