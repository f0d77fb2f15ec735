"""Random operations on a mounted grid checked against an in-memory model: seeded, replayable, ≥ 10,000 operations.

Operations: writes at random offsets (holes included), appends, truncates, reads, mmap reads, renames of files (over
existing ones too, across directories) and of directories, unlinks, open-unlink-read (the open descriptor still
reads the old content), hard links (names of one file share its content in the model: a write through one is read
through all, and unlinks and renames take one name), mkdir and rmdir. Every read is compared with the model at
once. Checkpoints:

- fsync: a file is fsynced, and its `user.tahoe.cap` read with `blackmatch get` from the grid equals the model;
- remount: the mount is unmounted (which waits for the upload queue) and mounted again, every second time with the
  disk cache wiped; then the whole tree (names, sizes, contents) must equal the model.

Replay a failure with the seed it prints: `BLACKMATCH_MODEL_SEED=<seed> BLACKMATCH_MODEL_OPS=<n> pytest ...`.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .mounting import MOUNT_MARKS, Mount, wipe_cache
from .storage_cluster import StorageCluster, blackmatch

pytestmark = MOUNT_MARKS

SEED = int(os.environ.get("BLACKMATCH_MODEL_SEED", "20261121"))
OPERATIONS = int(os.environ.get("BLACKMATCH_MODEL_OPS", "10000"))
REMOUNT_EVERY = int(os.environ.get("BLACKMATCH_MODEL_REMOUNT_EVERY", "2500"))
FSYNC_CHECK_EVERY = 700
TOP_DIRECTORIES = ("d0", "d1", "d2")
FILE_NAMES = [f"f{i}" for i in range(10)]
SUBDIRECTORY_NAMES = ("s0", "s1")
MAX_FILE = 300 * 1024  # three 128 KiB segments: reads and writes cross segment boundaries


@dataclass
class Model:
    """What the tree must hold: files by relative path (the names of one hard-linked file share one bytearray), and
    directories."""

    files: dict[str, bytearray] = field(default_factory=dict)
    directories: set[str] = field(default_factory=lambda: set(TOP_DIRECTORIES))

    def write(self, path: str, offset: int, data: bytes) -> None:
        content = self.files.setdefault(path, bytearray())
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data

    def truncate(self, path: str, size: int) -> None:
        content = self.files[path]
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))

    def rename_directory(self, source: str, target: str) -> None:
        moved = {p: c for p, c in self.files.items() if p.startswith(source + "/")}
        for path, content in moved.items():
            del self.files[path]
            self.files[target + path[len(source) :]] = content
        self.directories.discard(source)
        self.directories.add(target)

    def children(self, directory: str) -> set[str]:
        prefix = directory + "/"
        below = [p[len(prefix) :] for p in [*self.files, *self.directories] if p.startswith(prefix)]
        return {name for name in below if "/" not in name}

    def names_of(self, path: str) -> int:
        """How many names the file at `path` has (its st_nlink)."""
        return sum(content is self.files[path] for content in self.files.values())


class Run:
    """The random operations on one mount at a time, with a log of what was done for the failure message."""

    def __init__(self, rng: random.Random, model: Model, node: Path) -> None:
        self.rng = rng
        self.model = model
        self.node = node
        self.root = Path()
        self.log: list[str] = []
        self.count = 0

    # --- choosing paths -----------------------------------------------------------------------------------------
    def some_directory(self) -> str:
        return self.rng.choice(sorted(self.model.directories))

    def some_file_path(self) -> str:
        return f"{self.some_directory()}/{self.rng.choice(FILE_NAMES)}"

    def existing_file(self) -> str | None:
        return self.rng.choice(sorted(self.model.files)) if self.model.files else None

    def data(self, limit: int) -> bytes:
        size = self.rng.choice([1, 7, 100, 4096, 20_000, 70_000, 140_000])
        return self.rng.randbytes(min(size, limit))

    # --- operations ---------------------------------------------------------------------------------------------
    def write(self) -> None:
        path = self.some_file_path()
        size = len(self.model.files.get(path, b""))
        offset = self.rng.randrange(0, min(size + 50_000, MAX_FILE))
        data = self.data(MAX_FILE - offset)
        self.log.append(f"write {path} @{offset} +{len(data)}")
        fd = os.open(self.root / path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        self.model.write(path, offset, data)

    def append(self) -> None:
        path = self.existing_file()
        if path is None or len(self.model.files[path]) > MAX_FILE - 10_000:
            return
        data = self.rng.randbytes(self.rng.randrange(1, 10_000))
        self.log.append(f"append {path} +{len(data)}")
        with open(self.root / path, "ab") as f:
            f.write(data)
        self.model.write(path, len(self.model.files[path]), data)

    def truncate(self) -> None:
        path = self.existing_file()
        if path is None:
            return
        size = self.rng.randrange(0, MAX_FILE)
        self.log.append(f"truncate {path} {size}")
        os.truncate(self.root / path, size)
        self.model.truncate(path, size)

    def read(self) -> None:
        path = self.existing_file()
        if path is None:
            return
        content = self.model.files[path]
        offset = self.rng.randrange(0, len(content) + 10)
        size = self.rng.choice([1, 4096, 65_536, 200_000])
        self.log.append(f"read {path} @{offset} {size}")
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            got = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        assert got == bytes(content[offset : offset + size]), f"read {path} @{offset}"

    def mmap_read(self) -> None:
        path = self.existing_file()
        if path is None or not self.model.files[path]:
            return
        content = self.model.files[path]
        self.log.append(f"mmap {path}")
        with open(self.root / path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            start = self.rng.randrange(0, len(content))
            assert len(mapped) == len(content), f"mmap size of {path}"
            assert mapped[start : start + 70_000] == bytes(content[start : start + 70_000]), f"mmap {path}"

    def rename(self) -> None:
        source = self.existing_file()
        if source is None:
            return
        target = self.some_file_path()
        self.log.append(f"rename {source} {target}")
        os.rename(self.root / source, self.root / target)
        if self.model.files.get(target) is not self.model.files[source]:  # (two names of one file: both stay)
            self.model.files[target] = self.model.files.pop(source)

    def link(self) -> None:
        source = self.existing_file()
        if source is None:
            return
        target = self.some_file_path()
        self.log.append(f"link {source} {target}")
        if target in self.model.files:
            with pytest.raises(OSError) as info:
                os.link(self.root / source, self.root / target)
            assert info.value.errno == errno.EEXIST
        else:
            os.link(self.root / source, self.root / target)
            self.model.files[target] = self.model.files[source]

    def unlink(self) -> None:
        path = self.existing_file()
        if path is None:
            return
        self.log.append(f"unlink {path}")
        os.unlink(self.root / path)
        del self.model.files[path]

    def open_unlink_read(self) -> None:
        path = self.existing_file()
        if path is None:
            return
        self.log.append(f"open-unlink-read {path}")
        content = bytes(self.model.files.pop(path))
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            os.unlink(self.root / path)
            assert not (self.root / path).exists()
            assert os.pread(fd, len(content) + 1, 0) == content, f"read after unlink of {path}"
        finally:
            os.close(fd)

    def mkdir(self) -> None:
        parent = self.rng.choice(TOP_DIRECTORIES)
        path = f"{parent}/{self.rng.choice(SUBDIRECTORY_NAMES)}"
        if path in self.model.directories:
            return
        self.log.append(f"mkdir {path}")
        os.mkdir(self.root / path)
        self.model.directories.add(path)

    def subdirectory(self) -> str | None:
        candidates = sorted(d for d in self.model.directories if d not in TOP_DIRECTORIES)
        return self.rng.choice(candidates) if candidates else None

    def rmdir(self) -> None:
        path = self.subdirectory()
        if path is None:
            return
        self.log.append(f"rmdir {path}")
        if self.model.children(path):
            with pytest.raises(OSError) as info:
                os.rmdir(self.root / path)
            assert info.value.errno == errno.ENOTEMPTY
        else:
            os.rmdir(self.root / path)
            self.model.directories.discard(path)

    def rename_directory(self) -> None:
        source = self.subdirectory()
        if source is None:
            return
        target = f"{self.rng.choice(TOP_DIRECTORIES)}/{self.rng.choice(SUBDIRECTORY_NAMES)}"
        if target in self.model.directories:
            return
        self.log.append(f"rename-dir {source} {target}")
        os.rename(self.root / source, self.root / target)
        self.model.rename_directory(source, target)

    def fsync_check(self) -> None:
        """fsync a file, then read it from the grid by its cap: it must be there, whole."""
        path = self.existing_file()
        if path is None:
            return
        self.log.append(f"fsync-check {path}")
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            os.fsync(fd)
            cap = os.getxattr(self.root / path, "user.tahoe.readcap").decode()
        finally:
            os.close(fd)
        got = blackmatch("get", "-d", str(self.node), cap).stdout
        assert got == bytes(self.model.files[path]), f"grid copy of {path} after fsync"

    def check_tree(self) -> None:
        for directory in sorted(self.model.directories):
            assert set(os.listdir(self.root / directory)) == self.model.children(directory), directory
        for path, content in sorted(self.model.files.items()):
            status = (self.root / path).stat()
            assert status.st_size == len(content), f"size of {path}"
            assert status.st_nlink == self.model.names_of(path), f"link count of {path}"
            assert (self.root / path).read_bytes() == bytes(content), f"content of {path}"

    def step(self) -> None:
        operations: list[tuple[Callable[[], None], int]] = [
            (self.write, 30),
            (self.append, 6),
            (self.truncate, 6),
            (self.read, 25),
            (self.mmap_read, 5),
            (self.rename, 8),
            (self.link, 4),
            (self.unlink, 5),
            (self.open_unlink_read, 3),
            (self.mkdir, 3),
            (self.rmdir, 2),
            (self.rename_directory, 2),
        ]
        operation = self.rng.choices([op for op, _ in operations], weights=[w for _, w in operations])[0]
        operation()
        self.count += 1


def test_random_operations_match_the_model(cluster: StorageCluster, tmp_path: Path) -> None:
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    mountpoint = tmp_path / "mnt"
    rng = random.Random(SEED)
    model = Model()
    run = Run(rng, model, node)
    remounts = 0
    try:
        while run.count < OPERATIONS:
            with Mount(node, mountpoint) as mount:
                run.root = mount.mountpoint / "model"
                if remounts == 0:
                    run.root.mkdir()
                    for directory in TOP_DIRECTORIES:
                        (run.root / directory).mkdir()
                run.check_tree()
                stop = min(run.count + REMOUNT_EVERY, OPERATIONS)
                while run.count < stop:
                    run.step()
                    if run.count % FSYNC_CHECK_EVERY == 0:
                        run.fsync_check()
                run.check_tree()
            remounts += 1
            if remounts % 2:
                wipe_cache(node)
        with Mount(node, mountpoint) as mount:
            run.root = mount.mountpoint / "model"
            run.check_tree()
    except BaseException:
        print(f"model test failed after {run.count} operations with seed {SEED}; last operations:")
        print("\n".join(run.log[-25:]))
        raise
    assert run.count == OPERATIONS and remounts == -(-OPERATIONS // REMOUNT_EVERY)
