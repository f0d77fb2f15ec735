"""Where shares go: Tahoe's permuted ring and servers-of-happiness (`immutable/happiness_upload.py`).

Each storage index orders the servers by SHA-1(storage index + permutation seed), so every client agrees where
to look first. Happiness is the size of a maximum matching between servers and the shares they hold: the
number of servers that can each contribute a distinct share, which bounds how many servers can fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from ..hashes import permute_server_hash
from .server_api import StorageServer

S = TypeVar("S", bound=StorageServer)


def permuted(servers: Iterable[S], storage_index: bytes) -> list[S]:
    """Servers in the order of this storage index's ring."""
    return sorted(servers, key=lambda s: (permute_server_hash(storage_index, s.permutation_seed), s.server_id))


def happiness(placements: Mapping[str, Iterable[int]]) -> int:
    """Maximum matching of servers to distinct shares (server id -> share numbers it holds)."""
    owner: dict[int, str] = {}

    def augment(server: str, seen: set[int]) -> bool:
        for shnum in placements[server]:
            if shnum in seen:
                continue
            seen.add(shnum)
            if shnum not in owner or augment(owner[shnum], seen):
                owner[shnum] = server
                return True
        return False

    return sum(augment(server, set()) for server in placements)


def by_server(shares: Mapping[int, Iterable[str]]) -> dict[str, set[int]]:
    """Server id -> share numbers it holds, from share number -> server ids (what `happiness` takes)."""
    held: dict[str, set[int]] = {}
    for shnum, servers in shares.items():
        for server_id in servers:
            held.setdefault(server_id, set()).add(shnum)
    return held


def spread(
    shnums: Sequence[int], servers: Sequence[str], load: Mapping[str, int] | None = None
) -> dict[str, list[int]]:
    """Assign shares to servers one at a time, least-loaded first, ties in ring order."""
    counts = {server: (load or {}).get(server, 0) for server in servers}
    assignment: dict[str, list[int]] = {server: [] for server in servers}
    order = {server: i for i, server in enumerate(servers)}
    for shnum in shnums:
        server = min(servers, key=lambda s: (counts[s], order[s]))
        assignment[server].append(shnum)
        counts[server] += 1
    return {server: shares for server, shares in assignment.items() if shares}
