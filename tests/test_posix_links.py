"""Hard links on the mount, each case run on tmpfs too: one inode under every name, as Linux has it.

Then what tmpfs cannot show: the names survive an unmount, a wiped cache and a remount as one inode, and another
mount of the same root sees a write made through a link.
"""

from __future__ import annotations

import os
from pathlib import Path

from .mounting import MOUNT_MARKS, Mount, wipe_cache
from .posix_compare import Places, outcome, places_fixture, stat_fields
from .storage_cluster import StorageCluster

pytestmark = MOUNT_MARKS

places = places_fixture()

LINK_FIELDS = ("kind", "mode", "nlink", "size")


def names_of_one_file(*paths: Path) -> object:
    """The stat fields of each name, and whether they are all one inode."""
    return [stat_fields(path, *LINK_FIELDS) for path in paths], len({os.lstat(path).st_ino for path in paths}) == 1


def uploaded(path: Path, data: bytes) -> None:
    """Write a file and fsync it: on the mount, its content is then on the grid as an immutable file."""
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_two_names_are_one_inode(places: Places) -> None:
    def case(root: Path) -> object:
        uploaded(root / "f", b"content")
        os.link(root / "f", root / "g")
        return names_of_one_file(root / "f", root / "g"), sorted(os.listdir(root))

    places.same(case)


def test_a_write_through_one_name_is_read_through_the_other(places: Places) -> None:
    def case(root: Path) -> object:
        uploaded(root / "f", b"old")
        os.link(root / "f", root / "g")
        with open(root / "g", "ab") as g:
            g.write(b" more")
            os.fsync(g.fileno())
        first = (root / "f").read_bytes()
        with open(root / "f", "r+b") as f:
            f.write(b"NEW")
        return first, (root / "g").read_bytes(), names_of_one_file(root / "f", root / "g")

    places.same(case)


def test_names_in_different_directories(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "a").mkdir()
        (root / "b").mkdir()
        uploaded(root / "a" / "f", b"x" * 5000)
        os.link(root / "a" / "f", root / "b" / "g")
        os.link(root / "b" / "g", root / "b" / "h")
        os.truncate(root / "b" / "h", 10)
        os.chmod(root / "b" / "g", 0o600)
        return names_of_one_file(root / "a" / "f", root / "b" / "g", root / "b" / "h"), (root / "a" / "f").read_bytes()

    places.same(case)


def test_unlink_of_one_name(places: Places) -> None:
    def case(root: Path) -> object:
        uploaded(root / "f", b"kept")
        os.link(root / "f", root / "g")
        os.link(root / "f", root / "h")
        os.unlink(root / "f")
        two = names_of_one_file(root / "g", root / "h")
        os.unlink(root / "h")
        return two, stat_fields(root / "g", *LINK_FIELDS), (root / "g").read_bytes(), sorted(os.listdir(root))

    places.same(case)


def test_rename_over_another_name_of_the_same_file(places: Places) -> None:
    def case(root: Path) -> object:
        uploaded(root / "f", b"one file")
        os.link(root / "f", root / "g")
        renamed = outcome(os.rename, root / "f", root / "g")
        return renamed, sorted(os.listdir(root)), names_of_one_file(root / "f", root / "g")

    places.same(case)


def test_links_of_symlinks_and_refused_links(places: Places) -> None:
    def case(root: Path) -> object:
        os.symlink("target", root / "s")
        os.link(root / "s", root / "t", follow_symlinks=False)
        (root / "d").mkdir()
        (root / "f").write_bytes(b"")
        return [
            names_of_one_file(root / "s", root / "t"),
            os.readlink(root / "t"),
            outcome(os.link, root / "d", root / "e"),
            outcome(os.link, root / "f", root / "s"),
            outcome(os.link, root / "missing", root / "m"),
        ]

    places.same(case)


def test_links_survive_remount_and_another_mount_sees_writes(cluster: StorageCluster, tmp_path: Path) -> None:
    """Made on one mount, the names are one inode after an unmount, a wiped cache and a remount; a write through one
    name there is read through the other by a mount of the same root from another node of the grid."""
    node, mountpoint = cluster.create_node(tmp_path / "node", 3, 5, 10), tmp_path / "mnt"
    other_node = cluster.create_node(tmp_path / "other", 3, 5, 10)
    with Mount(node, mountpoint) as mount:
        (mount.mountpoint / "a").mkdir()
        (mount.mountpoint / "b").mkdir()
        uploaded(mount.mountpoint / "a" / "f", b"first")
        os.link(mount.mountpoint / "a" / "f", mount.mountpoint / "b" / "g")
    wipe_cache(node)
    with Mount(node, mountpoint) as mount:
        f, g = mount.mountpoint / "a" / "f", mount.mountpoint / "b" / "g"
        assert names_of_one_file(f, g) == ([stat_fields(f, *LINK_FIELDS)] * 2, True)
        assert stat_fields(f, "nlink") == {"nlink": 2}
        with open(g, "ab") as out:
            out.write(b" and second")
        assert f.read_bytes() == b"first and second"
    wipe_cache(node)
    with Mount(node, mountpoint) as mount:
        f = mount.mountpoint / "a" / "f"
        assert f.read_bytes() == b"first and second" and stat_fields(f, "nlink") == {"nlink": 2}
        with open(f, "ab") as out:
            out.write(b", third")
            os.fsync(out.fileno())
        root_cap = mount.node.aliases()["tahoe"]
        with Mount(other_node, tmp_path / "other-mnt", "--root-cap", root_cap) as other:
            assert (other.mountpoint / "b" / "g").read_bytes() == b"first and second, third"


def test_names_never_looked_up_follow_the_file(cluster: StorageCluster, tmp_path: Path) -> None:
    """Three names in two directories. A remount writes through a/f alone; a mount of the same root from another
    node (which never saw the write) reads the new content through b/g and removes it; after a remount with a wiped
    cache, a/f and b/h, which the removing mount never looked up, count two names."""
    node, mountpoint = cluster.create_node(tmp_path / "node", 3, 5, 10), tmp_path / "mnt"
    other_node = cluster.create_node(tmp_path / "other", 3, 5, 10)
    with Mount(node, mountpoint) as mount:
        (mount.mountpoint / "a").mkdir()
        (mount.mountpoint / "b").mkdir()
        uploaded(mount.mountpoint / "a" / "f", b"first")
        os.link(mount.mountpoint / "a" / "f", mount.mountpoint / "b" / "g")
        os.link(mount.mountpoint / "a" / "f", mount.mountpoint / "b" / "h")
        root_cap = mount.node.aliases()["tahoe"]
    wipe_cache(node)
    with Mount(node, mountpoint) as mount, open(mount.mountpoint / "a" / "f", "ab") as out:
        out.write(b" and second")
    with Mount(other_node, tmp_path / "other-mnt", "--root-cap", root_cap) as other:
        g = other.mountpoint / "b" / "g"
        assert g.read_bytes() == b"first and second" and stat_fields(g, "nlink") == {"nlink": 3}
        os.unlink(g)
    wipe_cache(node)
    with Mount(node, mountpoint) as mount:
        f, h = mount.mountpoint / "a" / "f", mount.mountpoint / "b" / "h"
        assert stat_fields(f, "nlink") == {"nlink": 2} and stat_fields(h, "nlink") == {"nlink": 2}
        assert h.read_bytes() == b"first and second" and names_of_one_file(f, h)[1]
