"""How `ls` shows things: one name a line, `-l` lines, and `--json` in the shape of `tahoe ls --json`."""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from grid_server.metadata import DEVICE_TYPES, entry_type, posix_fields
from lafs_core.caps import (
    Cap,
    ChkCap,
    DirectoryCap,
    LiteralCap,
    MdmfReadCap,
    MdmfWriteCap,
    MutableReadCap,
    MutableWriteCap,
    UnknownCap,
)
from lafs_core.dirnode import DirEntry


def node_kind(cap: Cap) -> str:
    if isinstance(cap, DirectoryCap):
        return "dirnode"
    if isinstance(cap, UnknownCap):
        return "unknown"
    return "filenode"


def node_json(cap: Cap, entry: DirEntry | None = None) -> list[Any]:
    """`[kind, info]` as Tahoe's web API gives it for a child (or the target itself, without metadata)."""
    kind = node_kind(cap)
    info: dict[str, Any] = {}
    if isinstance(cap, UnknownCap):
        if entry is not None:
            if entry.rw_uri:
                info["rw_uri"] = entry.rw_uri
            if entry.ro_uri:
                info["ro_uri"] = entry.ro_uri
        info["metadata"] = entry.metadata if entry else {}
        return [kind, info]
    inner = cap.file_cap if isinstance(cap, DirectoryCap) else cap
    info["mutable"] = cap.is_mutable
    if kind == "filenode":
        if isinstance(inner, MutableWriteCap | MutableReadCap):
            info["format"] = "MDMF" if isinstance(inner, MdmfWriteCap | MdmfReadCap) else "SDMF"
        else:
            info["format"] = "CHK"
            info["size"] = inner.size if isinstance(inner, ChkCap | LiteralCap) else None
    if entry is not None:
        info["metadata"] = entry.metadata
    if not cap.is_readonly:
        info["rw_uri"] = str(cap)
    info["ro_uri"] = str(cap.readonly())
    verifier = cap.verifier()
    if verifier is not None:
        info["verify_uri"] = str(verifier)
    return [kind, info]


def long_line(name: str, cap: Cap, entry: DirEntry) -> str:
    """`tahoe ls -l` style: type and permissions, size, link time, name. The type is what the mount shows (a
    symlink `l`, a FIFO `p`, a socket `s`, a device `c` or `b`, with "major, minor" for its size, as `ls -l`
    gives them); Tahoe's own `ls -l` shows these as empty files."""
    kind = node_kind(cap)
    file_type = entry_type(cap, entry.metadata)
    mode = "?" if kind == "unknown" else stat.filemode(file_type)[0]
    mode += "r" + ("w" if not cap.is_readonly else "-") + ("x" if kind == "dirnode" else "-")
    size = "-"
    if file_type in DEVICE_TYPES:
        rdev = posix_fields(entry.metadata, is_dir=False, writable=True, uid=0, gid=0).rdev
        size = f"{os.major(rdev)}, {os.minor(rdev)}"
    elif isinstance(cap, ChkCap | LiteralCap):
        size = str(cap.size)
    linked = (
        entry.metadata.get("tahoe", {}).get("linkmotime") if isinstance(entry.metadata.get("tahoe"), dict) else None
    )
    when = time.strftime("%b %d %H:%M", time.localtime(linked)) if isinstance(linked, int | float) else "-"
    return f"{mode} {size:>12} {when:>12} {name}"
