"""Finding the grid server of a node directory, or starting it: what `blackmatch mount` does before it mounts.

A server answers the handshake on `NODEDIR/private/blackmatch/server.sock`. If nothing answers (no server, or a
socket a crash left behind: connecting to it is refused), the mount starts one as a daemon (background.py) and
waits until it says it is ready. A server that is just shutting down (its last mount went) no longer answers but
still holds the server lock: the mount waits for it to exit, then starts a new one, until SERVER_START_TIMEOUT. If
the server cannot start, the error gives the server log's path and its last lines.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio

from grid_server.pid_lock import lock_held
from grid_server.rpc_wire import Frame, FrameReader, ProtocolError, check_server_hello, encode_frame, hello, request
from grid_server.server_files import ServerFiles, socket_address
from lafs_core.errors import LafsError
from lafs_core.grid.nodedir import NodeDirectory

from .background import Report, start_daemon

SERVER_START_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 10.0
RETRY_PAUSE = 0.2


class ServerStartError(LafsError):
    """The grid server is not there and could not be started; the message says where its log is."""


def _connect(socket_path: Path) -> tuple[socket.socket, FrameReader] | None:
    """A handshaken blocking connection to the grid server, or None if none answers. A server of another version
    is an error, not an absence: starting a second one beside it cannot work."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    reader = FrameReader()
    try:
        with socket_address(socket_path) as address:
            sock.connect(address)
        sock.sendall(encode_frame(hello()))
        answer = _receive(sock, reader)
    except (FileNotFoundError, ConnectionError, TimeoutError):
        answer = None
    if answer is None:  # nothing listens, or the server closed: it is on its way out
        sock.close()
        return None
    try:
        check_server_hello(answer)
    except ProtocolError as exc:
        sock.close()
        raise ServerStartError(f"the grid server on {socket_path} refuses this client: {exc}") from None
    return sock, reader


def _receive(sock: socket.socket, reader: FrameReader) -> dict[str, Any] | None:
    frames: list[Frame] = []
    while not frames:
        data = sock.recv(65536)
        if not data:
            return None
        frames = reader.feed(data)
    return frames[0].message


def server_answers(socket_path: Path) -> bool:
    """Whether a grid server of this protocol version answers on `socket_path` (a blocking handshake)."""
    connection = _connect(socket_path)
    if connection is not None:
        connection[0].close()
    return connection is not None


def server_status(socket_path: Path) -> dict[str, Any] | None:
    """What the grid server reports about itself (rpc_methods.py, `status`), or None if none answers."""
    connection = _connect(socket_path)
    if connection is None:
        return None
    sock, reader = connection
    with sock:
        try:
            sock.sendall(encode_frame(request(1, "status", {})))
            reply = _receive(sock, reader)
        except (ConnectionError, TimeoutError):
            return None
    return reply.get("result") if reply is not None else None


def ensure_grid_server(node: NodeDirectory, cache_size: int | None) -> Path:
    """The socket of the node's grid server, started (with this cache size) if none runs."""
    files = ServerFiles.of(node)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if server_answers(files.socket):
            return files.socket
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerStartError(
                f"no grid server answered within {SERVER_START_TIMEOUT:g} s (one that is finishing its uploads "
                f"holds {files.pid}); log: {files.log}"
            )
        if lock_held(files.pid):  # a server on its way out: wait for it rather than start one that cannot run
            time.sleep(RETRY_PAUSE)
            continue
        outcome = start_daemon(files.log, lambda report: _run_server(node, cache_size, report), remaining)
        if outcome.word in ("ready", "busy"):
            continue
        problem = "did not get ready in time" if outcome.word == "timeout" else "failed to start"
        lines = "".join(f"\n  {line}" for line in outcome.log_tail())
        raise ServerStartError(f"the grid server {problem}; log: {files.log}{lines}")


def _run_server(node: NodeDirectory, cache_size: int | None, report: Report) -> int:
    """In the daemon: the server itself (imported here, so the mounting process never loads the grid code)."""
    from grid_server.filesystem import FilesystemOptions
    from grid_server.service import run_grid_server

    return run_grid_server(node, cache_size if cache_size is not None else FilesystemOptions.cache_size, report)


async def start_grid_server_apart(node: NodeDirectory, cache_size: int | None) -> None:
    """`ensure_grid_server` run in a new process (`python -m fuse_client.grid_server_process`), for a mount that
    is already serving: its process has threads and holds the FUSE device, so a daemon forked from it could
    inherit both (and a FUSE descriptor left open in the server would keep a dead mount's connection alive)."""
    command = [sys.executable, "-m", "fuse_client.grid_server_process", str(node.path)]
    if cache_size is not None:
        command += ["--cache-size", str(cache_size)]
    # Run from the directory this code was loaded from, so the new server runs this code too (`-m` looks in the
    # working directory first), not whatever an installation elsewhere would find.
    here = Path(__file__).resolve().parent.parent
    result = await trio.run_process(command, cwd=here, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines() or [f"status {result.returncode}"]
        last = f" (its log ends: {lines[-1].strip()})" if len(lines) > 1 else ""
        raise ServerStartError(f"starting the grid server failed: {lines[0]}{last}")


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuse_client.grid_server_process", description="Find or start a node's grid server."
    )
    parser.add_argument("node_directory", metavar="NODEDIR", type=Path)
    parser.add_argument("--cache-size", type=int, metavar="BYTES")
    args = parser.parse_args()
    try:
        ensure_grid_server(NodeDirectory(args.node_directory), args.cache_size)
    except LafsError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
