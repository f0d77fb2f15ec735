"""The filesystem operations interface: the one boundary between the FUSE shim and the grid server.

Everything that crosses it is JSON-able (ints, strs, bools, lists, dicts) or `bytes` for file data and extended
attribute values, so the same interface runs in one process (`--no-split`: the shim calls a GridFilesystem
directly) or over the RPC socket (split mode: the RPC client implements this same class). Failures are raised
as `FsError(errno, message)`; the shim turns them into the FUSE error reply, the RPC layer carries both fields.

Names are `str`, as Tahoe directory entries name them: the shim maps the kernel's bytes to them and back with
grid_server/names.py, which keeps names that are not UTF-8 losslessly. Times are integer nanoseconds since the
epoch.

Lookup counts follow the kernel's rules: every successful `create`, every entry `readdir` returns, and every
operation in ENTRY_OPERATIONS adds one to the returned inode's count; `forget` subtracts. An inode whose count
reaches zero and that no open handle holds may be dropped by the server; its number is not reused while it lives.
"""

from __future__ import annotations

import errno
from dataclasses import asdict, dataclass
from typing import Any, Protocol

ROOT_INODE = 1

# The operations that answer with one entry's Attributes and count a lookup of it (see the lookup count rules).
ENTRY_OPERATIONS = frozenset({"lookup", "mkdir", "mknod", "symlink", "link"})

# rename flags, as the kernel passes them (linux/fs.h)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# setxattr flags (linux/xattr.h)
XATTR_CREATE = 1
XATTR_REPLACE = 2

# Only extended attributes of the user namespace exist: setxattr of any other name is ENOTSUP and getxattr of one
# is ENODATA, in every implementation. So the shim answers such a getxattr itself: `ls -l` asks every entry for
# security.selinux, and a round trip to the grid server for a known answer would triple its time.
XATTR_NAMESPACE = "user."


class FsError(Exception):
    """A filesystem operation failed with `errno`; `message` says why, for the log (never a cap or secret)."""

    def __init__(self, errno_value: int, message: str = "") -> None:
        super().__init__(errno_value, message or errno.errorcode.get(errno_value, str(errno_value)))
        self.errno = errno_value
        self.message = message or errno.errorcode.get(errno_value, str(errno_value))

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.errno, self.errno)}] {self.message}"


@dataclass(frozen=True)
class Attributes:
    """What `stat` shows for an inode, plus how long the kernel may cache it (seconds)."""

    inode: int
    mode: int  # file type and permission bits, as st_mode
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0  # a device's number, as st_rdev (os.makedev(major, minor)); 0 for anything else
    generation: int = 0
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attributes:
        return cls(**data)


@dataclass(frozen=True)
class AttrChanges:
    """The fields of a setattr call that are to change (None: leave alone); times arrive explicit, "now" included."""

    mode: int | None = None  # permission bits only; the file type never changes
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttrChanges:
        return cls(**data)


@dataclass(frozen=True)
class DirectoryEntry:
    """One `readdir` result: the name, its attributes, and the offset that resumes the listing after it."""

    name: str
    attributes: Attributes
    next_offset: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "attributes": self.attributes.to_json(), "next_offset": self.next_offset}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DirectoryEntry:
        return cls(data["name"], Attributes.from_json(data["attributes"]), data["next_offset"])


@dataclass(frozen=True)
class FsStats:
    """statfs: sizes in blocks of `block_size` bytes; `available` is what the servers say they can still take."""

    block_size: int
    blocks: int
    blocks_free: int
    blocks_available: int
    files: int
    files_free: int
    name_max: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FsStats:
        return cls(**data)


@dataclass(frozen=True)
class Caller:
    """Who made a request (from the FUSE request context): owner of what it creates."""

    uid: int
    gid: int
    umask: int = 0o022


class Operations(Protocol):
    """The filesystem operations. Every method may raise FsError."""

    async def lookup(self, parent: int, name: str) -> Attributes: ...

    async def forget(self, counts: list[tuple[int, int]]) -> None: ...

    async def getattr(self, inode: int) -> Attributes: ...

    async def setattr(self, inode: int, changes: AttrChanges, fh: int | None) -> Attributes: ...

    async def readlink(self, inode: int) -> str: ...

    async def mkdir(self, parent: int, name: str, mode: int, caller: Caller) -> Attributes: ...

    async def symlink(self, parent: int, name: str, target: str, caller: Caller) -> Attributes: ...

    async def mknod(self, parent: int, name: str, mode: int, rdev: int, caller: Caller) -> Attributes: ...

    async def unlink(self, parent: int, name: str) -> None: ...

    async def rmdir(self, parent: int, name: str) -> None: ...

    async def rename(self, parent_old: int, name_old: str, parent_new: int, name_new: str, flags: int) -> None: ...

    async def link(self, inode: int, new_parent: int, new_name: str) -> Attributes: ...

    async def open(self, inode: int, flags: int) -> int: ...

    async def create(self, parent: int, name: str, mode: int, flags: int, caller: Caller) -> tuple[int, Attributes]: ...

    async def read(self, fh: int, offset: int, size: int) -> bytes: ...

    async def write(self, fh: int, offset: int, data: bytes) -> int: ...

    async def flush(self, fh: int) -> None: ...

    async def fsync(self, fh: int, datasync: bool) -> None: ...

    async def release(self, fh: int) -> None: ...

    async def opendir(self, inode: int) -> int: ...

    async def readdir(self, fh: int, offset: int) -> list[DirectoryEntry]: ...

    async def releasedir(self, fh: int) -> None: ...

    async def fsyncdir(self, fh: int, datasync: bool) -> None: ...

    async def statfs(self) -> FsStats: ...

    async def getxattr(self, inode: int, name: str) -> bytes: ...

    async def setxattr(self, inode: int, name: str, value: bytes, flags: int) -> None: ...

    async def listxattr(self, inode: int) -> list[str]: ...

    async def removexattr(self, inode: int, name: str) -> None: ...

    async def queue_state(self) -> dict[str, Any]:
        """What the write-back queue holds, JSON-able: `changes` pending, and for `uploads` and `publishes` how
        many are `waiting`, `in_flight`, and the `failing` ones (`item` path, last `error`, `attempts`, and
        `next_try_in` seconds, or "never ..." for an error that is not the grid's, which is not retried)."""
        ...

    async def finish_uploads(self, give_up_after: float | None) -> int:
        """Wait until the root's changes are on the grid, giving up once nothing has moved for `give_up_after`
        seconds (None: the filesystem's own limit); how many changes stay queued for the next start."""
        ...
