"""POSIX fields Tahoe has no place for, kept in a directory entry's metadata under the key `blackmatch`.

    {"tahoe": {...Tahoe's link times...},
     "blackmatch": {"mode": 420, "uid": 1000, "gid": 1000, "mtime_ns": ..., "ctime_ns": ...,
                    "symlink": true, "xattrs": {"user.name": "<base64>"}}}

Tahoe clients ignore the extra key and see ordinary files and directories; a symlink is a small file holding
its target. Entries written by Tahoe have no `blackmatch` key: their mode defaults from the cap (read-only caps
lose the write bits) and their times from Tahoe's `linkmotime`/`linkcrtime`.
"""

from __future__ import annotations

import base64
import stat
from dataclasses import dataclass, field
from typing import Any

POSIX_KEY = "blackmatch"
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
NS = 1_000_000_000


@dataclass
class PosixFields:
    mode: int  # permission bits only (07777)
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    symlink: bool = False
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _tahoe_time(metadata: dict[str, Any], key: str) -> int | None:
    tahoe = metadata.get("tahoe")
    value = tahoe.get(key) if isinstance(tahoe, dict) else None
    return int(value * NS) if isinstance(value, int | float) else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


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
    return PosixFields(
        mode=_int(ours.get("mode"), default_mode) & 0o7777,
        uid=_int(ours.get("uid"), uid),
        gid=_int(ours.get("gid"), gid),
        mtime_ns=mtime,
        ctime_ns=_int(ours.get("ctime_ns"), mtime),
        symlink=ours.get("symlink") is True,
        xattrs=xattrs,
    )


def with_posix_fields(metadata: dict[str, Any], fields: PosixFields) -> dict[str, Any]:
    """A copy of `metadata` whose `blackmatch` key holds `fields`; other keys (Tahoe's, other tools') are kept."""
    ours: dict[str, Any] = {
        "mode": fields.mode & 0o7777,
        "uid": fields.uid,
        "gid": fields.gid,
        "mtime_ns": fields.mtime_ns,
        "ctime_ns": fields.ctime_ns,
    }
    if fields.symlink:
        ours["symlink"] = True
    if fields.xattrs:
        ours["xattrs"] = {name: base64.b64encode(value).decode() for name, value in sorted(fields.xattrs.items())}
    updated = dict(metadata)
    updated[POSIX_KEY] = ours
    return updated


def file_type(is_dir: bool, fields: PosixFields) -> int:
    if is_dir:
        return stat.S_IFDIR
    return stat.S_IFLNK if fields.symlink else stat.S_IFREG
