"""Which of a node's storage servers answer: what `blackmatch mount` asks before it mounts, so that a grid nobody
can reach is said on the terminal at once, instead of a mount whose every listing fails with EIO.

Each server is asked its version (GBS `GET /version`), all at once, for at most PROBE_TIMEOUT seconds. A local
share store always answers. Servers are named by nickname (or a short server id) and host:port, never by NURL:
a NURL carries the server's swissnum, a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from lafs_core.grid.gbs_client import GbsStorageServer
from lafs_core.grid.grid import gather_per_server
from lafs_core.grid.nodedir import NodeDirectory
from lafs_core.grid.server_api import StorageServer
from lafs_core.grid.servers import open_servers

PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Silent:
    """A server that did not answer, and why (one line, as the storage client said it)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Probe:
    answering: int
    silent: list[Silent]


def server_name(server: StorageServer) -> str:
    """How to name a server to the user: nickname or short id, and where it is."""
    name = server.nickname if server.nickname != server.server_id else server.server_id[:12]
    if isinstance(server, GbsStorageServer):
        host = f"[{server.nurl.host}]" if ":" in server.nurl.host else server.nurl.host
        return f"{name} ({host}:{server.nurl.port})"
    return name


def probe_servers(node: NodeDirectory, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Ask every server of `node` at once whether it answers (a local share store always does)."""
    servers = open_servers(node.servers())
    remote = [server for server in servers if isinstance(server, GbsStorageServer)]

    async def ask() -> dict[str, object]:
        try:
            return await gather_per_server(remote, lambda server: server.get_version(), timeout)
        finally:
            for server in remote:
                await server.aclose()

    answers = trio.run(ask) if remote else {}
    silent = [
        Silent(server_name(server), _reason(server, answers[server.server_id]))
        for server in remote
        if isinstance(answers[server.server_id], Exception)
    ]
    return Probe(len(servers) - len(silent), sorted(silent, key=lambda server: server.name))


def _reason(server: StorageServer, failure: object) -> str:
    """The failure without the server's nickname in front, which the storage client puts there."""
    return str(failure).removeprefix(f"{server.nickname}: ")
