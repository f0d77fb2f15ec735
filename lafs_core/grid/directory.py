"""Directories over a grid: read, change with retry on concurrent writers, create; resolve paths.

A change is a function from the current children to the new ones. It is applied to a fresh read of the
directory and published with test vectors; if another writer changed the directory in between, the directory
is read again and the function applied again, so the other writer's entries are kept, not overwritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..caps import Cap, ChkCap, DirectoryCap, LiteralCap, MutableReadCap, MutableWriteCap, UnknownCap, parse_cap
from ..dirnode import DirEntry, Metadata, child_entry, normalize, pack_directory, unpack_directory, update_metadata
from ..errors import LafsError
from ..mutable.keys import WriterKeys
from ..mutable.publish import UncoordinatedWriteError
from .download import read_immutable
from .grid import Grid
from .mutable_io import publish, retrieve, writer_keys
from .upload import bytes_chunks, upload_immutable

log = logging.getLogger("blackmatch.directory")

MODIFY_ATTEMPTS = 8

Children = dict[str, DirEntry]


class DirectoryError(LafsError):
    """A directory operation that cannot be done as asked; `errno_name` says which POSIX error fits."""

    errno_name = "EIO"


class NoSuchChildError(DirectoryError):
    errno_name = "ENOENT"


class ExistingChildError(DirectoryError):
    errno_name = "EEXIST"


class NotADirectoryCapError(DirectoryError):
    errno_name = "ENOTDIR"


class ReadOnlyDirectoryError(DirectoryError):
    errno_name = "EROFS"


class DirectoryLoopError(DirectoryError):
    """Linking a directory inside itself (or inside one of its own descendants) would make a cycle."""

    errno_name = "EINVAL"


def as_directory(cap: Cap, name: str | None = None) -> DirectoryCap:
    """`cap` as a directory; NotADirectoryCapError, naming it by `name` (a path) or its kind, if it is not one."""
    if not isinstance(cap, DirectoryCap):
        what = "a file, not" if isinstance(cap, ChkCap | LiteralCap | MutableWriteCap | MutableReadCap) else "not"
        raise NotADirectoryCapError(f"{name or cap.abbreviated()} is {what} a directory")
    return cap


async def read_directory(grid: Grid, cap: DirectoryCap) -> Children:
    """The children of a directory; child write caps are decrypted when `cap` is a write cap."""
    inner = cap.file_cap
    if isinstance(inner, LiteralCap | ChkCap):
        return unpack_directory(await read_immutable(grid, inner), None, mutable=False)
    if isinstance(inner, MutableWriteCap):
        data, _map, _version = await retrieve(grid, inner)
        return unpack_directory(data, inner.writekey)
    if isinstance(inner, MutableReadCap):
        data, _map, _version = await retrieve(grid, inner)
        return unpack_directory(data, None)
    raise NotADirectoryCapError("a verify cap cannot list a directory")


async def modify_directory(grid: Grid, cap: DirectoryCap, modify: Callable[[Children], Children | None]) -> Children:
    """Apply `modify` to the current children and publish the result; returns the children written.

    `modify` may raise a DirectoryError to refuse (the directory is left as it was) or return None to leave it
    unchanged. It may be called more than once if another writer changes the directory meanwhile.
    """
    inner = cap.file_cap
    if not isinstance(inner, MutableWriteCap):
        raise ReadOnlyDirectoryError("the directory is read-only: its cap cannot change it")
    for attempt in range(MODIFY_ATTEMPTS):
        data, servermap, version = await retrieve(grid, inner)
        children = unpack_directory(data, inner.writekey)
        changed = modify(dict(children))
        if changed is None:
            return children
        plaintext = pack_directory(changed, inner.writekey)
        keys = await writer_keys(grid, inner, servermap)
        try:
            await publish(grid, keys, plaintext, servermap, inner.kind, version.needed, version.total)
            return changed
        except UncoordinatedWriteError as exc:
            log.info("directory changed under us (attempt %d): %s; retrying", attempt + 1, exc)
    raise UncoordinatedWriteError(f"gave up after {MODIFY_ATTEMPTS} concurrent changes to the same directory")


def linker(
    name: str, cap: Cap, *, replace_files: bool, metadata: Metadata | None = None
) -> Callable[[Children], Children]:
    """A `modify_directory` change that links `cap` as `name`, keeping link times as Tahoe does; it never
    replaces a directory, nor a file unless `replace_files`."""

    def link(children: Children) -> Children:
        old = children.get(name)
        if old is not None and not replace_files:
            raise ExistingChildError(f"{name!r} already exists")
        if old is not None and isinstance(old.cap, DirectoryCap):
            raise ExistingChildError(f"{name!r} is a directory")
        children[name] = child_entry(cap, update_metadata(old.metadata if old else None, metadata, time.time()))
        return children

    return link


async def create_directory(
    grid: Grid, children: Children | None = None, file_format: str | None = None
) -> DirectoryCap:
    """A new mutable directory (SDMF unless `file_format` or the node says MDMF)."""
    file_format = (file_format or grid.mutable_format).upper()
    keys = WriterKeys.from_private_key(await grid.private_key())
    plaintext = pack_directory(children or {}, keys.writekey)
    await publish(grid, keys, plaintext, None, file_format)
    grid.remember_writer(keys)
    return DirectoryCap(keys.cap(file_format))


async def create_immutable_directory(grid: Grid, children: Children) -> DirectoryCap:
    """A DIR2-CHK (or DIR2-LIT) directory; every child must be immutable."""
    plaintext = pack_directory(children, None, deep_immutable=True)
    cap = await upload_immutable(grid, len(plaintext), bytes_chunks(plaintext))
    assert isinstance(cap, ChkCap | LiteralCap)
    return DirectoryCap(cap)


# --- paths -----------------------------------------------------------------------------------------------------
DEFAULT_ALIAS = "tahoe"


def split_path(path: str) -> list[str]:
    return [normalize(part) for part in path.split("/") if part]


def parse_location(text: str, aliases: dict[str, str]) -> tuple[Cap, list[str]]:
    """A Tahoe-style location: `alias:path`, a cap, or `CAP/path`; a bare path uses the `tahoe:` alias."""
    if text.startswith("URI:"):
        cap_text, _, rest = text.partition("/")
        cap = parse_cap(cap_text)
        if isinstance(cap, UnknownCap):
            raise LafsError(f"not a cap blackmatch can use: {cap_text[:20]}...")
        return cap, split_path(rest)
    alias, sep, rest = text.partition(":")
    if not sep or "/" in alias:
        alias, rest = DEFAULT_ALIAS, text
    if alias not in aliases:
        raise LafsError(f"unknown alias {alias!r} (known: {', '.join(sorted(aliases)) or 'none'})")
    cap = parse_cap(aliases[alias])
    if isinstance(cap, UnknownCap):
        raise LafsError(f"alias {alias!r} does not hold a usable cap")
    return cap, split_path(rest)


def shown_location(text: str) -> str:
    """A location as a message may show it: a cap in it cut to its kind (`URI:DIR2:.../docs`), caps being
    secrets."""
    if not text.startswith("URI:"):
        return text
    cap_text, sep, rest = text.partition("/")
    return f"URI:{cap_text.split(':')[1]}:...{sep}{rest}"


async def resolve(grid: Grid, root: Cap, components: list[str]) -> tuple[Cap, DirEntry | None]:
    """Walk from `root` through `components`; the object reached and its entry in its parent (None at root)."""
    cap, entry = root, None
    for depth, name in enumerate(components):
        children = await read_directory(grid, as_directory(cap, "/".join(components[:depth])))
        entry = children.get(name)
        if entry is None:
            raise NoSuchChildError(f"no {'/'.join(components[: depth + 1])!r}")
        cap = entry.cap
    return cap, entry


async def directory_path(grid: Grid, root: Cap, components: list[str], *, create: bool = False) -> list[DirectoryCap]:
    """The directories from `root` down through `components`, root first: the chain a path's last entry hangs on.

    With `create`, missing directories are made and linked, as Tahoe makes the intermediate directories of
    `tahoe put FILE a/b/c` and `tahoe mkdir a/b/c`. A directory another writer links meanwhile is used instead."""
    chain = [as_directory(root)]
    for depth, name in enumerate(components):
        path = "/".join(components[: depth + 1])
        entry = (await read_directory(grid, chain[-1])).get(name)
        if entry is not None:
            chain.append(as_directory(entry.cap, path))
        elif not create:
            raise NoSuchChildError(f"no {path!r}")
        else:
            chain.append(await _make_child_directory(grid, chain[-1], name, path))
    return chain


async def _make_child_directory(grid: Grid, parent: DirectoryCap, name: str, path: str) -> DirectoryCap:
    if parent.is_readonly:  # found out before the new directory is made, which would be left unlinked
        raise ReadOnlyDirectoryError(f"cannot make {path!r}: its parent directory is read-only")
    link = linker(name, await create_directory(grid), replace_files=False)
    children = await modify_directory(grid, parent, lambda children: None if name in children else link(children))
    return as_directory(children[name].cap, path)
