"""Turning configured servers into StorageServer objects: GBS clients for announcements, share stores for
local directories."""

from __future__ import annotations

import logging

from .gbs_client import GbsStorageServer
from .grid import Grid
from .local_client import LocalStorageServer
from .nodedir import NodeDirectory, ServerSpec
from .server_api import StorageServer

log = logging.getLogger("blackmatch.servers")


def open_server(spec: ServerSpec) -> StorageServer | None:
    """The server for one spec, or None if it cannot be reached by any protocol blackmatch speaks."""
    if spec.local_path is not None:
        return LocalStorageServer(spec.local_path, server_id=spec.server_id, nickname=spec.nickname)
    ann = spec.announcement or {}
    if not ann.get("anonymous-storage-NURLs"):
        log.warning(
            "server %s announces no HTTP storage (NURL); Foolscap-only servers are not supported", spec.nickname
        )
        return None
    return GbsStorageServer.from_announcement(spec.server_id, ann)


def open_servers(specs: list[ServerSpec]) -> list[StorageServer]:
    return [server for server in map(open_server, specs) if server is not None]


def open_grid(node: NodeDirectory) -> Grid:
    """The grid a node directory describes: its servers, secrets and encoding."""
    return Grid(
        open_servers(node.servers()),
        convergence=node.convergence_secret(),
        lease_secret=node.lease_secret(),
        encoding=node.encoding(),
        mutable_format=node.mutable_format(),
    )
