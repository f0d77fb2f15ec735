"""Ordinary shell tools on a mounted grid of real storage-server processes, then a remount with an empty cache.

The tools do not know they work on a grid: cp -a, diff -r, tar, rsync, git, an editor's atomic save, >>,
truncate, dd conv=notrunc, sparse files, chmod, touch -d, ln, ln -s, mv, find and du. After unmounting and
wiping the cache, everything reads back identical from the grid, and `blackmatch get` gives the same bytes.
Copies off the mount and back (cp -a, tar --xattrs, rsync -X) carry the user's attributes but never a cap.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
import trio

from lafs_core.caps import DirectoryCap, parse_cap
from lafs_core.grid.directory import linker, modify_directory
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.servers import open_grid

from .mounting import MOUNT_MARKS, Mount, wipe_cache
from .storage_cluster import StorageCluster, blackmatch

pytestmark = MOUNT_MARKS


DIFF = "diff -r --no-dereference"  # symlinks compared as links: the tree has a dangling one


def sh(script: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{script!r} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_tree(root: Path, files: int, seed: int = 1) -> None:
    """Nested directories of small and a few larger files, with relative symlinks."""
    rng = random.Random(seed)
    for i in range(files):
        directory = root / f"d{i % 7}" / f"e{i % 13}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 40, 300, 4000, 70_000]) if i % 250 else 1_500_000
        (directory / f"f{i}.dat").write_bytes(rng.randbytes(size))
        if i % 100 == 0:
            (directory / f"link{i}").symlink_to(f"f{i}.dat")
    (root / "dangling").symlink_to("does/not/exist")


def test_shell_tools_on_the_mount(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    source = tmp_path / "source"
    make_tree(source, 2000)
    small = tmp_path / "small"  # for tar and rsync: what they do is the same on 150 files as on 2,000
    make_tree(small, 150, seed=2)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    with Mount(node, mountpoint):
        sh(f"cp -a {source} tree && {DIFF} {source} tree", mountpoint)
        sh(f"mkdir untar && tar -C {small} -cf archive.tar . && tar -C untar -xf archive.tar", mountpoint)
        sh(f"{DIFF} {small} untar && tar -C untar -cf {work}/back.tar . && mkdir {work}/back", mountpoint)
        sh(f"tar -C {work}/back -xf {work}/back.tar && {DIFF} {small} {work}/back", mountpoint)
        sh(f"rsync -a {small}/ synced/ && {DIFF} {small} synced", mountpoint)
        second = sh(f"rsync -a --itemize-changes {small}/ synced/", mountpoint)
        assert second.strip() == "", f"the second rsync copied again: {second[:500]}"
        sh(
            "git init -q repo && cd repo && git config user.email t@example.org && git config user.name t && "
            "echo one > a && git add a && git commit -qm one && echo two >> a && git commit -qam two && "
            'git checkout -q HEAD~1 -- a && test "$(cat a)" = one && git checkout -q HEAD -- a && '
            'test "$(git log --oneline | wc -l)" = 2 && test -z "$(git status --porcelain)"',
            mountpoint,
        )
        # An editor's atomic save: write a temporary file, fsync it, rename it over the original.
        sh(
            'echo old > doc.txt && python3 -c "import os; '
            "f = os.open('doc.txt.tmp', os.O_WRONLY | os.O_CREAT, 0o644); os.write(f, b'new contents\\n'); "
            "os.fsync(f); os.close(f); os.rename('doc.txt.tmp', 'doc.txt')\" && "
            "test \"$(cat doc.txt)\" = 'new contents' && test ! -e doc.txt.tmp",
            mountpoint,
        )
        sh("printf 'line1\\n' > log.txt && printf 'line2\\n' >> log.txt && test \"$(wc -l < log.txt)\" = 2", mountpoint)
        sh("seq 1 100000 > numbers && truncate -s 1000 numbers && test $(stat -c %s numbers) = 1000", mountpoint)
        sh(
            "truncate -s 5000 numbers && test $(stat -c %s numbers) = 5000 && "
            "test -z \"$(tail -c 4000 numbers | tr -d '\\0')\"",
            mountpoint,
        )
        sh("head -c 1000000 /dev/urandom > patched && cp patched " + str(work / "patched"), mountpoint)
        sh(
            f"printf 'XYZ' | dd of=patched bs=1 seek=500000 conv=notrunc status=none && "
            f"printf 'XYZ' | dd of={work}/patched bs=1 seek=500000 conv=notrunc status=none && "
            f"cmp patched {work}/patched",
            mountpoint,
        )
        sh(
            "dd if=/dev/zero of=sparse bs=1 count=1 seek=10000000 status=none && test $(stat -c %s sparse) = 10000001",
            mountpoint,
        )
        sh(
            "chmod 600 log.txt && test $(stat -c %a log.txt) = 600 && touch -d '2001-02-03 04:05:06' log.txt && "
            'test "$(date -r log.txt +%Y)" = 2001 && ln log.txt hard.txt && cmp log.txt hard.txt && '
            'ln -s log.txt soft && test "$(readlink soft)" = log.txt && test "$(cat soft)" = "$(cat log.txt)" && '
            "mkdir -p x/y && mv doc.txt x/y/ && mv x/y z && test -f z/doc.txt && test ! -e x/y",
            mountpoint,
        )
        found = sh("find tree -type f | wc -l", mountpoint)
        assert int(found) == 2000
        assert int(sh("find tree -type l | wc -l", mountpoint)) == 21
        usage = sh("du -sk tree | cut -f1", mountpoint)
        assert int(usage) > 1000
        expected = {
            path.relative_to(mountpoint): (path.read_bytes() if path.is_file() and not path.is_symlink() else None)
            for path in [mountpoint / "log.txt", mountpoint / "patched", mountpoint / "z" / "doc.txt"]
        }
    wipe_cache(node)
    with Mount(node, mountpoint):
        sh(
            f"{DIFF} {source} tree && {DIFF} {small} synced && {DIFF} {small} untar",
            mountpoint,
        )
        sh(
            f'cmp patched {work}/patched && test $(stat -c %a log.txt) = 600 && test "$(date -r log.txt +%Y)" = 2001',
            mountpoint,
        )
        sh('cd repo && git log --oneline | wc -l | grep -qx 2 && test -z "$(git status --porcelain)"', mountpoint)
        assert os.readlink(mountpoint / "soft") == "log.txt"
        for relative, content in expected.items():
            assert (mountpoint / relative).read_bytes() == content
    for relative, content in expected.items():
        assert blackmatch("get", "-d", str(node), f"tahoe:{relative}").stdout == content


def copied_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    """Every listed extended attribute under `root` (itself included), by relative path."""
    paths = [root, *sorted(root.rglob("*"))]
    return {
        str(path.relative_to(root)): {name: os.getxattr(path, name) for name in os.listxattr(path)} for path in paths
    }


def test_copies_of_the_mount_carry_no_caps(tmp_path: Path) -> None:
    """cp -a, tar --xattrs and rsync -X copy the attributes listxattr lists: the caps (a directory's is its write
    cap) must not be among them, while user.* attributes of the user's still go both ways. A copy made by an
    older version carries caps: setting one to the cap it already has is accepted (rsync -X back onto the same
    entries), other values are refused (EPERM) without failing cp -a or tar."""
    node, mountpoint, work = tmp_path / "node", tmp_path / "mnt", tmp_path / "work"
    work.mkdir()
    with Mount(node, mountpoint):
        tree = mountpoint / "tree"
        (tree / "sub").mkdir(parents=True)
        with open(tree / "sub" / "f", "wb") as file:
            file.write(os.urandom(1000))
            file.flush()
            os.fsync(file.fileno())  # on the grid: the file has a cap now, as the directories have
        os.setxattr(tree / "sub", "user.color", b"blue")
        os.setxattr(tree / "sub" / "f", "user.color", b"red")
        for path in (tree, tree / "sub", tree / "sub" / "f"):
            assert os.getxattr(path, "user.tahoe.cap").startswith(b"URI:")  # readable by name
        expected = {".": {}, "sub": {"user.color": b"blue"}, "sub/f": {"user.color": b"red"}}
        assert copied_xattrs(tree) == expected

        sh(f"cp -a tree {work}/cp && tar --xattrs -C tree -cf {work}/tree.tar .", mountpoint)
        sh(f"mkdir {work}/untar && tar --xattrs -C {work}/untar -xf {work}/tree.tar", mountpoint)
        sh(f"rsync -aX tree/ {work}/rsync/", mountpoint)
        assert b"tahoe" not in (work / "tree.tar").read_bytes()
        for copy in ("cp", "untar", "rsync"):
            assert copied_xattrs(work / copy) == expected, copy

        sh(f"cp -a {work}/cp cp && mkdir untar && tar --xattrs -C untar -xf {work}/tree.tar", mountpoint)
        sh(f"rsync -aX {work}/rsync/ rsync/ && {DIFF} tree cp && {DIFF} tree untar && {DIFF} tree rsync", mountpoint)
        for copy in ("cp", "untar", "rsync"):
            assert copied_xattrs(mountpoint / copy) == expected, copy
            assert os.getxattr(mountpoint / copy, "user.tahoe.cap") != os.getxattr(tree, "user.tahoe.cap")

        old = work / "old"  # as an older version copied it: the caps listed and copied
        sh(f"cp -a tree {old}", mountpoint)
        for path in (old, old / "sub", old / "sub" / "f"):
            os.setxattr(path, "user.tahoe.cap", os.getxattr(tree / path.relative_to(old), "user.tahoe.cap"))
        sh(f"rsync -aX {old}/ tree/", mountpoint)  # onto the same entries: the same caps, accepted
        with pytest.raises(OSError) as refused:
            os.setxattr(tree / "sub", "user.tahoe.cap", os.getxattr(tree / "sub" / "f", "user.tahoe.cap"))
        assert refused.value.errno == errno.EPERM
        sh(f"cp -a {old} old-cp && tar --xattrs -C {old} -cf {work}/old.tar .", mountpoint)
        sh(f"mkdir old-untar && tar --xattrs -C old-untar -xf {work}/old.tar", mountpoint)  # warns, succeeds
        sh(f"rsync -aX --filter='-x user.tahoe.*' {old}/ old-rsync/", mountpoint)  # README: how rsync -X skips them
        for copy in ("old-cp", "old-untar", "old-rsync"):
            assert copied_xattrs(mountpoint / copy) == expected, copy


def link_as_another_client(node: Path, directory: Path, name: str, target: Path) -> None:
    """Link the directory at `target` into the one at `directory` (both on the mount) as `name`, on the grid and
    behind the mount's back, as another client (a Tahoe client, `tahoe ln`) may: Tahoe allows loops."""

    async def link() -> None:
        grid = open_grid(NodeDirectory(node))
        try:
            parent, child = (parse_cap(os.getxattr(path, "user.tahoe.cap").decode()) for path in (directory, target))
            assert isinstance(parent, DirectoryCap)
            await modify_directory(grid, parent, linker(name, child, replace_files=False))
        finally:
            await grid.aclose()

    trio.run(link)


def find_following_links(directory: Path) -> tuple[int, list[str], list[str]]:
    """`find -L` of the directory: its status, and the lines it printed and complained, sorted (a local disk
    lists in its own order)."""
    run = subprocess.run(["find", "-L", directory.name], cwd=directory.parent, capture_output=True, text=True)
    return run.returncode, sorted(run.stdout.splitlines()), sorted(run.stderr.splitlines())


def test_a_directory_loop_made_elsewhere_is_a_symlink_on_the_mount(tmp_path: Path) -> None:
    """A directory that links one of its ancestors (or itself) makes an endless tree; the kernel refuses a
    directory inode found below itself (ELOOP), which failed `rm -rf`. The entry that closes the loop is shown as
    a symlink to the ancestor, so find, du, cp -a and rm -rf see a finite tree, as with a symlink loop on a local
    disk, and removing it (rm -rf does that first) breaks the loop on the grid."""
    node, mountpoint, local = tmp_path / "node", tmp_path / "mnt", tmp_path / "local"
    local.mkdir()
    with Mount(node, mountpoint, "--cache-timeout", "0"):
        roots = (mountpoint, local)  # the same tree, with the loops as symlinks on the local disk
        for root in roots:
            sh("mkdir -p d/e && echo data > d/e/f", root)
        sh("sync d/e/f", mountpoint)  # on the grid, for the other client to link to
        link_as_another_client(node, mountpoint / "d", "self", mountpoint / "d")
        link_as_another_client(node, mountpoint / "d" / "e", "up", mountpoint / "d")
        sh("ln -s . d/self && ln -s .. d/e/up", local)
        for root in roots:
            assert os.readlink(root / "d" / "self") == "." and os.readlink(root / "d" / "e" / "up") == ".."
            assert sh("find d | sort", root).split() == ["d", "d/e", "d/e/f", "d/e/up", "d/self"]
            assert (root / "d" / "self" / "e" / "up" / "e" / "f").read_text() == "data\n"
        sh(f"cp -a d {tmp_path}/copy && {DIFF} {local}/d {tmp_path}/copy", mountpoint)
        on_mount, on_disk = (find_following_links(root / "d") for root in roots)
        assert on_mount == on_disk and on_disk[0] == 1, on_mount  # find -L reports each loop, as it does on disk
        assert len(on_disk[2]) == 2 and all("File system loop detected" in line for line in on_disk[2])
        sh("rm -rf d && test ! -e d", mountpoint)
    with Mount(node, mountpoint):
        assert os.listdir(mountpoint) == []
