"""The same case on tmpfs and on the mount: what Linux does is the expectation, not what we think POSIX says.

    def test_unlink_of_a_directory(places: Places) -> None:
        def case(root: Path) -> object:
            (root / "d").mkdir()
            return outcome(os.unlink, root / "d")          # ("error", "EISDIR") on both, or the test fails
        places.same(case)

`places` (module-scoped in a test module: `places = places_fixture()`) mounts one tmpfs and one blackmatch mount
(this run's mode, embedded grid, `-o allow_other`) for the whole module; each call of `same` runs the case in a new
empty directory of each and asserts the two results are equal. A case returns anything comparable: `outcome` turns
an exception into its errno name, `stat_fields` keeps the stat fields a comparison may use, and `times_changed`
says which times a call changed (the times themselves differ between the places).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import pickle
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .mounting import Mount

STAT_FIELDS = ("kind", "mode", "nlink", "uid", "gid", "size")
# The mount's atime policy (blackmatch never updates atime on reads): tmpfs is mounted with the same, or every read
# would differ.
ATIME_POLICY = "noatime"
KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}


def outcome(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", result) or ("error", errno name): what a call did, in a form both places can compare."""
    try:
        return "ok", function(*args, **kwargs)
    except OSError as exc:
        return "error", errno.errorcode.get(exc.errno or 0, str(exc.errno))


def stat_fields(path: Path | int, *fields: str, follow: bool = False) -> dict[str, Any]:
    """The named fields (default STAT_FIELDS) of lstat(path) (stat with follow, fstat for a descriptor)."""
    result = os.fstat(path) if isinstance(path, int) else os.stat(path) if follow else os.lstat(path)
    values = {
        "kind": KINDS.get(stat.S_IFMT(result.st_mode), "?"),
        "mode": oct(stat.S_IMODE(result.st_mode)),
        "nlink": result.st_nlink,
        "uid": result.st_uid,
        "gid": result.st_gid,
        "size": result.st_size,
        "rdev": result.st_rdev,
        "ino": result.st_ino,
        "atime_ns": result.st_atime_ns,
        "mtime_ns": result.st_mtime_ns,
        "ctime_ns": result.st_ctime_ns,
    }
    return {name: values[name] for name in fields or STAT_FIELDS}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.getdents64.restype = ctypes.c_ssize_t
_DIRENT64 = struct.Struct("=QqHB")  # d_ino, d_off, d_reclen, d_type; then the NUL-terminated name
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2), which Python's os module lacks; OSError as os.rename raises it."""
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:  # -100: AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old), None, str(new))


def directory_entries(path: Path) -> list[tuple[bytes, int]]:
    """Every entry getdents64 lists, "." and ".." included (os.scandir leaves them out): (name, d_ino)."""
    entries: list[tuple[bytes, int]] = []
    buffer = ctypes.create_string_buffer(1 << 16)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while (length := _libc.getdents64(fd, buffer, len(buffer))) != 0:
            if length < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), str(path))
            data, offset = buffer.raw[:length], 0
            while offset < length:
                ino, _next, reclen, _kind = _DIRENT64.unpack_from(data, offset)
                name = data[offset + _DIRENT64.size : offset + reclen].split(b"\0", 1)[0]
                entries.append((name, ino))
                offset += reclen
    finally:
        os.close(fd)
    return entries


TIMES = ("atime", "mtime", "ctime")
# Longer than a tick of the coarse clock file systems stamp times with, so that a change always shows as one.
TICK = 0.02


def times_changed(paths: Mapping[str, Path | int], action: Callable[[], Any]) -> dict[str, Any]:
    """Which times of each path (lstat; fstat for a descriptor) `action` changed: {name: "mtime ctime"} ("-" for
    none), and what `action` returned under "result". Values differ between places; which ones change must not."""
    before = {name: stat_fields(path, *(f"{time}_ns" for time in TIMES)) for name, path in paths.items()}
    time.sleep(TICK)
    result = action()
    changed: dict[str, Any] = {"result": result}
    for name, path in paths.items():
        after = stat_fields(path, *(f"{time}_ns" for time in TIMES))
        changed[name] = " ".join(time for time in TIMES if after[f"{time}_ns"] != before[name][f"{time}_ns"]) or "-"
    return changed


def as_user(uid: int, gid: int, function: Callable[..., Any], *args: Any, groups: tuple[int, ...] = ()) -> Any:
    """`outcome(function, *args)` in a child process running
    as `uid`/`gid` with supplementary `groups`: the kernel then checks that user's permissions, as for any
    program of theirs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            result = outcome(function, *args)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(result))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"the child running as uid {uid} failed"
    return pickle.loads(data)


@dataclass
class Places:
    tmpfs: Path
    mount: Path
    _count: Iterator[int]

    def fresh(self) -> tuple[Path, Path]:
        """A new empty directory in each place (mode 0o777, so other uids can work in it too)."""
        name = f"case{next(self._count)}"
        pair = self.tmpfs / name, self.mount / name
        for directory in pair:
            directory.mkdir()
            os.chmod(directory, 0o777)
        return pair

    def same(self, case: Callable[[Path], Any]) -> Any:
        """Run `case` in a new directory on tmpfs, then on the mount; assert the results are equal; return it."""
        on_tmpfs, on_mount = self.fresh()
        expected = case(on_tmpfs)
        got = case(on_mount)
        assert got == expected, f"the mount gave {got!r}, tmpfs gave {expected!r}"
        return got


def places_fixture(*mount_args: str) -> Any:
    """A module-scoped `places` fixture: a tmpfs and a mount with `-o allow_other` (and `mount_args`)."""

    @pytest.fixture(scope="module")
    def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Places]:
        # Not under pytest's own directory, which only root may enter: cases run as other uids too.
        base = Path(tempfile.mkdtemp(prefix="blackmatch-posix-"))
        os.chmod(base, 0o711)
        tmpfs = base / "tmpfs"
        tmpfs.mkdir()
        options = f"size=64m,mode=0777,{ATIME_POLICY}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(tmpfs)], check=True)
        try:
            with Mount(base / "node", base / "mnt", "-o", "allow_other", *mount_args) as mount:
                os.chmod(mount.mountpoint, 0o777)
                yield Places(tmpfs, mount.mountpoint, itertools.count())
        finally:
            subprocess.run(["umount", "-l", str(tmpfs)], check=False)
            shutil.rmtree(base, ignore_errors=True)

    return places
