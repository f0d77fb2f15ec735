"""Everything reachable from a directory, each object once: what deep-check checks and lease renewal renews.

Tahoe directories may link one object under several names, and may contain loops (a directory linked inside
itself, a read-only cap of an ancestor), so objects are remembered by storage index: a write cap and a read cap
of one directory are one object. Literal objects have no storage index and are remembered by their cap.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from ..caps import Cap, ChkVerifierCap, DirectoryCap, MutableVerifierCap
from ..errors import LafsError
from .directory import read_directory
from .grid import Grid, NoServerAnsweredError

log = logging.getLogger("blackmatch.traverse")

Path = tuple[str, ...]
"""Names from the starting directory down to an object; () is the starting object itself."""


def _identity(cap: Cap) -> bytes | str:
    return cap.storage_index if cap.storage_index is not None else cap.to_string()


async def walk(
    grid: Grid, root: Cap, unlisted: Callable[[Path, LafsError], object] | None = None
) -> AsyncIterator[tuple[Path, Cap]]:
    """Yield (path, cap) for `root` and every object reachable from it, depth first, names in sorted order.

    A directory's children are read only after the caller has had the directory (so a check of it comes first).
    A directory that cannot be read is reported to `unlisted` (path, why) and its children skipped, so one
    unrecoverable directory does not stop the walk; when no server answers at all the walk stops with that error.
    """
    seen: set[bytes | str] = set()
    pending: list[tuple[Path, Cap]] = [((), root)]
    while pending:
        path, cap = pending.pop()
        identity = _identity(cap)
        if identity in seen:
            continue
        seen.add(identity)
        yield path, cap
        if not isinstance(cap, DirectoryCap) or isinstance(cap.file_cap, ChkVerifierCap | MutableVerifierCap):
            continue  # a verify cap of a directory cannot list it
        try:
            children = await read_directory(grid, cap)
        except NoServerAnsweredError:
            raise
        except LafsError as exc:
            log.info("directory %s could not be listed: %s", "/".join(path) or "<root>", exc)
            if unlisted is not None:
                unlisted(path, exc)
            continue
        for name in sorted(children, reverse=True):
            pending.append(((*path, name), children[name].cap))
