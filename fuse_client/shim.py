"""The pyfuse3 shim: each FUSE request becomes one call on a grid_server `Operations` object.

No filesystem logic lives here. The shim only converts between pyfuse3's types and the interface's:

- names arrive as bytes and become the interface's Tahoe names by grid_server/names.py (any bytes, losslessly);
  symlink targets and xattr names are decoded as strict UTF-8, an undecodable one refused with EINVAL without
  calling the operations object;
- `Attributes` become `pyfuse3.EntryAttributes`, with the attribute and entry timeouts the server chose;
- `FsError(errno, message)` becomes `FUSEError(errno)`, and an EIO's message (why the grid failed it) goes to the
  log; any other exception is logged (operation and traceback, never file data) and answered with EIO, so a bug
  can fail one request but never the mount;
- readdir keeps the lookup counts of server and kernel equal (see `readdir`);
- a getxattr of a name outside the user namespace is answered ENODATA without a call: the interface defines
  that no such attribute exists (operations.py, XATTR_NAMESPACE).

Caching choices: the kernel caches attributes and entries for the times the server puts in `Attributes`
(`attr_timeout`, `entry_timeout`). Open files use pyfuse3's `FileInfo` defaults: `keep_cache=False` (the kernel
drops the file's cached pages on open, so a file changed on the grid by someone else is read afresh; the server's
disk cache makes re-reads cheap) and `direct_io=False` (reads and writes go through the page cache, so mmap works
and a write is always taken whole). The writeback cache is off (`enable_writeback_cache = False`): the server,
not the kernel, owns sizes and times.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3

from grid_server.names import from_tahoe, to_tahoe
from grid_server.operations import (
    XATTR_NAMESPACE,
    AttrChanges,
    Attributes,
    Caller,
    DirectoryEntry,
    FsError,
    FsStats,
    Operations,
)

log = logging.getLogger("blackmatch.fuse")

# st_blksize: the I/O size the kernel and tools such as cp use. The interface has no field for it; 128 KiB is
# FUSE's usual largest single read or write request and a Tahoe segment size.
BLOCK_SIZE = 128 * 1024

_R = TypeVar("_R")
_P = ParamSpec("_P")


def _replies(
    handler: Callable[Concatenate[FuseShim, _P], Awaitable[_R]],
) -> Callable[Concatenate[FuseShim, _P], Coroutine[Any, Any, _R]]:
    """Turn whatever a handler raises into the reply pyfuse3 expects: FUSEError and nothing else."""
    operation = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: FuseShim, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:  # EIO is the grid failing (the other errors are the caller's): the log says why
            log.log(logging.WARNING if exc.errno == errno.EIO else logging.DEBUG, "%s: %s", operation, exc)
            raise pyfuse3.FUSEError(exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly; replying EIO", operation)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def decode_text(raw: bytes) -> str:
    """A symlink target or xattr name from the kernel as the interface's str: strict UTF-8, else EINVAL."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EINVAL) from None


def encode_text(text: str) -> bytes:
    return text.encode("utf-8")


def entry_attributes(attributes: Attributes) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attributes.inode  # 0 for a negative entry: the kernel caches the absence for entry_timeout
    entry.generation = attributes.generation
    entry.entry_timeout = attributes.entry_timeout
    entry.attr_timeout = attributes.attr_timeout
    entry.st_mode = attributes.mode
    entry.st_nlink = attributes.nlink
    entry.st_uid = attributes.uid
    entry.st_gid = attributes.gid
    entry.st_rdev = attributes.rdev
    entry.st_size = attributes.size
    entry.st_blksize = BLOCK_SIZE
    entry.st_blocks = (attributes.size + 511) // 512
    entry.st_atime_ns = attributes.atime_ns
    entry.st_mtime_ns = attributes.mtime_ns
    entry.st_ctime_ns = attributes.ctime_ns
    return entry


def attr_changes(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> AttrChanges:
    """The fields setattr is to change. pyfuse3 resolves UTIME_NOW to the current time itself, so times arrive
    explicit."""
    return AttrChanges(
        mode=attr.st_mode & 0o7777 if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        size=attr.st_size if fields.update_size else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
    )


def statvfs_data(stats: FsStats) -> pyfuse3.StatvfsData:
    data = pyfuse3.StatvfsData()
    data.f_bsize = stats.block_size
    data.f_frsize = stats.block_size
    data.f_blocks = stats.blocks
    data.f_bfree = stats.blocks_free
    data.f_bavail = stats.blocks_available
    data.f_files = stats.files
    data.f_ffree = stats.files_free
    data.f_favail = stats.files_free
    data.f_namemax = stats.name_max
    return data


def caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(uid=ctx.uid, gid=ctx.gid, umask=ctx.umask)


class FuseShim(pyfuse3.Operations):
    """pyfuse3 operations forwarding, one to one, to `operations` (in-process or an RPC client)."""

    # Only NFS export needs lookups of "." and ".."; without it the kernel resolves them itself.
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, operations: Operations) -> None:
        super().__init__()
        self.operations = operations
        # Handles the kernel has not released yet: see release_leftovers.
        self.open_files: set[int] = set()
        self.open_directories: set[int] = set()

    async def release_leftovers(self) -> int:
        """Release every handle the kernel never released; call once the FUSE session has ended.

        The kernel sends RELEASE in the background after the last close, and drops whatever requests are still
        queued when the connection ends (an unmount, pyfuse3.terminate), or never sends it for a file still open
        at unmount. The interface promises one release per open, so the shim makes up for the missing ones:
        otherwise the server would wait forever for writers that are gone. Returns how many it released."""
        files, directories = sorted(self.open_files), sorted(self.open_directories)
        self.open_files.clear()
        self.open_directories.clear()
        for fh, release in [(fh, self.operations.release) for fh in files] + [
            (fh, self.operations.releasedir) for fh in directories
        ]:
            try:
                await release(fh)
            except FsError as exc:
                log.debug("release of leftover handle %d: %s", fh, exc)
            except Exception:
                log.exception("release of leftover handle %d failed unexpectedly", fh)
        if files or directories:
            log.info("released %d files and %d directories left open at unmount", len(files), len(directories))
        return len(files) + len(directories)

    # --- inodes and attributes ---------------------------------------------------------------------------------
    @_replies
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.lookup(parent_inode, to_tahoe(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # pyfuse3: forget must not raise; there is no request to answer.
        await self._forget([(int(inode), int(count)) for inode, count in inode_list])

    async def _forget(self, counts: list[tuple[int, int]]) -> None:
        if not counts:
            return
        try:
            await self.operations.forget(counts)
        except FsError as exc:
            log.debug("forget: %s", exc)
        except Exception:
            log.exception("forget failed unexpectedly")

    @_replies
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.getattr(inode))

    @_replies
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.setattr(inode, attr_changes(attr, fields), fh))

    @_replies
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return encode_text(await self.operations.readlink(inode))

    # --- directory entries -------------------------------------------------------------------------------------
    @_replies
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.mkdir(parent_inode, to_tahoe(name), mode, caller(ctx)))

    @_replies
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text_name, text_target = to_tahoe(name), decode_text(target)
        return entry_attributes(await self.operations.symlink(parent_inode, text_name, text_target, caller(ctx)))

    @_replies
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.mknod(parent_inode, to_tahoe(name), mode, rdev, caller(ctx)))

    @_replies
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.operations.unlink(parent_inode, to_tahoe(name))

    @_replies
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.operations.rmdir(parent_inode, to_tahoe(name))

    @_replies
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old, new = to_tahoe(name_old), to_tahoe(name_new)
        await self.operations.rename(parent_inode_old, old, parent_inode_new, new, flags)

    @_replies
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self.operations.link(inode, new_parent_inode, to_tahoe(new_name)))

    # --- files -------------------------------------------------------------------------------------------------
    @_replies
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self.operations.open(inode, flags)
        self.open_files.add(fh)
        return pyfuse3.FileInfo(fh=fh)

    @_replies
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attributes = await self.operations.create(parent_inode, to_tahoe(name), mode, flags, caller(ctx))
        self.open_files.add(fh)
        return pyfuse3.FileInfo(fh=fh), entry_attributes(attributes)

    @_replies
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.operations.read(fh, off, size)

    @_replies
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.operations.write(fh, off, buf)

    @_replies
    async def flush(self, fh: int) -> None:
        await self.operations.flush(fh)

    @_replies
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.operations.fsync(fh, bool(datasync))

    @_replies
    async def release(self, fh: int) -> None:
        self.open_files.discard(fh)
        await self.operations.release(fh)

    # --- directories -------------------------------------------------------------------------------------------
    @_replies
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = await self.operations.opendir(inode)
        self.open_directories.add(fh)
        return fh

    @_replies
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Reply entries from `start_id` until the kernel's buffer is full or the listing ends.

        The server counted one lookup for every entry it returned; the kernel counts one only for an entry
        `readdir_reply` accepted (and none for "." and ".."). Whatever the kernel did not take is handed back
        with `forget`, so both counts stay equal.
        """
        offset = start_id
        replied = 0
        while True:
            try:
                entries = await self.operations.readdir(fh, offset)
            except Exception:
                if replied:
                    # The entries already in the buffer were counted by the kernel only if this reply succeeds:
                    # send them; the kernel asks again from `offset`, and the error comes back then.
                    log.debug("readdir: error after %d entries; replying those first", replied, exc_info=True)
                    return
                raise
            if not entries:
                return
            for index, entry in enumerate(entries):
                try:
                    accepted = pyfuse3.readdir_reply(
                        token, from_tahoe(entry.name), entry_attributes(entry.attributes), entry.next_offset
                    )
                except Exception:
                    await self._forget_entries(entries[index:])
                    if replied:
                        log.exception("readdir: cannot reply an entry; ending this batch early")
                        return
                    raise
                if not accepted:
                    await self._forget_entries(entries[index:])
                    return
                if entry.name in (".", ".."):
                    await self._forget_entries([entry])
                replied += 1
            if entries[-1].next_offset == offset:
                log.error("readdir: the server returned next_offset %d again; ending the listing", offset)
                return
            offset = entries[-1].next_offset

    async def _forget_entries(self, entries: Sequence[DirectoryEntry]) -> None:
        counts = Counter(entry.attributes.inode for entry in entries if entry.attributes.inode)
        await self._forget(sorted(counts.items()))

    @_replies
    async def releasedir(self, fh: int) -> None:
        self.open_directories.discard(fh)
        await self.operations.releasedir(fh)

    @_replies
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.operations.fsyncdir(fh, bool(datasync))

    @_replies
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_data(await self.operations.statfs())

    # --- extended attributes -----------------------------------------------------------------------------------
    @_replies
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        text = decode_text(name)
        if not text.startswith(XATTR_NAMESPACE):  # no such attribute anywhere (operations.py): no call
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self.operations.getxattr(inode, text)

    @_replies
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        # pyfuse3 does not pass the XATTR_CREATE / XATTR_REPLACE flags: it checks them itself with a getxattr
        # before calling this. So the flags here are always 0.
        await self.operations.setxattr(inode, decode_text(name), value, 0)

    @_replies
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [encode_text(name) for name in await self.operations.listxattr(inode)]

    @_replies
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.operations.removexattr(inode, decode_text(name))
