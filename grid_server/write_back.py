"""The write-back core: which directory entries are still to reach the grid, and what replaying the journal rebuilds.

Sans-IO (no trio, no files): the filesystem journals the record a method returns or takes, and tells the core what
its uploads and publishes did; the same methods replay a journal, so a restarted server reaches the state the last
one had when it stopped, and the tests can check that from any crash point.

Each entry (directory cap string, name) has at most one pending change, the latest: a `Link` (the name is to show
this entry) or a `Removal`. A link whose content is still local waits for that local file's upload; `Uploaded`
resolves every link waiting for it to the cap the content got, and a link recorded later for the same local file
(written again) waits for the next upload. A change is ready to publish when it waits for nothing; `Published`
drops the changes published, unless a newer change for the same entry came meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from .journal_records import Change, Link, Published, Record, Removal, Together, Uploaded

EntryKey = tuple[str, str]  # (directory cap string, name)

_NOTHING: Mapping[str, Change] = MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """What the core holds, comparable: the pending changes by entry."""

    changes: tuple[Change, ...]


class WriteBack:
    """The pending changes of one root, and the local files their links wait for."""

    def __init__(self) -> None:
        self._seq = 0  # the last sequence number given out (or replayed)
        self._pending: dict[str, dict[str, Change]] = {}  # directory → name → its change; no empty inner dicts
        self._waiting: dict[str, set[EntryKey]] = {}  # local file id → the entries whose link waits for it
        self._count = 0

    # --- reading --------------------------------------------------------------------------------------------
    def change(self, directory: str, name: str) -> Change | None:
        return self._pending.get(directory, _NOTHING).get(name)

    def pending_in(self, directory: str) -> Mapping[str, Change]:
        """The directory's pending changes by name (a live view: do not keep it across changes)."""
        return self._pending.get(directory, _NOTHING)

    def ready(self, directory: str) -> dict[str, Change]:
        """The directory's changes that can be published now: removals, and links whose content is on the grid."""
        return {
            name: change
            for name, change in self.pending_in(directory).items()
            if not isinstance(change, Link) or change.local is None
        }

    def directories(self) -> list[str]:
        """The directories that have pending changes."""
        return list(self._pending)

    def waiting_locals(self) -> set[str]:
        """The local files some pending link waits for: content the grid lacks, which must stay on disk."""
        return set(self._waiting)

    def count(self) -> int:
        """How many changes are pending."""
        return self._count

    def snapshot(self) -> Snapshot:
        changes = (change for names in self._pending.values() for change in names.values())
        return Snapshot(tuple(sorted(changes, key=lambda change: (change.directory, change.name))))

    # --- new changes ----------------------------------------------------------------------------------------
    def new_link(
        self, directory: str, name: str, kind: str, metadata: Mapping[str, Any], cap: str | None, local: str | None
    ) -> Link:
        """The record of a new link, with the next sequence number; `apply` it once the journal took it."""
        return Link(self._next_seq(), directory, name, kind, dict(metadata), cap, local)

    def new_removal(self, directory: str, name: str) -> Removal:
        return Removal(self._next_seq(), directory, name)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- what happened --------------------------------------------------------------------------------------
    def apply(self, change: Change) -> None:
        """Make `change` the entry's pending change, replacing any earlier one."""
        names = self._pending.setdefault(change.directory, {})
        previous = names.get(change.name)
        if previous is None:
            self._count += 1
        else:
            self._stop_waiting(previous)
        names[change.name] = change
        self._seq = max(self._seq, change.seq)
        if isinstance(change, Link) and change.local is not None:
            # Recorded while the local file held content the grid lacks: the link waits for that file's next
            # upload, even when an earlier upload resolved an earlier link to it (the file was written again).
            self._waiting.setdefault(change.local, set()).add((change.directory, change.name))

    def mark_uploaded(self, local: str, cap: str) -> Uploaded:
        """The local file's content is on the grid as `cap`: the links waiting for it become ready."""
        for directory, name in self._waiting.pop(local, ()):
            link = self._pending[directory][name]
            assert isinstance(link, Link)
            self._pending[directory][name] = replace(link, cap=cap, local=None)
        return Uploaded(local, cap)

    def mark_published(self, changes: Iterable[Change]) -> Published:
        """These changes are on the grid: drop each one still pending (not replaced by a newer one since)."""
        published = []
        for change in changes:
            current = self.change(change.directory, change.name)
            if current is not None and current.seq == change.seq:
                self._drop(current)
                published.append(change.seq)
        return Published(tuple(published))

    def forget(self, change: Change) -> None:
        """Drop a pending change that cannot be carried out (a replayed one naming a cap that no longer parses):
        its entry keeps what the grid has."""
        if self.change(change.directory, change.name) == change:
            self._drop(change)

    def forget_waiting_for(self, local: str) -> list[Change]:
        """Drop the links waiting for a local file whose content is gone from the disk (as `forget`); the changes
        dropped, for the log."""
        dropped = [self._pending[directory][name] for directory, name in self._waiting.get(local, ())]
        for change in dropped:
            self._drop(change)
        return dropped

    def _drop(self, change: Change) -> None:
        names = self._pending[change.directory]
        del names[change.name]
        if not names:
            del self._pending[change.directory]
        self._stop_waiting(change)
        self._count -= 1

    def _stop_waiting(self, change: Change) -> None:
        if isinstance(change, Link) and change.local is not None:
            entries = self._waiting[change.local]
            entries.discard((change.directory, change.name))
            if not entries:
                del self._waiting[change.local]

    # --- replay -----------------------------------------------------------------------------------------------
    def replay(self, records: Iterable[Record]) -> None:
        """Rebuild the state from a journal (this core must be new)."""
        assert self._count == 0 and self._seq == 0, "replay into a core that already holds changes"
        recorded: dict[int, Change] = {}  # every change by sequence number, for the published records naming them
        for record in records:
            match record:
                case Link() | Removal():
                    self.apply(record)
                    recorded[record.seq] = record
                case Together():
                    for change in record.changes:
                        self.apply(change)
                        recorded[change.seq] = change
                case Uploaded():
                    self.mark_uploaded(record.local, record.cap)
                case Published():
                    self.mark_published(recorded[seq] for seq in record.seqs if seq in recorded)

    # --- invariants -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError unless the core is consistent."""
        seqs: set[int] = set()
        waiting: dict[str, set[EntryKey]] = {}
        count = 0
        for directory, names in self._pending.items():
            assert names, f"an empty change list is kept for {directory}"
            for name, change in names.items():
                count += 1
                assert (change.directory, change.name) == (directory, name), f"{change} is filed under {name}"
                assert 0 < change.seq <= self._seq, f"{change} has a sequence number not given out"
                assert change.seq not in seqs, f"two pending changes have sequence number {change.seq}"
                seqs.add(change.seq)
                if isinstance(change, Link):
                    assert change.cap is not None or change.local is not None, f"{change} has no content"
                    if change.local is not None:
                        waiting.setdefault(change.local, set()).add((directory, name))
        assert count == self._count, f"{self._count} changes counted, {count} held"
        assert waiting == self._waiting, "the index of links waiting for uploads is out of step"
