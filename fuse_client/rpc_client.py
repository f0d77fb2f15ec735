"""The shim's side of the RPC socket: the filesystem operations (grid_server/operations.py) as calls to the grid
server, many in flight on one connection (the wire format is in grid_server/rpc_wire.py, the methods in
grid_server/rpc_methods.py).

`RpcOperations` has one method per operation, made from the method table, so the shim cannot tell it from an
in-process filesystem. A failed call raises `FsError` with the server's errno and message.

If the connection ends while the mount is up (the grid server died), the calls waiting on it fail with ENOTCONN
and the mount attaches again: `keep_attached` starts a new server (which replays the journal) and a new
connection, while calls that arrive meanwhile wait for that attempt. The mount never ends by itself, so the
mountpoint never turns back into a plain local directory under a program writing there; while no server can be
started, every call fails with ENOTCONN and the attempts go on with capped back-off. Files opened before the
restart fail with EIO, and inodes the kernel got from the old server are unknown to the new one (ESTALE, after
which the kernel looks their paths up again): numbers never repeat across server runs (grid_server/node_state.py).
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import trio

from grid_server.operations import FsError, Operations
from grid_server.rpc_methods import METHODS, Method
from grid_server.rpc_wire import Frame, FrameReader, ProtocolError, check_server_hello, encode_frame, hello, request
from grid_server.server_files import socket_address
from lafs_core.errors import LafsError

log = logging.getLogger("blackmatch.rpc")

RECEIVE_BYTES = 256 * 1024
FIRST_RETRY = 1.0  # seconds between attempts to attach again to a new grid server, doubling up to LAST_RETRY
LAST_RETRY = 30.0


class ServerUnavailable(LafsError):
    """Nothing answers on the socket (no server, or a stale socket a crash left)."""


class ServerRefused(LafsError):
    """The grid server refused this client: another protocol version, or not a blackmatch server."""


@dataclass(eq=False)
class _Waiting:
    done: trio.Event
    message: dict[str, Any] | None = None
    data: bytes = b""


class RpcConnection:
    """One connection to the grid server: calls out, replies matched to them by id."""

    def __init__(self, stream: trio.SocketStream, reader: FrameReader) -> None:
        self.stream = stream
        self.reader = reader
        self.send_lock = trio.Lock()
        self.ids = itertools.count(1)
        self.waiting: dict[int, _Waiting] = {}
        self.lost = trio.Event()
        self.lost_reason = ""

    async def call(self, name: str, *args: Any) -> Any:
        method = METHODS[name]
        params, data = method.encode_params(args)
        id = next(self.ids)
        waiting = _Waiting(trio.Event())
        self.waiting[id] = waiting
        try:
            frame = encode_frame(request(id, name, params), data)
            if self.lost.is_set():
                raise FsError(errno.ENOTCONN, self.lost_reason)
            async with self.send_lock:
                try:
                    with trio.CancelScope(shield=True):  # half a frame sent would garble every later one
                        await self.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._lose(f"the grid server connection broke: {exc}")
                    raise FsError(errno.ENOTCONN, self.lost_reason) from None
            await waiting.done.wait()
        finally:
            del self.waiting[id]
        reply = waiting.message
        if reply is None:
            raise FsError(errno.ENOTCONN, self.lost_reason)
        failure = reply.get("error")
        if failure is not None:
            raise FsError(failure["errno"], failure["message"])
        return method.result(reply["result"], waiting.data)

    async def receive_replies(self) -> None:
        """Hand each reply to its call, until the connection ends."""
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    self._lose("the grid server closed the connection")
                    return
                for frame in self.reader.feed(data):
                    reply_id = frame.message.get("id")
                    waiting = self.waiting.get(reply_id) if isinstance(reply_id, int) else None
                    if waiting is None:
                        if "error" in frame.message:
                            log.error("the grid server reports: %s", frame.message["error"].get("message"))
                        continue
                    waiting.message, waiting.data = frame.message, frame.data
                    waiting.done.set()
        except ProtocolError as exc:
            self._lose(f"the grid server's replies cannot be read: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lose(f"the grid server connection broke: {exc}")

    async def serve(self) -> None:
        """Read replies until the connection ends, then close it."""
        try:
            await self.receive_replies()
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
        for waiting in self.waiting.values():
            waiting.done.set()


async def connect(socket_path: Path) -> RpcConnection:
    """Connect and shake hands; ServerUnavailable if nothing listens, ServerRefused if the server refuses us."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_address(socket_path) as address:
            await sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ServerUnavailable(f"no grid server answers on {socket_path}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    reader = FrameReader()
    try:
        await stream.send_all(encode_frame(hello()))
        frames: list[Frame] = []
        while not frames:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ServerUnavailable("the grid server closed the connection during the handshake")
            frames = reader.feed(data)
        check_server_hello(frames[0].message)
    except ProtocolError as exc:
        await stream.aclose()
        raise ServerRefused(f"the grid server refused this client: {exc}") from None
    except BaseException:
        await stream.aclose()
        raise
    return RpcConnection(stream, reader)


@asynccontextmanager
async def open_connection(socket_path: Path) -> AsyncIterator[RpcConnection]:
    """A connection with its reply reader running, closed on exit."""
    connection = await connect(socket_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.serve)
        yield connection
        nursery.cancel_scope.cancel()


def _forwarder(method: Method) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def forward(self: RpcOperations, *args: Any) -> Any:
        return await (await self.current_connection()).call(method.name, *args)

    forward.__name__ = forward.__qualname__ = method.name
    forward.__doc__ = f"`{method.name}` on the grid server."
    return forward


class RpcOperations:
    """The Operations interface over an RPC connection that is attached to a root; `keep_attached` replaces the
    connection when the server it goes to has died."""

    def __init__(self, connection: RpcConnection) -> None:
        self.connection = connection
        # While `keep_attached` runs: fires when its attempt to attach again has ended. It is made before the
        # connection can be lost, so a call that finds the connection lost waits for the first attempt even before
        # `keep_attached` has woken to make it; between failed attempts it stays set, and calls fail at once.
        self.attempt_over: trio.Event | None = None

    async def current_connection(self) -> RpcConnection:
        """The connection calls go to: while an attempt to attach again runs, the one it makes."""
        if self.connection.lost.is_set() and self.attempt_over is not None:
            await self.attempt_over.wait()
        return self.connection


for _method in METHODS.values():
    if not _method.connection:
        setattr(RpcOperations, _method.name, _forwarder(_method))


def as_operations(operations: RpcOperations) -> Operations:
    """`operations` as the interface it implements: its methods are made from METHODS above, where a type checker
    cannot see them (tests/test_rpc_server.py checks that every method of Operations is there)."""
    return cast(Operations, operations)


Attach = Callable[[], Awaitable[RpcConnection]]


async def keep_attached(operations: RpcOperations, attach_again: Attach) -> None:
    """Whenever the connection is lost, attach again (`attach_again` starts a grid server if none runs), with
    capped back-off while that fails. A failure that is not the grid server's absence (a bug) is logged with its
    traceback and ends the attempts: the mount stays, and its calls fail with ENOTCONN until it is unmounted."""
    try:
        while True:
            operations.attempt_over = trio.Event()
            await operations.connection.lost.wait()
            log.error("%s; starting the grid server again", operations.connection.lost_reason)
            pause = FIRST_RETRY
            while True:
                try:
                    operations.connection = await attach_again()
                except (LafsError, FsError, OSError) as exc:
                    log.error("cannot attach to a grid server: %s; trying again in %g s", exc, pause)
                finally:
                    operations.attempt_over.set()
                if not operations.connection.lost.is_set():
                    break
                await trio.sleep(pause)
                pause = min(pause * 2, LAST_RETRY)
                operations.attempt_over = trio.Event()
            log.info("attached to a new grid server; files open before it started fail with EIO")
    except Exception:
        log.exception("attaching to a new grid server failed unexpectedly; giving up until unmounted")


@asynccontextmanager
async def open_rpc_operations(
    socket_path: Path,
    root_cap: str,
    settings: Mapping[str, object],
    on_settings: Callable[[dict[str, Any]], None],
    start_server: Callable[[], Awaitable[None]] | None,
) -> AsyncIterator[Operations]:
    """Attach to the server as a mount of `root_cap` (`on_settings` gets the settings in effect). If the server
    goes away meanwhile, `start_server` starts one again and the mount attaches to it (without it, the calls fail
    with ENOTCONN from then on). On exit the connection closes: that is what tells the server this mount is gone
    (the mount waits for its uploads before, with `finish_uploads`)."""
    async with trio.open_nursery() as nursery:

        async def attach() -> tuple[RpcConnection, dict[str, Any]]:
            connection = await connect(socket_path)
            nursery.start_soon(connection.serve)
            try:
                return connection, await connection.call("attach", root_cap, settings)
            except BaseException:
                await connection.stream.aclose()
                raise

        async def attach_again() -> RpcConnection:
            assert start_server is not None
            await start_server()
            return (await attach())[0]

        connection, in_effect = await attach()
        on_settings(in_effect)
        operations = RpcOperations(connection)
        if start_server is not None:
            nursery.start_soon(keep_attached, operations, attach_again)
        yield as_operations(operations)
        nursery.cancel_scope.cancel()
