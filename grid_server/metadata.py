"""POSIX fields Tahoe has no place for, kept in a directory entry's metadata under the key `blackmatch`.

    {"tahoe": {...Tahoe's link times...},
     "blackmatch": {"mode": 420, "uid": 1000, "gid": 1000, "atime_ns": ..., "mtime_ns": ..., "ctime_ns": ...,
                    "symlink": true, "xattrs": {"user.name": "<base64>"},
                    "link": {"id": "<32 hex digits>", "count": 2}}}

Tahoe clients ignore the extra key and see ordinary files and directories; a symlink is a small file holding
its target. A special file has `"special": "fifo" | "socket" | "char" | "block"` (and a device its numbers,
`"device": [major, minor]`) and an empty LIT cap, so a Tahoe client sees an empty file. Entries written by Tahoe
have no `blackmatch` key: their mode defaults from the cap (read-only caps lose the write bits) and their times
from Tahoe's `linkmotime`/`linkcrtime`. An entry written before atime was kept (or without it) has its
atime equal to its mtime.

`link` marks the names of one file with several names (a hard link): every name's entry carries the same random
identity and the number of names the file had when a blackmatch mount last added or removed one of them. A
Tahoe client sees each name as an ordinary entry holding the file's cap.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lafs_core.caps import Cap, DirectoryCap, LiteralCap

POSIX_KEY = "blackmatch"
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
NS = 1_000_000_000
# The special files' kinds as the metadata names them, and their file types.
SPECIAL_TYPES = {"fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK, "char": stat.S_IFCHR, "block": stat.S_IFBLK}
SPECIAL_NAMES = {file_type: name for name, file_type in SPECIAL_TYPES.items()}
DEVICE_TYPES = (stat.S_IFCHR, stat.S_IFBLK)
SPECIAL_DESCRIPTIONS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass
class PosixFields:
    mode: int  # permission bits only (07777)
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    symlink: bool = False
    special: int = 0  # a special file's type (stat.S_IFIFO, S_IFSOCK, S_IFCHR or S_IFBLK), else 0
    rdev: int = 0  # a device's number as st_rdev gives it (os.makedev(major, minor)), else 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    link_id: str | None = None  # the identity the names of a hard-linked file share
    link_count: int = 1  # how many names it has, as last recorded (see filesystem.GridFilesystem.link)


def link_identity(metadata: Mapping[str, Any]) -> str | None:
    """The hard-link identity an entry's metadata carries, if any (the key of the table of linked inodes)."""
    ours = metadata.get(POSIX_KEY)
    link = ours.get("link") if isinstance(ours, dict) else None
    identity = link.get("id") if isinstance(link, dict) else None
    return identity if isinstance(identity, str) and identity else None


def change_time_ns(metadata: Mapping[str, Any]) -> int:
    """The entry's ctime, as `posix_fields` reads it: which of two entries of one file was changed later."""
    return _file_fields(metadata).ctime_ns


def link_count(metadata: Mapping[str, Any]) -> int:
    """How many names the entry says its file has (1 for a file that is not hard-linked)."""
    return _file_fields(metadata).link_count


def _file_fields(metadata: Mapping[str, Any]) -> PosixFields:
    """The fields of a file's entry where neither the defaults of ids nor of modes matter."""
    return posix_fields(dict(metadata), is_dir=False, writable=False, uid=0, gid=0)


def _tahoe_time(metadata: dict[str, Any], key: str) -> int | None:
    tahoe = metadata.get("tahoe")
    value = tahoe.get(key) if isinstance(tahoe, dict) else None
    return int(value * NS) if isinstance(value, int | float) else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _device(value: Any) -> int:
    """A device number from its stored `[major, minor]`; 0 for anything else, numbers beyond Linux's 12-bit
    majors and 20-bit minors included (FUSE carries st_rdev in 32 bits)."""
    if isinstance(value, list) and len(value) == 2:
        major, minor = _int(value[0], -1), _int(value[1], -1)
        if 0 <= major < 1 << 12 and 0 <= minor < 1 << 20:
            return os.makedev(major, minor)
    return 0


def posix_fields(metadata: dict[str, Any], *, is_dir: bool, writable: bool, uid: int, gid: int) -> PosixFields:
    """The POSIX view of an entry's metadata; anything missing or malformed gets its default."""
    ours = metadata.get(POSIX_KEY)
    ours = ours if isinstance(ours, dict) else {}
    default_mode = DEFAULT_DIR_MODE if is_dir else DEFAULT_FILE_MODE
    if not writable:
        default_mode &= ~0o222
    linked = _tahoe_time(metadata, "linkmotime") or 0
    mtime = _int(ours.get("mtime_ns"), linked)
    xattrs = {}
    raw_xattrs = ours.get("xattrs")
    if isinstance(raw_xattrs, dict):
        for name, value in raw_xattrs.items():
            try:
                xattrs[str(name)] = base64.b64decode(value, validate=True)
            except (TypeError, ValueError):
                continue
    special_name = ours.get("special")
    special = SPECIAL_TYPES.get(special_name, 0) if isinstance(special_name, str) else 0
    link = ours.get("link")
    link_id = link_identity(metadata)
    return PosixFields(
        mode=_int(ours.get("mode"), default_mode) & 0o7777,
        uid=_int(ours.get("uid"), uid),
        gid=_int(ours.get("gid"), gid),
        atime_ns=_int(ours.get("atime_ns"), mtime),
        mtime_ns=mtime,
        ctime_ns=_int(ours.get("ctime_ns"), mtime),
        symlink=ours.get("symlink") is True,
        special=special,
        rdev=_device(ours.get("device")) if special in DEVICE_TYPES else 0,
        xattrs=xattrs,
        link_id=link_id,
        link_count=max(1, _int(link.get("count"), 1)) if link_id is not None and isinstance(link, dict) else 1,
    )


def with_posix_fields(metadata: dict[str, Any], fields: PosixFields) -> dict[str, Any]:
    """A copy of `metadata` whose `blackmatch` key holds `fields`; other keys (Tahoe's, other tools') are kept."""
    ours: dict[str, Any] = {
        "mode": fields.mode & 0o7777,
        "uid": fields.uid,
        "gid": fields.gid,
        "atime_ns": fields.atime_ns,
        "mtime_ns": fields.mtime_ns,
        "ctime_ns": fields.ctime_ns,
    }
    if fields.symlink:
        ours["symlink"] = True
    if fields.special:
        ours["special"] = SPECIAL_NAMES[fields.special]
        if fields.special in DEVICE_TYPES:
            ours["device"] = [os.major(fields.rdev), os.minor(fields.rdev)]
    if fields.xattrs:
        ours["xattrs"] = {name: base64.b64encode(value).decode() for name, value in sorted(fields.xattrs.items())}
    if fields.link_id is not None:
        ours["link"] = {"id": fields.link_id, "count": fields.link_count}
    updated = dict(metadata)
    updated[POSIX_KEY] = ours
    return updated


def entry_type(cap: Cap, metadata: dict[str, Any]) -> int:
    """The file type (stat.S_IFMT) an entry shows: what the mount and `blackmatch ls -l` make of it.

    A special file's entry holds an empty LIT cap; one flagged special that holds content was overwritten by a
    client that kept the old metadata (Tahoe does, by default), so it is the regular file its content says."""
    if isinstance(cap, DirectoryCap):
        return stat.S_IFDIR
    ours = metadata.get(POSIX_KEY)
    if not isinstance(ours, dict):
        return stat.S_IFREG
    if ours.get("symlink") is True:
        return stat.S_IFLNK
    special = ours.get("special")
    if isinstance(special, str) and special in SPECIAL_TYPES and isinstance(cap, LiteralCap) and not cap.data:
        return SPECIAL_TYPES[special]
    return stat.S_IFREG
