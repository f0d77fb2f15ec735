"""The write-back journal's records, typed, with the one parser and the one serializer of their JSON form.

A journal line is one JSON object. Its form is fixed by the journals earlier versions left on users' disks (they
must replay after an upgrade):

    {"op": "set", "seq": N, "dir": DIRCAP, "name": NAME}                         a removal of NAME
    {"op": "set", "seq": N, "dir": DIRCAP, "name": NAME, "kind": K, "meta": {...},
     "cap": CAP or null, "local": ID or null}                                     NAME linked to an entry
    {"op": "uploaded", "local": ID, "cap": CAP}                                   a local file's content is on the grid
    {"op": "published", "seqs": [N, ...]}                                         those changes are on the grid
    {"op": "together", "changes": [SET, SET, ...], "sweep": SWEEP}                 "set" records made as one (and
                                                                                  optionally a sweep with them)
    {"op": "sweep", "id": ID, "replaced": [CAP, ...], "cap": CAP, "meta": {...}}  names of link ID to bring up to date
    {"op": "swept", "id": ID}                                                     every name of link ID was found

A link's `local` names the local file whose content is not on the grid yet (then `cap` is the version it started
from, or null for a new file); an `uploaded` record gives such links the cap their content got. A `together` record
is one line, so a replay applies all its changes or (a torn last line) none: a RENAME_EXCHANGE's two links. A
`sweep` record (stale_links.py) holds the whole state its names are to get; a later one for the same identity
replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Link:
    """`name` in the directory `directory` (a cap string) is to become this entry."""

    seq: int
    directory: str
    name: str
    kind: str
    metadata: Mapping[str, Any]
    cap: str | None  # the content on the grid (for content still local: the version it started from)
    local: str | None  # the local file holding content the grid does not have yet


@dataclass(frozen=True)
class Removal:
    """`name` in the directory `directory` is to go."""

    seq: int
    directory: str
    name: str


Change = Link | Removal


@dataclass(frozen=True)
class Uploaded:
    """The local file `local` is on the grid as `cap`: links waiting for it can be published."""

    local: str
    cap: str


@dataclass(frozen=True)
class Published:
    """The changes with these sequence numbers are on the grid."""

    seqs: tuple[int, ...]


@dataclass(frozen=True)
class LinkSweep:
    """A hard-linked file (link identity `identity`) changed while this mount knew fewer of its names than it has: a
    name of it found holding one of the caps in `replaced`, or `cap` with an older ctime than `metadata` has, missed
    the change and is to get `cap` and `metadata`."""

    identity: str
    replaced: tuple[str, ...]
    cap: str
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class LinkSwept:
    """Every name of the hard-linked file `identity` was found (or the whole tree walked) since its last sweep."""

    identity: str


@dataclass(frozen=True)
class Together:
    """Changes made as one: after a crash, all of them or none are pending (a RENAME_EXCHANGE swaps two names). A
    change of a hard-linked file carries the sweep for its names not known in the same line, so that no crash
    leaves the names known changed and the others without a sweep to follow."""

    changes: tuple[Change, ...]
    sweep: LinkSweep | None = None


Record = Link | Removal | Uploaded | Published | Together | LinkSweep | LinkSwept


class MalformedRecord(ValueError):
    """A journal line that is JSON but not a record this version knows."""


def serialize_record(record: Record) -> dict[str, Any]:
    """The record's JSON form, as every version has written it."""
    match record:
        case Link():
            return {
                "op": "set",
                "seq": record.seq,
                "dir": record.directory,
                "name": record.name,
                "kind": record.kind,
                "meta": dict(record.metadata),
                "cap": record.cap,
                "local": record.local,
            }
        case Removal():
            return {"op": "set", "seq": record.seq, "dir": record.directory, "name": record.name}
        case Uploaded():
            return {"op": "uploaded", "local": record.local, "cap": record.cap}
        case Published():
            return {"op": "published", "seqs": list(record.seqs)}
        case Together():
            changes = [serialize_record(change) for change in record.changes]
            if record.sweep is None:
                return {"op": "together", "changes": changes}
            return {"op": "together", "changes": changes, "sweep": serialize_record(record.sweep)}
        case LinkSweep():
            return {
                "op": "sweep",
                "id": record.identity,
                "replaced": list(record.replaced),
                "cap": record.cap,
                "meta": dict(record.metadata),
            }
        case LinkSwept():
            return {"op": "swept", "id": record.identity}


def parse_record(raw: object) -> Record:
    """The record a journal line's JSON holds; MalformedRecord if it holds none (a damaged or foreign line)."""
    if not isinstance(raw, dict):
        raise MalformedRecord("not a JSON object")
    op = raw.get("op")
    if op == "set":
        seq, directory, name = _field(raw, "seq", int), _field(raw, "dir", str), _field(raw, "name", str)
        if "kind" not in raw:
            return Removal(seq, directory, name)
        cap, local = _optional(raw, "cap"), _optional(raw, "local")
        if cap is None and local is None:
            raise MalformedRecord("a link with neither a cap nor local content")
        return Link(seq, directory, name, _field(raw, "kind", str), _field(raw, "meta", dict), cap, local)
    if op == "uploaded":
        return Uploaded(_field(raw, "local", str), _field(raw, "cap", str))
    if op == "published":
        seqs = _field(raw, "seqs", list)
        if not all(type(seq) is int for seq in seqs):
            raise MalformedRecord("published: seqs are not all integers")
        return Published(tuple(seqs))
    if op == "together":
        changes: list[Change] = []
        for item in _field(raw, "changes", list):
            change = parse_record(item)
            if not isinstance(change, Link | Removal):
                raise MalformedRecord("together: holds a record that is not a change")
            changes.append(change)
        if not changes:
            raise MalformedRecord("together: no changes")
        sweep = parse_record(raw["sweep"]) if "sweep" in raw else None
        if sweep is not None and not isinstance(sweep, LinkSweep):
            raise MalformedRecord("together: holds a sweep that is not one")
        return Together(tuple(changes), sweep)
    if op == "sweep":
        replaced = _field(raw, "replaced", list)
        if not all(type(cap) is str for cap in replaced):
            raise MalformedRecord("sweep: replaced caps are not all strings")
        return LinkSweep(_field(raw, "id", str), tuple(replaced), _field(raw, "cap", str), _field(raw, "meta", dict))
    if op == "swept":
        return LinkSwept(_field(raw, "id", str))
    raise MalformedRecord(f"unknown op {op!r}")


def _field(raw: dict[str, Any], key: str, kind: type[T]) -> T:
    value = raw.get(key)
    if type(value) is not kind:
        raise MalformedRecord(f"{key} is not a {kind.__name__}")
    return value


def _optional(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and type(value) is not str:
        raise MalformedRecord(f"{key} is neither a string nor null")
    return value
