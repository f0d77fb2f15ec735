"""A blackmatch mount and Tahoe-LAFS 1.20.0 on the same directories: each sees, byte for byte, what the other wrote.

The mount is the real `blackmatch mount` command on the Tahoe client node's own directory, used as is (its
introducer cache, `tahoe.cfg` encoding k=3 happy=5 N=10, convergence secret and `tahoe:` alias), against real
Tahoe processes (`tahoe_grid.TahoeGrid`: introducer, five storage nodes, one client, all on 127.0.0.1).

1. A tree written through the mount (nested directories, an empty directory, files of 0 bytes, 30 bytes (a LIT
   cap), 5 KB and 2 MiB, a symlink) is what Tahoe lists: the same names, kinds and sizes in `tahoe ls` / `ls
   --json` / `?t=json`, the caps the mount reports in its `user.tahoe.cap` xattr, the encoding of the node's
   tahoe.cfg, and `tahoe get` returns the very bytes written; the symlink is a small file holding its target,
   flagged in the entry's `blackmatch` metadata. Checked while still mounted, right after `fsync` of the files and
   of every directory (which is what promises they are on the grid), and again after unmounting, which must also
   have published what was written after the last fsync.
2. What Tahoe writes into a mounted directory (`tahoe put` of immutable and mutable files, `tahoe mkdir`, an
   overwrite, an unlink) shows up in the mount within the `--cache-timeout` (2 s) plus a margin for a loaded
   2-core machine, polled, never slept on. Changes made through the mount in the directories Tahoe made (a partial
   overwrite, an append, a new file, a rename, a rewrite of Tahoe's mutable file, which keeps its cap) are what
   Tahoe then reads.
   Special files (a FIFO, a socket, devices) made on the mount are empty LIT files to Tahoe, their kind in the
   entry's `blackmatch` metadata.
3. The same holds for files the mount keeps a local copy of: one it wrote, one it patched, a mutable one it read
   (the copy must give way to the grid's newer version once nothing in it is unsaved).

Each `tahoe` command costs a second of start-up: each kind of check is done once with the CLI, the repeated ones
through the client's web API, which is what the CLI itself asks (`tahoe ls --json` prints the `?t=json` answer).
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import bootstrap
from lafs_core.grid.nodedir import NodeDirectory

from ..mounting import MOUNT_MARKS, Mount
from .tahoe_grid import TahoeGrid
from .test_interop import (
    HAPPY,
    LIT_MAX,
    NEEDED,
    TOTAL,
    MiB,
    data_of,
    tahoe_ls,
    tahoe_ls_json,
    tahoe_put,
    tahoe_text,
    tahoe_verify,
    web,
    web_json,
    web_put,
)

pytestmark = [pytest.mark.interop, *MOUNT_MARKS]

CACHE_TIMEOUT = 2.0
VISIBLE_WITHIN = CACHE_TIMEOUT + 8.0  # seconds: the cache timeout, plus a margin for a loaded machine


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TahoeGrid]:
    """Introducer, five Tahoe storage nodes and a Tahoe client (k=3 happy=5 N=10) whose `tahoe:` alias exists."""
    tahoe_exe = bootstrap.ensure_tahoe_venv()
    base = tmp_path_factory.mktemp("tahoe-grid")
    with TahoeGrid(base, tahoe_exe, num_storage=5, needed=NEEDED, happy=HAPPY, total=TOTAL) as running:
        running.tahoe("create-alias", "tahoe")
        yield running


def root_cap(grid: TahoeGrid) -> str:
    """The `tahoe:` alias of the client node: the directory the mount shows at its root."""
    cap = NodeDirectory(grid.client_dir).aliases()["tahoe"]
    assert cap.startswith("URI:DIR2:"), cap
    return cap


# --- the mount side -------------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or directory on the mount: returns once it (for a directory: its pending entries) is published."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def mount_cap(path: Path) -> str:
    """The cap of the entry at `path`, as the mount reports it."""
    return os.getxattr(path, "user.tahoe.cap").decode()


def digest(data: bytes) -> str:
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def read_digest(path: Path) -> str:
    return digest(path.read_bytes())


def wait_for(observe: Callable[[], Any], expected: Any, what: str, timeout: float = VISIBLE_WITHIN) -> float:
    """Poll `observe()` until it returns `expected` (an OSError counts as what it observed); the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            observed = observe()
        except OSError as exc:
            observed = exc
        if observed == expected:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: after {timeout} s the mount shows {observed!r}, not {expected!r}")
        time.sleep(0.1)


# --- the Tahoe side -------------------------------------------------------------------------------------------
class Symlink(str):
    """In an expected tree: a symlink with this target."""


DIR = None  # in an expected tree: a directory


def tahoe_tree(grid: TahoeGrid, path: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Relative path -> (node type, node info) of everything under PATH, as Tahoe lists it (`?t=json`)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}

    def walk(location: str, prefix: str) -> None:
        listing = web_json(grid, location)
        assert listing[0] == "dirnode", (location, listing)
        for name, (kind, info) in listing[1]["children"].items():
            found[prefix + name] = (kind, info)
            if kind == "dirnode":
                walk(f"{location}/{name}", f"{prefix}{name}/")

    walk(path, "")
    return found


def assert_tahoe_tree(grid: TahoeGrid, path: str, expected: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Tahoe lists under PATH exactly the expected names, kinds and sizes, and serves exactly the expected bytes."""
    tree = tahoe_tree(grid, path)
    assert sorted(tree) == sorted(expected)
    for name, want in expected.items():
        kind, info = tree[name]
        if want is DIR:
            assert kind == "dirnode" and info["rw_uri"].startswith("URI:DIR2:"), (name, tree[name])
            continue
        assert kind == "filenode" and info["mutable"] is False, (name, tree[name])
        content = want.encode() if isinstance(want, Symlink) else want
        assert info["size"] == len(content), (name, tree[name])
        assert (info["metadata"].get("blackmatch", {}).get("symlink") is True) == isinstance(want, Symlink), name
        cap = info["ro_uri"]
        if len(content) <= LIT_MAX:
            assert cap.startswith("URI:LIT:"), (name, cap)
        else:  # the node's tahoe.cfg encoding, which blackmatch took from the node directory
            assert cap.startswith("URI:CHK:") and cap.endswith(f":{NEEDED}:{TOTAL}:{len(content)}"), (name, cap)
        assert digest(web(grid, f"{path}/{name}")) == digest(content), name
    return tree


# --- 1. written on the mount, read by Tahoe -------------------------------------------------------------------
def test_tree_written_on_mount_is_what_tahoe_lists(grid: TahoeGrid, tmp_path: Path) -> None:
    root = root_cap(grid)
    expected: dict[str, Any] = {
        "empty.bin": data_of(0, "mount-tree-empty"),
        "lit.txt": data_of(30, "mount-tree-lit"),
        "docs": DIR,
        "docs/small.bin": data_of(5000, "mount-tree-small"),
        "docs/empty-dir": DIR,
        "docs/deep": DIR,
        "docs/deep/er": DIR,
        "docs/deep/er/big.bin": data_of(2 * MiB, "mount-tree-big"),
        "docs/deep/er/small-link": Symlink("../../small.bin"),
    }
    mountpoint = tmp_path / "mnt"
    with Mount(grid.client_dir, mountpoint):
        tree = mountpoint / "tree"
        tree.mkdir()
        for name, want in expected.items():
            if want is DIR:
                (tree / name).mkdir()
            elif isinstance(want, Symlink):
                (tree / name).symlink_to(want)
            else:
                write_file(tree / name, want)  # fsync'ed
        # deepest first: each directory's entries, then its own entry in its parent, are on the grid
        directories = [tree / name for name, want in expected.items() if want is DIR]
        for directory in [*sorted(directories, key=lambda p: -len(p.parts)), tree, mountpoint]:
            fsync_path(directory)
        assert (tree / "docs/deep/er/small-link").read_bytes() == expected["docs/small.bin"]  # the link resolves

        # Tahoe's CLI, once of each: ls, ls --json (the same answer as the web API) and get
        assert tahoe_ls(grid, "tahoe:tree") == ["docs", "empty.bin", "lit.txt"]
        assert tahoe_ls(grid, "tahoe:tree/docs/deep/er") == ["big.bin", "small-link"]
        assert tahoe_ls_json(grid, "tahoe:tree/docs") == web_json(grid, f"{root}/tree/docs")
        for name, want in expected.items():
            if want is not DIR:
                content = want.encode() if isinstance(want, Symlink) else want
                assert digest(grid.tahoe("get", f"tahoe:tree/{name}").stdout) == digest(content), name

        listed = assert_tahoe_tree(grid, f"{root}/tree", expected)
        # the caps the mount reports are the ones Tahoe lists (user.* xattrs do not exist on symlinks)
        assert mount_cap(tree) == web_json(grid, f"{root}/tree")[1]["rw_uri"]
        for name, want in expected.items():
            if not isinstance(want, Symlink):
                assert mount_cap(tree / name) == listed[name][1]["rw_uri" if want is DIR else "ro_uri"], name
        tahoe_verify(grid, listed["docs/deep/er/big.bin"][1]["ro_uri"])  # every share, every hash
        tahoe_verify(grid, listed["docs/deep"][1]["rw_uri"])

        # written after the last fsync: unmounting must publish it
        late = data_of(70_000, "mount-tree-late")
        write_file(tree / "docs/empty-dir/late.bin", late, sync=False)
        os.rename(tree / "lit.txt", tree / "docs/deep/lit-moved.txt")
        (tree / "empty.bin").unlink()

    expected["docs/empty-dir/late.bin"] = late
    expected["docs/deep/lit-moved.txt"] = expected.pop("lit.txt")
    del expected["empty.bin"]
    after = assert_tahoe_tree(grid, f"{root}/tree", expected)
    assert after["docs/deep/lit-moved.txt"][1]["ro_uri"] == listed["lit.txt"][1]["ro_uri"]  # moved, not rewritten
    assert after["docs/deep/er/big.bin"][1]["ro_uri"] == listed["docs/deep/er/big.bin"][1]["ro_uri"]
    assert grid.tahoe("get", "tahoe:tree/docs/empty-dir/late.bin").stdout == late


def test_special_files_made_on_mount_are_empty_files_to_tahoe(grid: TahoeGrid, tmp_path: Path) -> None:
    """A FIFO, a socket and devices made on the mount are what Tahoe lists as empty LIT files, their kind and
    device numbers in the entry's `blackmatch` metadata; and Tahoe's listing of them reads back as they were."""
    root = root_cap(grid)
    mountpoint = tmp_path / "mnt"
    devices = {"null": (stat.S_IFCHR, os.makedev(1, 3)), "loop": (stat.S_IFBLK, os.makedev(7, 0))}
    expected = {"fifo": ("fifo", None), "sock": ("socket", None), "null": ("char", [1, 3]), "loop": ("block", [7, 0])}
    with Mount(grid.client_dir, mountpoint):
        specials = mountpoint / "specials"
        specials.mkdir()
        os.mkfifo(specials / "fifo")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(specials / "sock"))
        for name, (kind, device) in devices.items():
            os.mknod(specials / name, kind | 0o600, device)
        for directory in (specials, mountpoint):
            fsync_path(directory)

        assert tahoe_ls(grid, "tahoe:specials") == sorted(expected)
        listing = web_json(grid, f"{root}/specials")[1]["children"]
        for name, (special, device) in expected.items():
            kind, info = listing[name]
            assert (kind, info["ro_uri"], info["size"]) == ("filenode", "URI:LIT:", 0), (name, listing[name])
            ours = info["metadata"]["blackmatch"]
            assert (ours["special"], ours.get("device")) == (special, device), (name, ours)
        assert grid.tahoe("get", "tahoe:specials/fifo").stdout == b""
    with Mount(grid.client_dir, mountpoint):
        kinds = {name: stat.S_IFMT(os.lstat(mountpoint / "specials" / name).st_mode) for name in expected}
        assert kinds == {"fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK, "null": stat.S_IFCHR, "loop": stat.S_IFBLK}
        assert os.lstat(mountpoint / "specials" / "loop").st_rdev == os.makedev(7, 0)


def test_hard_links_times_and_owners_made_on_mount_are_entries_tahoe_reads(grid: TahoeGrid, tmp_path: Path) -> None:
    """Two names of one file, written through one of them, are two entries holding the same (mutable) cap that
    Tahoe reads the new content from; owner, mode and times survive in the entries' metadata, and a new mount
    shows one inode with two links again."""
    root = root_cap(grid)
    mountpoint = tmp_path / "mnt"
    content = data_of(20_000, "hard-link-content")
    times = (1_600_000_000_123_456_789, 1_500_000_000_987_654_321)  # atime, mtime
    with Mount(grid.client_dir, mountpoint):
        (mountpoint / "a").mkdir()
        (mountpoint / "b").mkdir()
        (mountpoint / "a" / "file").write_bytes(b"first version")
        os.link(mountpoint / "a" / "file", mountpoint / "b" / "name2")
        with open(mountpoint / "b" / "name2", "wb") as f:
            f.write(content)
        os.chown(mountpoint / "a" / "file", 4101, 4201)
        os.chmod(mountpoint / "a" / "file", 0o640)
        os.utime(mountpoint / "a" / "file", ns=times)
        for path in (mountpoint / "a" / "file", mountpoint / "a", mountpoint / "b", mountpoint):
            fsync_path(path)

        entries = {name: web_json(grid, f"{root}/{name}")[1]["children"] for name in ("a", "b")}
        first, second = entries["a"]["file"], entries["b"]["name2"]
        assert first[0] == second[0] == "filenode"
        assert first[1]["ro_uri"] == second[1]["ro_uri"] and first[1]["ro_uri"].startswith("URI:SSK-RO:")
        assert grid.tahoe("get", "tahoe:a/file").stdout == content
        assert grid.tahoe("get", "tahoe:b/name2").stdout == content
        ours = first[1]["metadata"]["blackmatch"]
        assert (ours["uid"], ours["gid"], ours["mode"], ours["mtime_ns"]) == (4101, 4201, 0o640, times[1])
        assert ours["link"]["id"] == second[1]["metadata"]["blackmatch"]["link"]["id"]
    with Mount(grid.client_dir, mountpoint):
        one, two = os.stat(mountpoint / "a" / "file"), os.stat(mountpoint / "b" / "name2")
        assert one.st_ino == two.st_ino and one.st_nlink == two.st_nlink == 2
        assert (one.st_uid, one.st_gid, stat.S_IMODE(one.st_mode)) == (4101, 4201, 0o640)
        assert (one.st_atime_ns, one.st_mtime_ns) == times
        assert (mountpoint / "b" / "name2").read_bytes() == content


# --- 2. written by Tahoe, seen on the mount; changed on the mount, seen by Tahoe -------------------------------
def test_tahoe_writes_appear_in_mount_and_mount_changes_reach_tahoe(grid: TahoeGrid, tmp_path: Path) -> None:
    root = root_cap(grid)
    mountpoint = tmp_path / "mnt"
    with Mount(grid.client_dir, mountpoint, "--cache-timeout", str(CACHE_TIMEOUT)):
        inbox = mountpoint / "inbox"
        inbox.mkdir()
        fsync_path(mountpoint)
        assert tahoe_ls(grid, "tahoe:inbox") == []
        assert os.listdir(inbox) == []  # the mount now holds a fresh listing without what Tahoe adds next

        put_data = data_of(100_000, "tahoe-into-mount-put")
        put_cap = tahoe_put(grid, put_data, "tahoe:inbox/from-tahoe.bin")
        took = wait_for(lambda: os.listdir(inbox), ["from-tahoe.bin"], "tahoe put into a mounted directory")
        assert read_digest(inbox / "from-tahoe.bin") == digest(put_data)
        assert mount_cap(inbox / "from-tahoe.bin") == put_cap

        assert sorted(os.listdir(inbox)) == ["from-tahoe.bin"]  # refresh again before the next change
        made = tahoe_text(grid, "mkdir", "tahoe:inbox/tahoe-dir")
        assert made.startswith("URI:DIR2:")
        note = b"a short note from tahoe\n"
        mutable_data = data_of(3000, "tahoe-into-mount-mutable")
        mutable_cap = web_put(grid, f"{root}/inbox/tahoe-dir/mutable.bin", mutable_data, "?format=SDMF")
        assert mutable_cap.startswith("URI:SSK:")
        web_put(grid, f"{root}/inbox/tahoe-dir/note.txt", note)
        report = data_of(15_000, "tahoe-into-mount-report")  # only ever read on the mount
        web_put(grid, f"{root}/inbox/tahoe-dir/report.bin", report)
        took = max(
            took,
            wait_for(lambda: sorted(os.listdir(inbox)), ["from-tahoe.bin", "tahoe-dir"], "tahoe mkdir"),
        )
        tahoe_dir = inbox / "tahoe-dir"
        assert mount_cap(tahoe_dir) == made
        assert sorted(os.listdir(tahoe_dir)) == ["mutable.bin", "note.txt", "report.bin"]
        assert read_digest(tahoe_dir / "report.bin") == digest(report)
        assert (tahoe_dir / "note.txt").read_bytes() == note
        assert read_digest(tahoe_dir / "mutable.bin") == digest(mutable_data)

        # the mount changes Tahoe's files and directory
        patch = data_of(1234, "mount-patch")
        with open(inbox / "from-tahoe.bin", "r+b") as f:
            f.seek(40_000)
            f.write(patch)
            f.flush()
            os.fsync(f.fileno())
        patched = put_data[:40_000] + patch + put_data[40_000 + len(patch) :]
        with open(tahoe_dir / "note.txt", "ab") as f:
            f.write(b"and a line from the mount\n")
            f.flush()
            os.fsync(f.fileno())
        new_mutable = data_of(5000, "mount-rewrites-mutable")
        write_file(tahoe_dir / "mutable.bin", new_mutable)
        write_file(tahoe_dir / "from-mount.bin", data_of(9000, "mount-new-file"))
        os.rename(tahoe_dir / "note.txt", tahoe_dir / "note-renamed.txt")
        fsync_path(tahoe_dir)

        assert tahoe_ls(grid, "tahoe:inbox/tahoe-dir") == [
            "from-mount.bin",
            "mutable.bin",
            "note-renamed.txt",
            "report.bin",
        ]
        assert grid.tahoe("get", "tahoe:inbox/from-tahoe.bin").stdout == patched
        children = web_json(grid, f"{root}/inbox/tahoe-dir")[1]["children"]
        assert children["mutable.bin"][1]["rw_uri"] == mutable_cap  # rewritten in place: the same mutable file
        assert web(grid, mutable_cap) == new_mutable
        assert web(grid, f"{root}/inbox/tahoe-dir/note-renamed.txt") == note + b"and a line from the mount\n"
        assert web(grid, f"{root}/inbox/tahoe-dir/from-mount.bin") == data_of(9000, "mount-new-file")
        new_cap = web_json(grid, f"{root}/inbox/from-tahoe.bin")[1]["ro_uri"]
        assert new_cap != put_cap and mount_cap(inbox / "from-tahoe.bin") == new_cap

        # and Tahoe again, over what the mount published: an overwrite of a file the mount has read, and an unlink
        replaced = data_of(20_000, "tahoe-overwrites")
        tahoe_put(grid, replaced, "tahoe:inbox/tahoe-dir/report.bin")
        web(grid, f"{root}/inbox/tahoe-dir/note-renamed.txt", method="DELETE")
        took = max(
            took,
            wait_for(lambda: read_digest(tahoe_dir / "report.bin"), digest(replaced), "tahoe put over a read file"),
            wait_for(
                lambda: sorted(os.listdir(tahoe_dir)), ["from-mount.bin", "mutable.bin", "report.bin"], "tahoe unlink"
            ),
        )
        assert os.stat(tahoe_dir / "report.bin").st_size == len(replaced)
    print(f"Tahoe's changes were visible on the mount after at most {took:.1f} s")


def test_tahoe_replacing_files_the_mount_holds_a_copy_of(grid: TahoeGrid, tmp_path: Path) -> None:
    """Tahoe replaces a file the mount wrote, one it patched, and rewrites a mutable file the mount read: the mount
    must show the new contents within the cache timeout, as it does for a file it has only read (test above)."""
    root = root_cap(grid)
    mountpoint = tmp_path / "mnt"
    with Mount(grid.client_dir, mountpoint, "--cache-timeout", str(CACHE_TIMEOUT)):
        held = mountpoint / "held"
        held.mkdir()
        write_file(held / "written.bin", data_of(9000, "held-written"))
        patched_cap = web_put(grid, f"{root}/held/patched.bin", data_of(9000, "held-patched"))
        mutable_cap = web_put(grid, f"{root}/held/mutable.bin", data_of(3000, "held-mutable"), "?format=SDMF")
        wait_for(lambda: sorted(os.listdir(held)), ["mutable.bin", "patched.bin", "written.bin"], "tahoe puts")
        assert read_digest(held / "mutable.bin") == digest(data_of(3000, "held-mutable"))
        with open(held / "patched.bin", "r+b") as f:
            f.write(b"patched")
            f.flush()
            os.fsync(f.fileno())
        assert mount_cap(held / "patched.bin") != patched_cap  # the mount published its version

        new = {name: data_of(4000 + i, f"held-new-{name}") for i, name in enumerate(["written", "patched", "mutable"])}
        web_put(grid, f"{root}/held/written.bin", new["written"])
        web_put(grid, f"{root}/held/patched.bin", new["patched"])
        assert web_put(grid, mutable_cap, new["mutable"]) == mutable_cap
        wait_for(
            lambda: [read_digest(held / f"{name}.bin") for name in new],
            [digest(data) for data in new.values()],
            "[written on the mount, patched on the mount, mutable read on the mount] after Tahoe changed them",
        )
