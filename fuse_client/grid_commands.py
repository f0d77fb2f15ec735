"""Scripting commands on a grid, in the manner of Tahoe's CLI: create-node, create-alias, add-alias, list-aliases,
put, get, ls, mkdir, ln, mv, rm.

Locations are Tahoe-style: `alias:path`, a cap, or `CAP/path`; a bare path is relative to the `tahoe:` alias. Path
components are names as a mount shows them (grid_server/names.py): bytes that are not UTF-8 are kept as the mount
keeps them, `ls` prints them back as those bytes, and no command creates a name a mount could not show.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

import trio

from grid_server.metadata import SPECIAL_DESCRIPTIONS, entry_type
from grid_server.names import NAME_MAX, from_tahoe, showable, to_tahoe, too_long
from lafs_core.caps import (
    Cap,
    ChkCap,
    DirectoryCap,
    LiteralCap,
    MutableReadCap,
    MutableWriteCap,
    parse_cap,
    parse_known_cap,
)
from lafs_core.dirnode import DirEntry, child_entry
from lafs_core.errors import LafsError
from lafs_core.grid.directory import (
    DEFAULT_ALIAS,
    Children,
    DirectoryLoopError,
    ExistingChildError,
    NoSuchChildError,
    NotADirectoryCapError,
    as_directory,
    create_directory,
    directory_path,
    linker,
    modify_directory,
    parse_location,
    read_directory,
    resolve,
    shown_location,
)
from lafs_core.grid.download import ImmutableFile
from lafs_core.grid.grid import Grid
from lafs_core.grid.mutable_io import create_mutable, overwrite, retrieve
from lafs_core.grid.nodedir import EncodingConfig, NodeDirectory, create_node_directory
from lafs_core.grid.servers import open_grid, open_servers
from lafs_core.grid.upload import file_chunks, upload_immutable

from .listing import long_line, node_json
from .node_options import add_node_directory_option, existing_node

T = TypeVar("T")


def add_grid_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    create = commands.add_parser("create-node", help="make a node directory (with an embedded grid unless told)")
    create.add_argument(
        "node_dir", metavar="NODEDIR", type=Path, help="the directory to make (not a node directory yet)"
    )
    create.add_argument(
        "--local-grid",
        type=int,
        metavar="N",
        help="embedded grid of N local share stores (default: --total of them, when no server is named)",
    )
    create.add_argument(
        "--servers",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="servers.yaml-format file of servers to use (repeatable)",
    )
    create.add_argument(
        "--local-server",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory holding a shares/ tree to use as a server (repeatable)",
    )
    create.add_argument("--needed", type=int, default=3, metavar="K", help="shares needed to read a file (default 3)")
    create.add_argument(
        "--happy",
        type=int,
        default=None,
        metavar="H",
        help="servers that must hold distinct shares for an upload to succeed (default 7, or N if smaller)",
    )
    create.add_argument("--total", type=int, default=10, metavar="N", help="shares made of each file (default 10)")
    create.set_defaults(handler=create_node_command)

    create_alias = commands.add_parser("create-alias", help="make a new directory on the grid and an alias for it")
    add_node_directory_option(create_alias)
    create_alias.add_argument("alias", metavar="ALIAS", help="the new alias's name")
    create_alias.set_defaults(handler=grid_handler(create_alias_command))

    add_alias = commands.add_parser("add-alias", help="name an existing directory cap as an alias")
    add_node_directory_option(add_alias)
    add_alias.add_argument("alias", metavar="ALIAS", help="the new alias's name")
    add_alias.add_argument("cap", metavar="DIRCAP", help="a directory cap (URI:DIR2:...)")
    add_alias.set_defaults(handler=add_alias_command)

    list_aliases = commands.add_parser("list-aliases", help="show the aliases and their directory caps")
    add_node_directory_option(list_aliases)
    list_aliases.add_argument("--readonly-uri", action="store_true", help="show read-only caps")
    list_aliases.add_argument("--json", action="store_true", help="JSON as `tahoe list-aliases --json` prints it")
    list_aliases.set_defaults(handler=list_aliases_command)

    put = commands.add_parser("put", help="upload a file; prints its cap")
    add_node_directory_option(put)
    put.add_argument("local", metavar="LOCAL", help="local file, or - for standard input")
    put.add_argument("target", metavar="TARGET", nargs="?", help="where to link it (alias:path, CAP/path)")
    put.add_argument("--mutable", action="store_true", help="upload as a mutable file")
    put.set_defaults(handler=grid_handler(put_command))

    get = commands.add_parser("get", help="download a file (to standard output without LOCAL)")
    add_node_directory_option(get)
    get.add_argument("source", metavar="SOURCE", help="alias:path, a cap, or CAP/path")
    get.add_argument("local", metavar="LOCAL", nargs="?", help="local file to write (replaced once complete)")
    get.set_defaults(handler=grid_handler(get_command))

    ls = commands.add_parser("ls", help="list a directory")
    add_node_directory_option(ls)
    ls.add_argument("path", metavar="PATH", nargs="?", default="tahoe:", help="alias:path or a cap (default tahoe:)")
    ls.add_argument("-l", "--long", action="store_true", help="type, size, link time")
    ls.add_argument("--json", action="store_true", help="JSON as `tahoe ls --json` prints it")
    ls.set_defaults(handler=grid_handler(ls_command))

    mkdir = commands.add_parser("mkdir", help="make a directory (unlinked, cap printed, without PATH)")
    add_node_directory_option(mkdir)
    mkdir.add_argument("path", metavar="PATH", nargs="?", help="alias:path of the new directory")
    mkdir.add_argument("--format", choices=["sdmf", "mdmf"], help="mutable format (default: the node's)")
    mkdir.set_defaults(handler=grid_handler(mkdir_command))

    for name, handler, helptext in (
        ("ln", ln_command, "link an object under another name as well"),
        ("mv", mv_command, "move (relink) an object"),
    ):
        sub = commands.add_parser(name, help=helptext)
        add_node_directory_option(sub)
        sub.add_argument("source", metavar="FROM", help="alias:path or CAP/path")
        sub.add_argument("target", metavar="TO", help="alias:path or CAP/path")
        sub.set_defaults(handler=grid_handler(handler))

    rm = commands.add_parser("rm", help="unlink an object from its directory")
    add_node_directory_option(rm)
    rm.add_argument("path", metavar="PATH", help="alias:path or CAP/path")
    rm.set_defaults(handler=grid_handler(rm_command))


# --- plumbing --------------------------------------------------------------------------------------------------
def grid_handler(
    command: Callable[[Grid, NodeDirectory, argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Wrap an async command: open the node's grid, run it, close the connections."""

    def run(args: argparse.Namespace) -> int:
        node = existing_node(args)
        return trio.run(_on_grid, node, lambda grid: command(grid, node, args))

    return run


async def _on_grid(node: NodeDirectory, work: Callable[[Grid], Awaitable[T]]) -> T:
    """`work` done on the node's grid, whose connections are closed after."""
    grid = open_grid(node)
    if not grid.servers:
        raise LafsError(f"{node.path} configures no storage servers blackmatch can use")
    try:
        return await work(grid)
    finally:
        await grid.aclose()


def location_of(text: str, node: NodeDirectory) -> tuple[Cap, list[str]]:
    """The root and path components of a location, each component the Tahoe name a mount keeps it under: a name
    typed as bytes that are not UTF-8 reaches the entry the mount made of them."""
    root, components = parse_location(text, node.aliases())
    return root, [to_tahoe(os.fsencode(component)) for component in components]


def _creatable(components: Sequence[str], location: str) -> None:
    """Refuse to create an entry a mount could not show: a mount gives ENAMETOOLONG for every longer name."""
    for name in components:
        if too_long(name):
            raise LafsError(
                f"{shown_location(location)}: a name of {len(from_tahoe(name))} bytes cannot be used through a "
                f"mount (at most {NAME_MAX})"
            )
        if not showable(name):
            raise LafsError(f"{shown_location(location)}: {shown_name(name)!r} cannot be used through a mount")


def shown_name(name: str) -> str:
    """A Tahoe name as the mount shows it, for printing (bytes that are not UTF-8 as surrogate escapes)."""
    return os.fsdecode(from_tahoe(name))


def _split_parent(grid_location: str, node: NodeDirectory) -> tuple[Cap, list[str], str]:
    root, components = location_of(grid_location, node)
    if not components:
        raise LafsError(f"{shown_location(grid_location)!r} names no entry inside a directory")
    return root, components[:-1], components[-1]


async def _parent_directory(grid: Grid, root: Cap, components: list[str], *, create: bool = False) -> DirectoryCap:
    return (await directory_path(grid, root, components, create=create))[-1]


# --- commands --------------------------------------------------------------------------------------------------
class NoRootDirectoryError(LafsError):
    """The node directory was made, but its root directory could not be created on the grid."""


def create_node(
    path: Path,
    *,
    needed: int = 3,
    happy: int | None = None,
    total: int = 10,
    server_files: Sequence[Path] = (),
    local_servers: Sequence[Path] = (),
    local_grid: int | None = None,
    warn: Callable[[str], object] | None = None,
) -> NodeDirectory:
    """What `create-node` does: a node directory (with an embedded local grid unless servers are named), then a
    new root directory on its grid linked as the alias tahoe:. `warn` is told, before the grid is used, when
    fewer servers are configured than happiness needs (every upload would fail). Raises NoRootDirectoryError
    if the node directory was made but the root directory could not be (the grid did not answer)."""
    encoding = EncodingConfig(needed, happy if happy is not None else min(7, total), total)
    node = create_node_directory(
        path,
        encoding=encoding,
        server_files=server_files,
        local_servers=local_servers,
        local_grid=local_grid,
    )
    servers = len(open_servers(node.servers()))
    if warn is not None and servers < encoding.happy:
        warn(
            f"happiness is {encoding.happy} but {servers} storage server{'s' * (servers != 1)} "
            f"{'are' if servers != 1 else 'is'} configured: uploads will fail until {encoding.happy} answer "
            f"(add servers, or lower shares.happy in {node.path / 'tahoe.cfg'})"
        )
    try:
        trio.run(_on_grid, node, lambda grid: _new_alias(grid, node, DEFAULT_ALIAS))
    except LafsError as exc:
        raise NoRootDirectoryError(
            f"node directory {node.path} made, but not its root directory: {exc}; once servers answer, "
            f"'blackmatch create-alias -d {node.path} {DEFAULT_ALIAS}' makes it"
        ) from exc
    return node


def create_node_command(args: argparse.Namespace) -> int:
    node = create_node(
        args.node_dir,
        needed=args.needed,
        happy=args.happy,
        total=args.total,
        server_files=args.servers,
        local_servers=args.local_server,
        local_grid=args.local_grid,
        warn=lambda message: print(f"blackmatch: warning: {message}", file=sys.stderr),
    )
    print(f"Node directory created in {node.path}; its root directory is the alias {DEFAULT_ALIAS}:")
    return 0


def _new_alias_name(text: str, node: NodeDirectory) -> str:
    """An alias name as typed (one trailing colon allowed, as Tahoe allows), refused if taken or unusable."""
    name = text.removesuffix(":")
    if not name or ":" in name or any(c.isspace() for c in name) or "/" in name:
        raise LafsError(f"{text!r} cannot be an alias name: no colons, slashes or spaces")
    if name in node.aliases():
        raise LafsError(f"alias {name}: already exists")
    return name


async def _new_alias(grid: Grid, node: NodeDirectory, name: str) -> None:
    node.set_alias(name, str(await create_directory(grid)))


async def create_alias_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    name = _new_alias_name(args.alias, node)
    await _new_alias(grid, node, name)
    print(f"Alias {name}: created")
    return 0


def add_alias_command(args: argparse.Namespace) -> int:
    node = existing_node(args)
    name = _new_alias_name(args.alias, node)
    node.set_alias(name, str(as_directory(parse_known_cap(args.cap))))
    print(f"Alias {name}: added")
    return 0


def list_aliases_command(args: argparse.Namespace) -> int:
    caps = {name: parse_cap(text) for name, text in sorted(existing_node(args).aliases().items())}
    if args.json:
        details = {name: {"readwrite": str(cap), "readonly": str(cap.readonly())} for name, cap in caps.items()}
        print(json.dumps(details, indent=4))
        return 0
    width = max((len(name) for name in caps), default=0)
    for name, cap in caps.items():
        print(f"{name:>{width}}: {cap.readonly() if args.readonly_uri else cap}")
    return 0


async def put_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    if args.local == "-":
        with tempfile.NamedTemporaryFile(prefix="blackmatch-put-") as spool:
            await trio.to_thread.run_sync(lambda: _copy_stream(sys.stdin.buffer, spool))
            spool.flush()
            cap = await _put(grid, node, Path(spool.name), args)
    else:
        cap = await _put(grid, node, _regular_file(args.local), args)
    print(cap)
    return 0


async def _put(grid: Grid, node: NodeDirectory, path: Path, args: argparse.Namespace) -> Cap:
    """Upload `path` and link it at the target; a mutable file already there (or a mutable file's cap as the
    target) is overwritten in place instead, keeping its cap, as `tahoe put` does."""
    if not args.target:
        return await _upload_path(grid, path, args.mutable)
    root, components = location_of(args.target, node)
    shown = shown_location(args.target)
    if not components:
        if isinstance(root, MutableWriteCap | MutableReadCap):
            return await _overwrite(grid, root, path, shown)
        if isinstance(root, DirectoryCap):
            example = f"{shown}NAME" if shown.endswith(":") else f"{shown}/NAME"
            raise LafsError(f"{shown} is a directory: name the new file inside it, as {example}")
        raise LafsError(f"{shown} is an immutable file: it cannot be overwritten")
    try:
        existing, _entry = await resolve(grid, root, components)
    except NoSuchChildError:
        existing = None
    if isinstance(existing, MutableWriteCap | MutableReadCap):
        return await _overwrite(grid, existing, path, shown)
    if isinstance(existing, DirectoryCap):
        raise ExistingChildError(f"{shown} is a directory")
    _creatable(components, args.target)
    cap = await _upload_path(grid, path, args.mutable)
    parent = await _parent_directory(grid, root, components[:-1], create=True)
    await modify_directory(grid, parent, linker(components[-1], cap, replace_files=True))
    return cap


async def _overwrite(grid: Grid, cap: MutableWriteCap | MutableReadCap, path: Path, shown: str) -> Cap:
    """Publish `path`'s contents as the next version of a mutable file (SDMF or MDMF, as it is)."""
    if isinstance(cap, MutableReadCap):
        raise LafsError(f"{shown} is a read-only mutable file: a read cap cannot change it")
    await overwrite(grid, cap, await trio.to_thread.run_sync(path.read_bytes))
    return cap


def _copy_stream(source: IO[bytes], destination: IO[bytes]) -> None:
    while chunk := source.read(1024 * 1024):
        destination.write(chunk)


def _regular_file(text: str) -> Path:
    """The local file to upload, checked before the grid is touched."""
    path = Path(text)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise LafsError(f"{text}: No such file or directory") from None
    if not stat.S_ISREG(mode):
        raise LafsError(f"{text} is {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
    return path


async def _upload_path(grid: Grid, path: Path, mutable: bool) -> Cap:
    if mutable:
        return await create_mutable(grid, await trio.to_thread.run_sync(path.read_bytes))
    return await upload_immutable(grid, path.stat().st_size, file_chunks(path))


async def get_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    root, components = location_of(args.source, node)
    cap, entry = await resolve(grid, root, components)
    if isinstance(cap, DirectoryCap):
        raise NotADirectoryCapError(f"{shown_location(args.source)} is a directory; use ls")
    special = SPECIAL_DESCRIPTIONS.get(entry_type(cap, entry.metadata)) if entry is not None else None
    if special is not None:
        raise LafsError(f"{shown_location(args.source)} is {special}, which has no content to get")
    if not args.local:
        await _download(grid, cap, sys.stdout.buffer)
        return 0
    with local_output(Path(args.local)) as out:
        await _download(grid, cap, out)
    return 0


async def _download(grid: Grid, cap: Cap, out: BinaryIO) -> None:
    """Write a file's whole verified contents to `out`."""
    if isinstance(cap, LiteralCap):
        out.write(cap.data)
    elif isinstance(cap, MutableWriteCap | MutableReadCap):
        data, _map, _version = await retrieve(grid, cap)
        out.write(data)
    elif isinstance(cap, ChkCap):
        await ImmutableFile(grid, cap).copy_to(lambda data: trio.to_thread.run_sync(out.write, data))
    else:  # a verify cap, or a kind of cap this code does not know (a directory may hold one)
        raise LafsError(f"{cap.abbreviated()} cannot be read: only a read or write cap decrypts a file")
    out.flush()


@contextlib.contextmanager
def local_output(path: Path) -> Iterator[BinaryIO]:
    """Where a download to `path` is written. A regular file (or none) is replaced only once the download is
    whole (replaced_when_complete); anything else that is not a directory (/dev/null, a FIFO, a terminal) holds
    nothing to keep and is written in place, as `tahoe get` and cat would: replacing it would put a regular file
    where a device was."""
    target = Path(os.path.realpath(path))
    try:
        kind = target.stat().st_mode
    except FileNotFoundError:
        kind = stat.S_IFREG
    if stat.S_ISDIR(kind):
        raise LafsError(f"{path} is a directory")
    if not stat.S_ISREG(kind):
        with open(target, "wb") as out:
            yield out
        return
    with replaced_when_complete(target) as out:
        yield out


@contextlib.contextmanager
def replaced_when_complete(target: Path) -> Iterator[BinaryIO]:
    """A new file beside the regular file `target` (which may not exist yet) to write its new contents into,
    renamed over it only when the block ends without an error (after an fsync, with `target`'s mode when it
    existed); removed otherwise, even on Ctrl-C.

    So a download that fails (a mistyped cap, the grid down) or is interrupted leaves `target` as it was, and
    never an empty or partial file."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


async def ls_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    root, components = location_of(args.path, node)
    cap, entry = await resolve(grid, root, components)
    if isinstance(sys.stdout, io.TextIOWrapper):  # names print as the bytes a mount shows, UTF-8 or not
        sys.stdout.reconfigure(errors="surrogateescape")
    if not isinstance(cap, DirectoryCap):
        if args.json:
            print(json.dumps(node_json(cap, entry), indent=1))
        else:
            name = shown_name(components[-1]) if components else str(cap)
            print(long_line(name, cap, entry) if args.long and entry else name)
        return 0
    children = await read_directory(grid, cap)
    if args.json:
        kind, info = node_json(cap)
        info["children"] = {name: node_json(e.cap, e) for name, e in sorted(children.items())}
        print(json.dumps([kind, info], indent=1))
        return 0
    for name, child in sorted(children.items()):
        print(long_line(shown_name(name), child.cap, child) if args.long else shown_name(name))
    return 0


async def mkdir_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    if not args.path:
        print(await create_directory(grid, file_format=args.format))
        return 0
    root, parents, name = _split_parent(args.path, node)
    _creatable([*parents, name], args.path)
    parent = await _parent_directory(grid, root, parents, create=True)
    children = await read_directory(grid, parent)
    if name in children:
        raise ExistingChildError(f"{shown_location(args.path)} already exists")
    new = await create_directory(grid, file_format=args.format)
    await modify_directory(grid, parent, linker(name, new, replace_files=False))
    print(new)
    return 0


async def _link(
    grid: Grid, node: NodeDirectory, source: str, target: str
) -> tuple[DirectoryCap | None, str | None, DirEntry]:
    """Link the object at `source` at `target` (inside it, if `target` is a directory); return its old place.

    A bare cap as `source` (as `tahoe ln` allows) has no old place: (None, None, its new entry)."""
    src_root, src_components = location_of(source, node)
    if not src_components:
        src_parent, src_name, entry = None, None, child_entry(src_root)
    else:
        src_parent = await _parent_directory(grid, src_root, src_components[:-1])
        src_name = src_components[-1]
        found = (await read_directory(grid, src_parent)).get(src_name)
        if found is None:
            raise NoSuchChildError(f"{shown_location(source)} does not exist")
        entry = found
    dst_root, dst_components = location_of(target, node)
    try:
        existing, _ = await resolve(grid, dst_root, dst_components)
    except NoSuchChildError:
        existing = None
    if isinstance(existing, DirectoryCap) and src_name is not None:
        parent_components, name = dst_components, src_name
    else:
        if not dst_components:
            raise LafsError(f"{shown_location(target)!r} names no entry inside a directory")
        parent_components, name = dst_components[:-1], dst_components[-1]
    _creatable([name], target)
    chain = await directory_path(grid, dst_root, parent_components)
    if isinstance(entry.cap, DirectoryCap) and any(_same_object(entry.cap, above) for above in chain):
        raise DirectoryLoopError(
            f"{shown_location(target)} is inside {shown_location(source)}: a directory cannot go inside itself"
        )
    parent = chain[-1]
    user_metadata = {k: v for k, v in entry.metadata.items() if k != "tahoe"}
    await modify_directory(grid, parent, linker(name, entry.cap, replace_files=True, metadata=user_metadata))
    return src_parent, src_name, entry


def _same_object(first: DirectoryCap, second: DirectoryCap) -> bool:
    """Whether two caps name one directory (its write and read caps share a storage index)."""
    return first.storage_index is not None and first.storage_index == second.storage_index


async def ln_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    await _link(grid, node, args.source, args.target)
    return 0


async def mv_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    if not location_of(args.source, node)[1]:
        raise LafsError(f"{shown_location(args.source)!r} names no entry inside a directory: nothing to move")
    src_parent, src_name, entry = await _link(grid, node, args.source, args.target)
    assert src_parent is not None and src_name is not None

    def unlink_if_same(children: Children) -> Children | None:
        current = children.get(src_name)
        if current is None or current.rw_uri != entry.rw_uri or current.ro_uri != entry.ro_uri:
            return None  # already moved or replaced by someone else: leave it
        del children[src_name]
        return children

    await modify_directory(grid, src_parent, unlink_if_same)
    return 0


async def rm_command(grid: Grid, node: NodeDirectory, args: argparse.Namespace) -> int:
    root, parents, name = _split_parent(args.path, node)
    parent = await _parent_directory(grid, root, parents)

    def unlink(children: Children) -> Children:
        if name not in children:
            raise NoSuchChildError(f"{shown_location(args.path)} does not exist")
        del children[name]
        return children

    await modify_directory(grid, parent, unlink)
    return 0
