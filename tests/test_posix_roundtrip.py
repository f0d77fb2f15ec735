"""Trees of every kind of file, copied onto the mount and back off it by tar and by rsync, come back as they do
through tmpfs: names, kinds, modes, owners, link counts, hard-link groups, device numbers, targets and contents."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .mounting import MOUNT_MARKS
from .posix_compare import Places, places_fixture, stat_fields
from .test_posix_special import make_specials

pytestmark = MOUNT_MARKS

places = places_fixture()

FIELDS = ("kind", "mode", "nlink", "uid", "gid", "size", "rdev")
COPIES = {  # how a tool copies directory {0} into directory {1}, keeping everything it can
    "tar": "tar --numeric-owner -cf - -C {0} . | tar --numeric-owner -xpf - -C {1}",
    "rsync": "rsync -aH --specials --devices --numeric-ids {0}/ {1}/",
}


@pytest.fixture(scope="module")
def source() -> Iterator[Path]:
    """The tree to copy, on the local disk: special files, hard links within and across directories, symlinks,
    sticky and set-group-ID directories, owners other than root."""
    base = Path(tempfile.mkdtemp(prefix="blackmatch-tree-"))
    tree = base / "tree"
    try:
        (tree / "specials").mkdir(parents=True)
        make_specials(tree / "specials")
        (tree / "docs").mkdir()
        (tree / "docs" / "a.txt").write_bytes(b"alpha\n" * 100)
        (tree / "docs" / "big.bin").write_bytes(os.urandom(200_000))
        os.link(tree / "docs" / "a.txt", tree / "docs" / "a-again.txt")
        (tree / "elsewhere").mkdir()
        os.link(tree / "docs" / "big.bin", tree / "elsewhere" / "big-link.bin")
        os.link(tree / "docs" / "big.bin", tree / "elsewhere" / "big-link2.bin")
        os.symlink("../docs/a.txt", tree / "elsewhere" / "to-a")
        os.symlink("x" * 100, tree / "elsewhere" / "long-dangling")
        (tree / "sticky").mkdir()
        os.chmod(tree / "sticky", 0o1777)
        (tree / "sticky" / "owned").write_bytes(b"someone's")
        os.chown(tree / "sticky" / "owned", 4101, 4201)
        (tree / "shared").mkdir()
        os.chown(tree / "shared", 0, 4201)
        os.chmod(tree / "shared", 0o2775)
        (tree / "shared" / "inner").mkdir()
        os.chmod(tree / "shared" / "inner", 0o2750)
        (tree / "shared" / "script").write_bytes(b"#!/bin/sh\n")
        os.chmod(tree / "shared" / "script", 0o4755)
        os.link(tree / "specials" / "fifo", tree / "shared" / "fifo-link")
        yield tree
    finally:
        shutil.rmtree(base, ignore_errors=True)


def describe(tree: Path) -> dict[str, Any]:
    """Everything a copy should keep, by path below `tree`, and the groups of paths that are one file."""
    paths = [Path(top) / name for top, dirs, files in os.walk(tree) for name in [*dirs, *files]]  # lists every dir
    entries: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted(paths):
        relative = str(path.relative_to(tree))
        fields = stat_fields(path, *FIELDS)
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode):
            fields["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(mode):
            fields["target"] = os.readlink(path)
        if fields["kind"] == "dir":
            fields.pop("size")  # a directory's size is the file system's own
        entries[relative] = fields
        inodes.setdefault(os.lstat(path).st_ino, []).append(relative)
    entries["(root)"] = stat_fields(tree, "mode", "uid", "gid")
    return {"entries": entries, "one file": sorted(group for group in inodes.values() if len(group) > 1)}


def round_trip(tool: str, source: Path, place: Path) -> dict[str, Any]:
    """Copy `source` into `place` and back out to a local directory with `tool`: what each copy said, and the
    descriptions of the copy on the place and of the one back."""
    on_place, back = place / "copy", Path(tempfile.mkdtemp(prefix="blackmatch-back-"))
    try:
        on_place.mkdir()
        copied_in, copied_out = (
            subprocess.run(COPIES[tool].format(*pair), shell=True, capture_output=True, text=True, check=False)
            for pair in ((source, on_place), (on_place, back))
        )
        return {
            "in": (copied_in.returncode, copied_in.stderr),
            "out": (copied_out.returncode, copied_out.stderr),
            "on the place": describe(on_place),
            "back": describe(back),
        }
    finally:
        shutil.rmtree(back, ignore_errors=True)


@pytest.mark.parametrize("tool", sorted(COPIES))
def test_a_tree_round_trips_through_the_place(places: Places, source: Path, tool: str) -> None:
    """The same on tmpfs and on the mount; and as faithful as the tool is from one local directory to another
    (tar leaves sockets out, and FIFOs unlinked), which is checked to keep nearly everything."""
    result = places.same(lambda root: round_trip(tool, source, root))
    local = Path(tempfile.mkdtemp(prefix="blackmatch-local-"))
    try:
        baseline = round_trip(tool, source, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    root_fields = result["back"]["entries"]["(root)"]  # the local directory the copy came back to: not copied
    assert {key: result[key] for key in ("in", "out")} == {key: baseline[key] for key in ("in", "out")}
    expected = baseline["back"]["entries"] | {"(root)": root_fields}
    differing = {
        path: (result["back"]["entries"].get(path), expected.get(path))
        for path in set(expected) | set(result["back"]["entries"])
        if result["back"]["entries"].get(path) != expected.get(path)
    }
    assert not differing, differing
    assert result["back"]["one file"] == baseline["back"]["one file"]
    assert result["out"] == (0, "") and result["in"][0] == 0
    lost = set(describe(source)["entries"]) - set(result["back"]["entries"])
    assert lost <= {"specials/sock"}, lost
