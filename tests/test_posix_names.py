"""Names and the calls around them, on tmpfs and on the mount: Linux's answer is the expectation.

Long names (ENAMETOOLONG on every call that takes one), names that are not UTF-8, "." and ".." in listings, the
open flags O_EXCL, O_APPEND and O_TRUNC, fallocate, renameat2's RENAME_EXCHANGE and RENAME_NOREPLACE, rename over
directories and onto itself, and ENOTDIR below a file.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from .mounting import MOUNT_MARKS, Mount, blackmatch
from .posix_compare import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Places,
    directory_entries,
    outcome,
    places_fixture,
    renameat2,
    stat_fields,
)

pytestmark = MOUNT_MARKS

places = places_fixture()

ODD_NAMES = [b"\xff\xfe", b"caf\xe9", b"a\xc3", "\U0010fe80".encode(), b"\xf4\x8f\xba\x80\xff", "é".encode()]


def listing(path: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(path)))


def test_names_longer_than_255_bytes(places: Places) -> None:
    longest, too_long = "n" * 255, "n" * 256
    wide = "é" * 128  # 256 bytes in 128 characters: bytes count, not characters

    def case(root: Path) -> object:
        (root / "d").mkdir()
        (root / "f").write_bytes(b"x")
        results = [outcome((root / longest).write_bytes, b"y"), outcome(os.mkdir, root / "d" / longest)]
        for name in (too_long, wide):
            results += [
                outcome(os.stat, root / name),
                outcome(os.open, root / name, os.O_CREAT | os.O_WRONLY),
                outcome(os.mkdir, root / name),
                outcome(os.symlink, "f", root / name),
                outcome(os.link, root / "f", root / name),
                outcome(os.unlink, root / name),
                outcome(os.rmdir, root / name),
                outcome(os.rename, root / "f", root / name),
                outcome(os.rename, root / name, root / "g"),
                outcome(os.stat, root / name / "f"),
            ]
        return results, listing(root), listing(root / "d")

    places.same(case)


def test_names_that_are_not_utf8(places: Places) -> None:
    def case(root: Path) -> object:
        base = os.fsencode(root)
        for number, name in enumerate(ODD_NAMES):
            with open(base + b"/" + name, "wb") as file:
                file.write(b"%d" % number)
        os.mkdir(base + b"/dir\xff")
        os.rename(base + b"/\xff\xfe", base + b"/dir\xff/\xfe\xff")
        contents = {}
        for name in ODD_NAMES[1:]:
            with open(base + b"/" + name, "rb") as file:
                contents[name] = file.read()
        return listing(root), sorted(os.listdir(base + b"/dir\xff")), contents, outcome(os.stat, base + b"/\xff\xfe")

    places.same(case)


def test_dot_and_dot_dot_are_listed(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "d").mkdir()
        (root / "d" / "f").write_bytes(b"x")
        (root / "d" / "e").mkdir()
        numbers = {"root": os.stat(root).st_ino, "d": os.stat(root / "d").st_ino, "e": os.stat(root / "d" / "e").st_ino}
        named = {number: name for name, number in numbers.items()}
        listed = {}
        for path in (root / "d", root / "d" / "e"):
            entries = directory_entries(path)
            dots = sorted((name, named.get(ino, "other")) for name, ino in entries if name in (b".", b".."))
            listed[str(path.relative_to(root))] = (dots, len(entries))
        return listed

    places.same(case)


def test_open_flags(places: Places) -> None:
    def case(root: Path) -> object:
        path = root / "f"
        path.write_bytes(b"hello")
        results: list[object] = [outcome(os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b" world")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"!")
        os.close(fd)
        results.append(path.read_bytes())
        fd = os.open(path, os.O_RDONLY | os.O_TRUNC)
        results.append(os.read(fd, 100))
        os.close(fd)
        results.append(stat_fields(path, "size"))
        path.write_bytes(b"again")
        fd = os.open(path, os.O_RDWR | os.O_TRUNC)
        os.write(fd, b"ab")
        os.close(fd)
        results.append(path.read_bytes())
        fd = os.open(root / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        results.append(stat_fields(root / "new"))
        return results

    places.same(case)


def test_posix_fallocate_extends(places: Places) -> None:
    def case(root: Path) -> object:
        path = root / "f"
        path.write_bytes(b"abc")
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 10_000)
            results = [stat_fields(fd, "size")]
            os.posix_fallocate(fd, 0, 100)  # never shrinks
            results.append(stat_fields(fd, "size"))
            os.posix_fallocate(fd, 20_000, 5)
            results += [stat_fields(fd, "size"), os.pread(fd, 5, 0), os.pread(fd, 4, 19_999)]
        finally:
            os.close(fd)
        return results

    places.same(case)


@pytest.mark.xfail(strict=True, reason="pyfuse3 has no fallocate handler: the kernel answers EOPNOTSUPP")
def test_the_fallocate_syscall_extends(places: Places) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

    def fallocate(fd: int, offset: int, length: int) -> None:
        if libc.fallocate(fd, 0, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def case(root: Path) -> object:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT)
        try:
            return [outcome(fallocate, fd, 0, 10_000), stat_fields(fd, "size")]
        finally:
            os.close(fd)

    places.same(case)


def test_rename_exchange_and_noreplace(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "a").write_bytes(b"A")
        (root / "b").write_bytes(b"B")
        (root / "d").mkdir()
        (root / "d" / "inside").write_bytes(b"I")
        (root / "e").mkdir()
        results = [
            outcome(renameat2, root / "a", root / "b", RENAME_EXCHANGE),
            (root / "a").read_bytes(),
            (root / "b").read_bytes(),
            outcome(renameat2, root / "a", root / "d", RENAME_EXCHANGE),
            sorted(os.listdir(root / "a")),
            (root / "d").read_bytes(),
            outcome(renameat2, root / "d", root / "e" / "moved", RENAME_EXCHANGE),
            outcome(renameat2, root / "a", root / "e" / "x", RENAME_EXCHANGE),
            outcome(renameat2, root / "b", root / "d", RENAME_NOREPLACE),
            outcome(renameat2, root / "b", root / "c", RENAME_NOREPLACE),
            outcome(renameat2, root / "a", root / "b", RENAME_EXCHANGE | RENAME_NOREPLACE),
            sorted(os.listdir(root)),
        ]
        (root / "e" / "x").write_bytes(b"X")
        results += [
            outcome(renameat2, root / "c", root / "e" / "x", RENAME_EXCHANGE),
            (root / "c").read_bytes(),
            (root / "e" / "x").read_bytes(),
        ]
        return results

    places.same(case)


def test_rename_over_directories_and_onto_itself(places: Places) -> None:
    def case(root: Path) -> object:
        for name in ("d", "empty", "full"):
            (root / name).mkdir()
        (root / "d" / "f").write_bytes(b"x")
        (root / "full" / "g").write_bytes(b"y")
        (root / "file").write_bytes(b"z")
        return [
            outcome(os.rename, root / "d", root / "full"),
            outcome(os.rename, root / "d", root / "empty"),
            sorted(os.listdir(root)),
            sorted(os.listdir(root / "empty")),
            outcome(os.rename, root / "file", root / "file"),
            outcome(os.rename, root / "empty", root / "empty"),
            sorted(os.listdir(root)),
            (root / "file").read_bytes(),
            outcome(os.rename, root / "missing", root / "missing"),
        ]

    places.same(case)


def test_enotdir_where_a_component_is_a_file(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir()
        below = root / "f" / "x"
        return [
            outcome(os.stat, below),
            outcome(os.open, below, os.O_CREAT | os.O_WRONLY),
            outcome(os.mkdir, below),
            outcome(os.unlink, below),
            outcome(os.rmdir, below),
            outcome(os.symlink, "t", below),
            outcome(os.link, root / "d", below),
            outcome(os.rename, below, root / "y"),
            outcome(os.rename, root / "d", below),
            outcome(os.listdir, root / "f"),
            outcome(os.rmdir, root / "f"),
            outcome(os.rename, root / "d", root / "f"),
            outcome(os.rename, root / "f", root / "d" / "."),
        ]

    places.same(case)


def test_a_name_that_is_not_utf8_survives_remount_and_is_listed(tmp_path: Path) -> None:
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    names = [b"caf\xe9", "\U0010fe80".encode(), b"\xff"]
    with Mount(node, mountpoint) as mount:
        for name in names:
            with open(os.fsencode(mount.mountpoint) + b"/" + name, "wb") as file:
                file.write(name)
    with Mount(node, mountpoint) as mount:
        base = os.fsencode(mount.mountpoint)
        assert sorted(os.listdir(base)) == sorted(names)
        for name in names:
            with open(base + b"/" + name, "rb") as file:
                assert file.read() == name
    listed = blackmatch("ls", "-d", str(node), "tahoe:", errors="surrogateescape")
    assert listed.returncode == 0, listed.stderr
    assert sorted(os.fsencode(line) for line in listed.stdout.splitlines()) == sorted(names)
