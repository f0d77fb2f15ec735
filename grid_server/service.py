"""The grid server of one node directory, run in the calling process until no mount is left.

`run_grid_server` takes the server lock (an flock on `server.pid`, held for the server's life: a live server is
told from a stale pid file or socket by it), opens the node's grid and cache, listens on `server.sock`, and says
"ready" through `report`; or "busy" if another server holds the lock. Daemonizing is the caller's business
(fuse_client/background.py does it for `blackmatch mount`; `python -m grid_server` runs it in the foreground).

SIGTERM, SIGINT or SIGHUP stop it at once: whatever is not on the grid yet stays in the roots' journals and goes
up the next time a server opens them.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import trio

from lafs_core.errors import sole_exception
from lafs_core.grid.nodedir import NodeDirectory

from .failures import log_failure
from .node_state import open_node_state
from .pid_lock import PidLock
from .rpc_server import GridServer, listen
from .server_files import ServerFiles

log = logging.getLogger("blackmatch.server")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_grid_server(node: NodeDirectory, cache_size: int, report: Callable[[str], None]) -> int:
    files = ServerFiles.of(node)
    try:
        lock = PidLock(files.pid)
    except BlockingIOError:
        log.info("another grid server already serves %s", node.path)
        report("busy")
        return 0
    log.info("grid server for %s starting (pid %d)", node.path, os.getpid())
    try:
        trio.run(_serve, node, cache_size, files, report)
    except Exception as exc:
        log_failure(log, "the grid server failed", sole_exception(exc))
        return 1
    finally:
        files.socket.unlink(missing_ok=True)
        lock.release()
    log.info("grid server exiting")
    return 0


async def _serve(node: NodeDirectory, cache_size: int, files: ServerFiles, report: Callable[[str], None]) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.warning("%s: stopping; changes not uploaded yet stay queued", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            async with open_node_state(node, cache_size) as state:
                listener = await listen(files.socket)
                await GridServer(state).serve(listener, files.socket, lambda: report("ready"))
            nursery.cancel_scope.cancel()
