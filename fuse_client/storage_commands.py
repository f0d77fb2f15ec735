"""`blackmatch storage create DIR` and `blackmatch storage run DIR`: a Tahoe-compatible storage server.

`create` makes the server directory and prints its NURL; DIR/servers.yaml is the entry clients add to their
`private/servers.yaml` (or pass to `create-node --servers`). `run` serves GBS until SIGTERM or SIGINT, then
exits 0; uploads that were in progress are discarded and the next start wipes their leftovers. Alongside, the
lease checker passes over the shares and, with `[storage] expire.enabled`, deletes expired ones.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from lafs_core.storage.gbs_server import GbsServer
from lafs_core.storage.lease_checker import LeaseChecker
from lafs_core.storage.server_dir import ServerDir, ServerDirError, create_server_dir, load_server_dir, parse_listen
from lafs_core.storage.share_store import ShareStore

log = logging.getLogger("blackmatch.storage")


def add_storage_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    storage = subparsers.add_parser("storage", help="run a storage server that Tahoe-LAFS clients can use")
    commands = storage.add_subparsers(dest="storage_command", metavar="STORAGECOMMAND", required=True)

    create = commands.add_parser("create", help="make a storage server directory")
    create.add_argument("directory", metavar="DIR", type=Path, help="the directory to make (new, or empty)")
    create.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1 and a free port chosen now)",
    )
    create.add_argument("--hostname", metavar="H", help="host name clients connect to (default: the listen host)")
    create.set_defaults(handler=create_command)

    run = commands.add_parser("run", help="serve a storage server directory until SIGTERM or SIGINT")
    run.add_argument("directory", metavar="DIR", type=Path, help="a directory made by storage create")
    run.set_defaults(handler=run_command)


def create_command(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    server = create_server_dir(args.directory, host, port, args.hostname)
    print(server.nurl)
    print(f"clients: add {server.path / 'servers.yaml'} to their private/servers.yaml", file=sys.stderr)
    return 0


def run_command(args: argparse.Namespace) -> int:
    server = load_server_dir(args.directory)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="blackmatch storage: %(message)s")
    try:
        trio.run(_serve_until_signalled, server)
    except BaseExceptionGroup as group:
        # trio reports a failure inside a nursery as a group; the command line prints plain errors in one line.
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
            raise ServerDirError(f"cannot serve on {server.listen_host}:{server.listen_port}: {leaves[0]}") from None
        raise
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def _serve_until_signalled(server: ServerDir) -> None:
    store = ShareStore(server.store_root, nodeid=server.tubid)
    gbs = GbsServer(store, server.swissnum.encode("ascii"))
    checker = LeaseChecker(gbs.call_store, store.shares_dir, server.lease_checker_state, server.expiry)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            address = (server.listen_host, server.listen_port)
            port = await nursery.start(gbs.serve, server.cert_pem, server.key_pem, *address)
            host = f"[{server.listen_host}]" if ":" in server.listen_host else server.listen_host
            log.info("listening on https://%s:%d (server %s)", host, port, server.server_id)
            log.info("lease checker: %s", server.expiry.describe())
            nursery.start_soon(checker.run)
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
