"""The grid server's RPC socket, in-process over a node's embedded local grid: the RPC client against the real
server, and hostile clients beside a good one, which must go on being served.

Bad input checked: garbage instead of a handshake, the wrong protocol version, a 2 GiB length prefix, a request
without an id, an unknown method, wrong argument types, and clients that vanish mid-frame and mid-request.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuse_client.grid_commands import create_node
from fuse_client.grid_server_process import ServerStartError, server_answers
from fuse_client.rpc_client import RpcConnection, RpcOperations, ServerRefused, connect, open_connection
from grid_server.node_state import open_node_state
from grid_server.operations import ENTRY_OPERATIONS, ROOT_INODE, Attributes, Caller, FsError, Operations
from grid_server.rpc_methods import METHODS
from grid_server.rpc_server import GridServer, Held, listen
from grid_server.rpc_wire import VERSION, FrameReader, encode_frame, hello, request
from lafs_core.caps import parse_cap

CALLER = Caller(os.getuid(), os.getgid(), 0o022)


# --- the method table ----------------------------------------------------------------------------------------
def test_the_method_table_is_the_operations_interface():
    """Every operation travels, with its parameters in the interface's order and names."""
    operations = {name for name, _ in inspect.getmembers(Operations, inspect.iscoroutinefunction)}
    assert operations == {name for name, method in METHODS.items() if not method.connection}
    for name in operations:
        parameters = list(inspect.signature(getattr(Operations, name)).parameters)[1:]
        assert [param for param, _ in METHODS[name].params] == parameters, name
        assert callable(getattr(RpcOperations, name))


def test_every_operation_answering_with_an_entry_is_counted_for_a_gone_mount():
    """The server gives back a gone mount's lookups (Held): each operation that answers with a new entry's
    Attributes counts one, as the kernel does, so none may be missing from ENTRY_OPERATIONS (mknod once was)."""
    answering = {
        name
        for name, function in inspect.getmembers(Operations, inspect.iscoroutinefunction)
        if inspect.signature(function).return_annotation in (Attributes, "Attributes")
    }
    assert answering - {"getattr", "setattr"} == ENTRY_OPERATIONS  # these two answer about an inode already held
    held = Held()
    attributes = Attributes(7, 0o100644, 1, 0, 0, 0, 0, 0, 0)
    for name in sorted(ENTRY_OPERATIONS):
        held.note(name, [], attributes)
    assert held.lookups == {7: len(ENTRY_OPERATIONS)}


@pytest.mark.parametrize(
    ("method", "params", "data"),
    [
        ("lookup", {"parent": "1", "name": "x"}, b""),
        ("lookup", {"parent": True, "name": "x"}, b""),
        ("lookup", {"parent": -1, "name": "x"}, b""),
        ("lookup", {"parent": 1}, b""),
        ("lookup", {"parent": 1, "name": "x", "extra": 1}, b""),
        ("lookup", {"parent": 1, "name": b"x".hex()}, b"attachment not taken"),
        ("read", {"fh": 1, "offset": 0, "size": 1 << 40}, b""),
        ("forget", {"counts": [[1]]}, b""),
        ("forget", {"counts": {"1": 1}}, b""),
        ("mkdir", {"parent": 1, "name": "d", "mode": 0o755, "caller": {"uid": 0}}, b""),
        ("setattr", {"inode": 1, "changes": {"colour": 1}, "fh": None}, b""),
        ("setattr", {"inode": 1, "changes": {"size": 1.5}, "fh": None}, b""),
        ("fsync", {"fh": 1, "datasync": 0}, b""),
        ("attach", {"root_cap": "x", "settings": {"cache_timeout": -1}}, b""),
    ],
)
def test_wrong_parameters_are_refused(method, params, data):
    from grid_server.rpc_methods import BadParams

    with pytest.raises(BadParams):
        METHODS[method].decode_params(params, data)


def test_parameters_round_trip():
    changes = {"mode": 0o600, "uid": None, "gid": None, "size": 5, "atime_ns": -1, "mtime_ns": None}
    write = METHODS["write"]
    params, data = write.encode_params((3, 10, b"bytes"))
    assert params == {"fh": 3, "offset": 10} and data == b"bytes"
    assert write.decode_params(params, data) == [3, 10, b"bytes"]
    arguments = METHODS["setattr"].decode_params({"inode": 2, "changes": changes, "fh": None}, b"")
    assert arguments[1].size == 5 and arguments[1].atime_ns == -1 and arguments[2] is None


# --- a real server, in-process ---------------------------------------------------------------------------------
@pytest.fixture
def node(tmp_path: Path):
    node = create_node(tmp_path / "node", needed=2, happy=3, total=4, local_grid=4)
    return node, node.aliases()["tahoe"]


def serve(node, body: Callable[[Path, str], Awaitable[None]]) -> list[str]:
    """Run a GridServer for the node and `body(socket_path, root_cap)` beside it; the server's log lines."""
    socket_path = node[0].private / "blackmatch" / "test.sock"
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger("blackmatch").addHandler(handler)

    async def main() -> None:
        async with open_node_state(node[0], 32 << 20) as state:
            listener = await listen(socket_path)
            async with trio.open_nursery() as nursery:
                server = GridServer(state)
                nursery.start_soon(server.serve, listener, socket_path, lambda: None)
                with trio.fail_after(60):
                    await body(socket_path, node[1])
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        logging.getLogger("blackmatch").removeHandler(handler)
    return records


async def raw_connection(socket_path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(os.fspath(socket_path))


async def read_frames(stream: trio.SocketStream, count: int = 1) -> list[dict[str, Any]] | None:
    """`count` frames' JSON, or None if the server closed the connection first."""
    reader, frames = FrameReader(), []
    while len(frames) < count:
        data = await stream.receive_some(65536)
        if not data:
            return None
        frames += reader.feed(data)
    return [frame.message for frame in frames]


async def closed_by_server(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(10):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return True
    return False


@asynccontextmanager
async def mounted(socket_path: Path, root_cap: str) -> AsyncIterator[RpcConnection]:
    async with open_connection(socket_path) as connection:
        await connection.call("attach", root_cap, {})
        yield connection


async def still_served(connection: RpcConnection) -> None:
    attributes = await RpcOperations(connection).getattr(ROOT_INODE)  # type: ignore[attr-defined]
    assert attributes.inode == ROOT_INODE


def test_one_root_however_its_cap_is_written(node):
    """Mounts of one root share one filesystem however the cap is written (Tahoe's "ro." prefix, spaces): two
    filesystems of one root would work on one journal and one directory of local files."""

    async def body(socket_path: Path, root_cap: str) -> None:
        readonly = parse_cap(root_cap).readonly().to_string()
        async with mounted(socket_path, readonly) as first, mounted(socket_path, f" ro.{readonly}\n") as second:
            assert (await first.call("status"))["roots"] == 1
            await still_served(first)
            await still_served(second)

    serve(node, body)


def test_client_and_server_do_the_filesystem_operations(node):
    async def body(socket_path: Path, root_cap: str) -> None:
        async with mounted(socket_path, root_cap) as connection:
            operations: Any = RpcOperations(connection)
            data = os.urandom(300_000)
            fh, attributes = await operations.create(ROOT_INODE, "file.bin", 0o644, os.O_WRONLY | os.O_CREAT, CALLER)
            assert await operations.write(fh, 0, data) == len(data)
            await operations.fsync(fh, False)
            await operations.release(fh)
            fh = await operations.open(attributes.inode, os.O_RDONLY)

            async def read_at(offset: int) -> bytes:
                return await operations.read(fh, offset, 65536)

            results: dict[int, bytes] = {}
            async with trio.open_nursery() as nursery:  # many requests in flight on one connection
                for offset in range(0, len(data), 65536):

                    async def one(offset: int = offset) -> None:
                        results[offset] = await read_at(offset)

                    nursery.start_soon(one)
            assert b"".join(results[offset] for offset in sorted(results)) == data
            await operations.release(fh)
            entries = await operations.readdir(await operations.opendir(ROOT_INODE), 0)
            assert [entry.name for entry in entries] == [".", "..", "file.bin"]
            assert entries[2].attributes.size == len(data) and entries[0].attributes.inode == ROOT_INODE
            assert (await operations.getxattr(attributes.inode, "user.tahoe.cap")).startswith(b"URI:CHK:")
            assert (await operations.statfs()).block_size > 0
            with pytest.raises(FsError) as failure:
                await operations.lookup(ROOT_INODE, "missing")
            assert failure.value.errno == errno.ENOENT
            assert await operations.finish_uploads(None) == 0

    serve(node, body)


def test_hostile_clients_get_errors_or_closed_connections_and_the_good_one_is_served(node):
    async def body(socket_path: Path, root_cap: str) -> None:
        async with mounted(socket_path, root_cap) as good:
            # garbage instead of a handshake: answered with an error frame, then closed
            stream = await raw_connection(socket_path)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed_by_server(stream)
            await still_served(good)

            # the wrong version: the refusal says why
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame({**hello(), "version": VERSION + 1}))
            (answer,) = await read_frames(stream) or [{}]
            assert "version mismatch" in answer["error"]["message"]
            assert await closed_by_server(stream)

            # after a good handshake: a 2 GiB length prefix closes the connection before anything is buffered
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame(hello()))
            assert await read_frames(stream) is not None
            await stream.send_all(struct.pack(">II", 2 << 30, 10) + b"x" * 1000)
            frames = await read_frames(stream)
            assert frames is not None and frames[0]["error"]["errno"] == errno.EPROTO
            assert await closed_by_server(stream)
            await still_served(good)

            # bad requests that have an id: each gets its error reply, and the connection stays usable
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame(hello()))
            assert await read_frames(stream) is not None
            bad = [
                (request(1, "format_disk", {}), errno.ENOSYS),
                (request(2, "lookup", {"parent": "root", "name": 7}), errno.EINVAL),
                (request(3, "read", {"fh": 1, "offset": 0, "size": 1 << 40}), errno.EINVAL),
                ({"id": 4, "method": 12, "params": {}}, errno.EINVAL),
                ({"id": 5, "method": "getattr", "params": [1]}, errno.EINVAL),
                (request(6, "getattr", {"inode": 1}), errno.ENOTCONN),  # not attached yet
                (request(7, "attach", {"root_cap": "URI:DIR2:not-a-cap", "settings": {}}), errno.EINVAL),
            ]
            for message, _ in bad:
                await stream.send_all(encode_frame(message))
            replies = await read_frames(stream, len(bad))
            assert replies is not None
            errors = {reply["id"]: reply["error"] for reply in replies}
            for message, expected in bad:
                assert errors[message["id"]]["errno"] == expected, (message, errors[message["id"]])
            assert "not-a-cap" not in errors[7]["message"]  # a cap (even a broken one) is not echoed
            await stream.send_all(encode_frame(request(8, "attach", {"root_cap": root_cap, "settings": {}})))
            replies = await read_frames(stream)
            await stream.send_all(encode_frame(request(9, "getattr", {"inode": ROOT_INODE})))
            replies = (replies or []) + (await read_frames(stream) or [])
            assert [reply["id"] for reply in replies] == [8, 9]
            assert all("result" in reply for reply in replies)

            # a request without an id cannot be answered: the connection is closed
            await stream.send_all(encode_frame({"method": "getattr", "params": {"inode": 1}}))
            assert await closed_by_server(stream)
            await still_served(good)

            # a client that vanishes mid-frame, and one that vanishes with requests in flight
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame(hello()) + encode_frame(request(1, "statfs", {}))[:7])
            await stream.aclose()
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame(hello()))
            await stream.send_all(encode_frame(request(1, "attach", {"root_cap": root_cap, "settings": {}})))
            assert await read_frames(stream, 2) is not None  # the hello and the attach
            await stream.send_all(encode_frame(request(2, "create", create_params("vanished.txt"))))
            await stream.send_all(encode_frame(request(3, "statfs", {})))
            await stream.aclose()
            await trio.sleep(0.5)
            await still_served(good)
            # the vanished client's open file was released for it: the entry is there and complete
            operations: Any = RpcOperations(good)
            attributes = await operations.lookup(ROOT_INODE, "vanished.txt")
            assert attributes.size == 0

    log = serve(node, body)
    assert any("broke the protocol" in line for line in log)
    assert not any("unexpectedly" in line for line in log), log


def create_params(name: str) -> dict[str, Any]:
    caller = {"uid": CALLER.uid, "gid": CALLER.gid, "umask": CALLER.umask}
    return {"parent": ROOT_INODE, "name": name, "mode": 0o644, "flags": os.O_WRONLY | os.O_CREAT, "caller": caller}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
def test_random_bytes_never_stop_the_server(node, noise):
    """Whatever a client sends after its hello (frames of random JSON or none), the server answers or closes,
    and the mounted client goes on being served."""

    async def body(socket_path: Path, root_cap: str) -> None:
        async with mounted(socket_path, root_cap) as good:
            stream = await raw_connection(socket_path)
            await stream.send_all(encode_frame(hello()))
            for chunk in noise:
                try:
                    await stream.send_all(chunk)
                except trio.BrokenResourceError:
                    break
            await stream.aclose()
            await still_served(good)

    serve(node, body)


def test_socket_is_private(node):
    async def body(socket_path: Path, root_cap: str) -> None:
        assert socket_path.stat().st_mode & 0o777 == 0o600
        assert socket_path.parent.stat().st_mode & 0o777 == 0o700
        stream = await raw_connection(socket_path)  # the server answers the handshake of this version
        await stream.send_all(encode_frame(hello()))
        assert await read_frames(stream) == [hello()]
        await stream.aclose()

    serve(node, body)


def test_clients_refuse_a_server_of_another_version(tmp_path):
    """Both clients, the shim's and the mount command's check, refuse a server that answers with another
    version, saying so, rather than talking to it or starting a second server beside it."""
    socket_path = tmp_path / "other.sock"

    async def other_version(stream: trio.SocketStream) -> None:
        assert await read_frames(stream) is not None
        await stream.send_all(encode_frame({**hello(), "version": VERSION + 1}))
        await stream.aclose()

    async def main() -> None:
        listener = await listen(socket_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, other_version, [listener])
            with pytest.raises(ServerRefused, match="version mismatch"):
                await connect(socket_path)
            with pytest.raises(ServerStartError, match="version mismatch"):
                await trio.to_thread.run_sync(server_answers, socket_path)
            nursery.cancel_scope.cancel()

    trio.run(main)
