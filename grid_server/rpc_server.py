"""The grid server's side of the RPC socket: connections, requests, mounts, and when to exit.

Every connection is checked first: the peer's uid (SO_PEERCRED) must be the server's own, then the handshake
(rpc_wire.py) must match the protocol and version. After that, each request runs in its own task, so many are in
flight on one connection and a slow download never holds up an `ls`; replies go out as they finish.

A connection that sends `attach` becomes a mount of a root: the filesystem for that root is opened the first time
any mount asks for it and shared by every later mount of it (so two mounts of one root see one cache and one set
of inodes), and the connection is that mount's keepalive. The server counts what each mount holds, lookups and
open handles, as the kernel would; when a mount's connection ends without giving them back (the shim was killed)
the server releases its handles and forgets its lookups, so files it had open still upload.

The server exits when no mount is left: it first drains every root (still accepting connections, so a mount that
arrives meanwhile keeps it alive), then stops listening and closes the roots. A server nobody attaches to within
FIRST_MOUNT_GRACE seconds of starting exits too.

Errors: a request that breaks the protocol but has an id gets an error reply (EINVAL for bad parameters, ENOSYS for
an unknown method); a frame that cannot be read at all, or an oversized one, closes that connection alone. A
filesystem operation that fails unexpectedly is logged and answered with EIO. Nothing here logs a cap or data.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from lafs_core.caps import parse_cap
from lafs_core.errors import LafsError, sole_exception

from .filesystem import FilesystemOptions, GridFilesystem, open_root
from .node_state import NodeState
from .operations import ENTRY_OPERATIONS, FsError
from .rpc_methods import METHODS, BadParams, Method, encode_result
from .rpc_wire import Frame, FrameReader, ProtocolError, check_hello, encode_frame, error, hello, parse_request, result
from .server_files import socket_address

log = logging.getLogger("blackmatch.server")

FIRST_MOUNT_GRACE = 60.0  # seconds a new server waits for its first mount
RECEIVE_BYTES = 256 * 1024
MAX_IN_FLIGHT = 256  # requests one connection may have running; past it the server stops reading it
_PEERCRED = struct.Struct("3i")


@dataclass(eq=False)
class Root:
    """One mounted root: its filesystem, and the event that tells its task to close it."""

    filesystem: GridFilesystem
    close: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Held:
    """What one mount holds on its root's filesystem, given back for it if its connection ends first."""

    lookups: Counter[int] = field(default_factory=Counter)
    files: set[int] = field(default_factory=set)
    directories: set[int] = field(default_factory=set)

    def note(self, name: str, arguments: list[Any], value: Any) -> None:
        if name in ENTRY_OPERATIONS:
            self.lookups[value.inode] += 1
        elif name == "create":
            self.files.add(value[0])
            self.lookups[value[1].inode] += 1
        elif name == "readdir":
            self.lookups.update(entry.attributes.inode for entry in value)
        elif name == "forget":
            for inode, count in arguments[0]:
                self.lookups[inode] -= count
                if self.lookups[inode] <= 0:
                    del self.lookups[inode]
        elif name == "open":
            self.files.add(value)
        elif name == "opendir":
            self.directories.add(value)
        elif name == "release":
            self.files.discard(arguments[0])
        elif name == "releasedir":
            self.directories.discard(arguments[0])

    async def give_back(self, filesystem: GridFilesystem) -> None:
        for fh in sorted(self.files):
            await _quietly(filesystem.release(fh))
        for fh in sorted(self.directories):
            await _quietly(filesystem.releasedir(fh))
        counts = [(inode, count) for inode, count in self.lookups.items() if inode and count > 0]
        if counts:
            await _quietly(filesystem.forget(counts))
        if self.files or self.directories:
            files, directories = len(self.files), len(self.directories)
            log.info("a mount went away: released its %d files and %d directories", files, directories)


async def _quietly(call: Any) -> None:
    try:
        await call
    except FsError:
        pass
    except Exception:
        log.exception("giving back a gone mount's handles failed")


def peer_uid(sock: trio.socket.SocketType) -> int:
    uid: int
    _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


async def listen(path: Path) -> trio.SocketListener:
    """Listen on `path`, mode 0600, replacing whatever file is there (the caller holds the server lock, so no
    live server owns it: it is a stale socket left by a crash)."""
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class GridServer:
    """Serves the roots of one node directory to the mounts that connect to `listener`."""

    def __init__(self, state: NodeState) -> None:
        self.state = state
        self.roots: dict[str, Root] = {}
        self.mounts = 0
        self._mounts_changed = trio.Event()
        self._attach_lock = trio.Lock()
        self._roots_nursery: trio.Nursery | None = None

    # --- life -----------------------------------------------------------------------------------------------
    async def serve(self, listener: trio.SocketListener, socket_path: Path, ready: Callable[[], None]) -> None:
        """Serve until no mount is left (or none came); then drain, stop listening and close every root."""
        async with trio.open_nursery() as roots_nursery:
            self._roots_nursery = roots_nursery
            async with trio.open_nursery() as connections:
                connections.start_soon(self._accept, listener)
                ready()
                await self._until_unused()
                connections.cancel_scope.cancel()
            await listener.aclose()
            socket_path.unlink(missing_ok=True)
            log.info("no mounts left; closing %d roots", len(self.roots))
            for root in self.roots.values():
                root.close.set()

    async def _until_unused(self) -> None:
        with trio.move_on_after(FIRST_MOUNT_GRACE):
            while self.mounts == 0:
                await self._mounts_changed.wait()
        while True:
            while self.mounts > 0:
                await self._mounts_changed.wait()
            for root in list(self.roots.values()):
                await root.filesystem.drain()
            if self.mounts == 0:
                return

    def count_mount(self, change: int) -> None:
        self.mounts += change
        self._mounts_changed.set()
        self._mounts_changed = trio.Event()

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait, and accept again
                    log.warning("accepting a connection failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._serve_connection, stream)

    # --- roots ----------------------------------------------------------------------------------------------
    async def root_for(self, root_cap: str, settings: dict[str, Any]) -> Root:
        """The open root for `root_cap`, opened now (with the mount's settings) if no mount has it yet."""
        try:  # one Root per cap, however it is written ("ro." prefixes, spaces): two would share one journal
            root_cap = parse_cap(root_cap.strip(), allow_prefixes=True).to_string()
        except LafsError as exc:
            raise FsError(errno.EINVAL, f"the root is not a valid cap: {exc}") from None
        async with self._attach_lock:
            root = self.roots.get(root_cap)
            if root is None:
                options = FilesystemOptions(cache_size=self.state.read_cache.max_bytes)
                if "cache_timeout" in settings:
                    options = replace(options, cache_timeout=settings["cache_timeout"])
                assert self._roots_nursery is not None
                try:
                    root = await self._roots_nursery.start(self._run_root, root_cap, options)
                except Exception as exc:  # a cap that is not a directory, say; the rest is the server's failure
                    failure = sole_exception(exc)
                    if isinstance(failure, LafsError):
                        raise FsError(errno.EINVAL, f"cannot open the root: {failure}") from None
                    raise
                self.roots[root_cap] = root
            return root

    async def _run_root(self, root_cap: str, options: FilesystemOptions, task_status: Any) -> None:
        started = False
        try:
            async with open_root(self.state, root_cap, options) as filesystem:
                root = Root(filesystem)
                task_status.started(root)
                started = True
                await root.close.wait()
        except Exception:
            if not started:
                raise
            log.exception("closing a root failed; its queued changes stay in its journal")

    # --- connections ----------------------------------------------------------------------------------------
    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = peer_uid(stream.socket)
            if uid != os.getuid():
                log.warning("refused a connection from uid %d (this server runs as uid %d)", uid, os.getuid())
                return
            connection = Connection(self, stream)
            try:
                await connection.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass
            finally:
                await connection.detach()


class Connection:
    """One client: the handshake, then requests until it closes or breaks the protocol."""

    def __init__(self, server: GridServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.reader = FrameReader()
        self.send_lock = trio.Lock()
        self.slots = trio.Semaphore(MAX_IN_FLIGHT)
        self.root: Root | None = None
        self.held = Held()
        self.open = True

    async def run(self) -> None:
        """Answer requests until the client closes or breaks the protocol; requests under way still finish
        (cancelling one halfway could leave a change half made)."""
        frames = await self._handshake()
        if frames is None:
            return
        async with trio.open_nursery() as requests:
            while True:
                for frame in frames:
                    await self.slots.acquire()
                    requests.start_soon(self._answer, frame.message, frame.data)
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if self.reader.pending:
                        log.info("a client went away in the middle of a frame")
                    return
                try:
                    frames = self.reader.feed(data)
                    for frame in frames:
                        if type(frame.message.get("id")) is not int:
                            raise ProtocolError("a request without an integer id cannot be answered")
                except ProtocolError as exc:
                    log.warning("closing a connection that broke the protocol: %s", exc)
                    await self._send({"error": {"errno": errno.EPROTO, "message": str(exc)}})
                    return

    async def _handshake(self) -> list[Frame] | None:
        """The frames that came after the client's hello (it may send requests right behind it), or None if the
        handshake failed."""
        frames: list[Frame] = []
        try:
            while not frames:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return None
                frames = self.reader.feed(data)
            check_hello(frames[0].message)
        except ProtocolError as exc:
            log.warning("refused a client: %s", exc)
            await self._send({**hello(), "error": {"errno": errno.EPROTO, "message": str(exc)}})
            return None
        await self._send(hello())
        return frames[1:]

    async def _answer(self, message: dict[str, Any], data: bytes) -> None:
        try:
            reply, attachment = await self._dispatch(message, data)
            await self._send(reply, attachment)
        except Exception:  # a bug here must fail one request, never the server
            log.exception("answering a request failed")
        finally:
            self.slots.release()

    async def _dispatch(self, message: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            request = parse_request(message)
        except ProtocolError as exc:  # it has an id (the reading loop checked): answer there
            return error(message["id"], errno.EINVAL, str(exc)), b""
        method = METHODS.get(request.method)
        if method is None:
            return error(request.id, errno.ENOSYS, f"unknown method {request.method[:64]!r}"), b""
        try:
            arguments = method.decode_params(request.params, data)
            value = await self._call(method, arguments)
            json_value, attachment = encode_result(value)
            return result(request.id, json_value), attachment
        except BadParams as exc:
            return error(request.id, errno.EINVAL, str(exc)), b""
        except FsError as exc:
            return error(request.id, exc.errno, exc.message), b""
        except Exception:
            log.exception("%s failed unexpectedly; replying EIO", method.name)
            return error(request.id, errno.EIO, f"{method.name} failed in the grid server (see its log)"), b""

    async def _call(self, method: Method, arguments: list[Any]) -> Any:
        if method.connection:
            return await getattr(self, f"_{method.name}")(*arguments)
        if self.root is None:
            raise FsError(errno.ENOTCONN, "attach to a root before filesystem calls")
        value = await getattr(self.root.filesystem, method.name)(*arguments)
        self.held.note(method.name, arguments, value)
        return value

    async def _send(self, message: dict[str, Any], data: bytes = b"") -> None:
        if not self.open:
            return
        frame = encode_frame(message, data)
        async with self.send_lock:
            try:
                await self.stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.open = False  # the client went away; its requests still finish

    # --- the connection's own methods -----------------------------------------------------------------------
    async def _attach(self, root_cap: str, settings: dict[str, Any]) -> dict[str, Any]:
        if self.root is not None:
            raise FsError(errno.EISCONN, "this connection is already a mount")
        self.root = await self.server.root_for(root_cap, settings)
        self.server.count_mount(+1)
        options = self.root.filesystem.options
        log.info("a mount attached (%d now)", self.server.mounts)
        return {"cache_timeout": options.cache_timeout, "cache_size": options.cache_size}

    async def _status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "mounts": self.server.mounts,
            "roots": len(self.server.roots),
            "queued": sum(root.filesystem.outstanding() for root in self.server.roots.values()),
            "lease_renewal": [
                {"root": root.filesystem.state_dir.name, **root.filesystem.lease_renewal.state()}
                for root in self.server.roots.values()
            ],
        }

    async def detach(self) -> None:
        """The connection has ended: give back what its mount held, and count it gone."""
        self.open = False
        if self.root is None:
            return
        with trio.CancelScope(shield=True):
            await self.held.give_back(self.root.filesystem)
        self.server.count_mount(-1)
        log.info("a mount detached (%d left)", self.server.mounts)
