"""Which names of hard-linked files missed a change: the pending link sweeps, sans-IO.

The names of a hard-linked file share a cap and a link identity with its count of names in their entries'
metadata (metadata.py). A change of the file (the first write, which gives it a mutable cap; a name removed, which
changes the count; its attributes) re-records the names the mount knows; a name it never looked up keeps the old
entry. When a change leaves such names behind, the filesystem records a `LinkSweep` for the file's identity: the
caps a name that missed changes may hold (`replaced`), and the cap and metadata the file has now. A name found
with that identity is stale when it holds a replaced cap, or the current cap with an older ctime; any other cap is
content another client wrote at that name, which is left alone. The walk of link_sweep.py finds the names; every
lookup of a stale name (the walk's or the kernel's) brings it up to date on the way.

A later change of the same file while its sweep is pending merges into it: the cap it replaced joins `replaced`,
and its state becomes the one to give. The filesystem journals each record this core returns (in the line of the
change it follows) before applying it, and replays them after a restart, so a sweep resumes where the last run
left it; `records` is what a compacted journal keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lafs_core.caps import Cap

from .journal_records import LinkSweep, LinkSwept, Record, Together
from .metadata import change_time_ns, link_count, link_identity


class StaleLinks:
    """The pending sweeps of one root, by link identity."""

    def __init__(self) -> None:
        self._pending: dict[str, LinkSweep] = {}

    def new_sweep(self, identity: str, replaced: Iterable[str], cap: str, metadata: Mapping[str, Any]) -> LinkSweep:
        """The record of a change of the file `identity` that names the mount does not know missed: with the one
        pending for it merged in. `apply` it once the journal took it."""
        earlier = self._pending.get(identity)
        caps = set(replaced)
        if earlier is not None:
            caps.update(earlier.replaced)
            caps.add(earlier.cap)
        caps.discard(cap)
        return LinkSweep(identity, tuple(sorted(caps)), cap, dict(metadata))

    def apply(self, record: LinkSweep | LinkSwept) -> None:
        if isinstance(record, LinkSweep):
            self._pending[record.identity] = record
        else:
            self._pending.pop(record.identity, None)

    def replay(self, records: Iterable[Record]) -> None:
        for record in records:
            if isinstance(record, LinkSweep | LinkSwept):
                self.apply(record)
            elif isinstance(record, Together) and record.sweep is not None:
                self.apply(record.sweep)

    def stale(self, cap: Cap | None, metadata: Mapping[str, Any]) -> LinkSweep | None:
        """The pending sweep an entry (or an inode made from one) with this cap and metadata missed, if any."""
        identity = link_identity(metadata)
        sweep = self._pending.get(identity) if identity is not None else None
        if sweep is None or cap is None:
            return None
        held = cap.to_string()
        if held in sweep.replaced:
            return sweep
        if held == sweep.cap and change_time_ns(metadata) < change_time_ns(sweep.metadata):
            return sweep
        return None

    def pending(self) -> dict[str, LinkSweep]:
        """The pending sweeps by identity, as they are now (a copy: a walk serves these)."""
        return dict(self._pending)

    def current(self, sweep: LinkSweep) -> bool:
        """Whether `sweep` is still its identity's pending sweep (no later change merged into it)."""
        return self._pending.get(sweep.identity) is sweep

    @staticmethod
    def names_wanted(sweep: LinkSweep) -> int:
        """How many names of the file a walk is to find: its count of names after the change."""
        return link_count(sweep.metadata)

    def records(self) -> list[Record]:
        """The pending sweeps as records, for a compacted journal."""
        return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, identity: object) -> bool:
        return identity in self._pending
