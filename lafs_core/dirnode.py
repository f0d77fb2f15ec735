"""Tahoe directories (`src/allmydata/dirnode.py`): the plaintext of the file behind a directory cap.

A directory is `concat(ns(entry) for name in sorted(names))` with
`entry = ns(name_utf8_nfc) + ns(ro_uri) + ns(rwcapdata) + ns(metadata_json)`. In a mutable directory the
child's write cap is stored encrypted: `salt16 + AES-CTR(key)(rw_uri) + mac32`, where the salt is a hash of the
write cap itself (deterministic), the key mixes the salt with the directory's writekey, and the MAC uses
Tahoe's own HMAC variant (written, never checked). Immutable directories leave the field empty.

Entries read from a directory keep their original bytes; packing reuses them for entries nobody changed, so
unknown cap kinds and metadata keys (and Tahoe's exact JSON) survive a read-modify-write untouched.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from .caps import IMMUTABLE_PREFIX, READONLY_PREFIX, Cap, UnknownCap, parse_cap
from .crypto import aes_ctr
from .errors import FormatError
from .hashes import mutable_rwcap_key_hash, mutable_rwcap_salt_hash, tahoe_hmac
from .netstring import netstring, read_netstring, split_netstrings

Metadata = dict[str, Any]


def normalize(name: str) -> str:
    """Names are NFC-normalized going in and coming out, as Tahoe does."""
    return unicodedata.normalize("NFC", name)


@dataclass(frozen=True)
class DirEntry:
    """One child: its caps as strings (None when absent), its metadata, and its bytes as read, if unchanged."""

    rw_uri: str | None
    ro_uri: str | None
    metadata: Metadata = field(default_factory=dict)
    packed: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def cap(self) -> Cap:
        """The strongest usable cap: the write cap if known, else the read cap."""
        text = self.rw_uri or self.ro_uri
        if text is None:
            return UnknownCap("")
        return parse_cap(text, allow_prefixes=True)

    def with_metadata(self, metadata: Metadata) -> DirEntry:
        return replace(self, metadata=metadata, packed=None)


def child_entry(cap: Cap | str, metadata: Metadata | None = None) -> DirEntry:
    """A new entry for a child cap: write cap kept only for writeable children."""
    if isinstance(cap, str):
        cap = parse_cap(cap, allow_prefixes=True)
    if isinstance(cap, UnknownCap):
        return DirEntry(None, cap.text or None, dict(metadata or {}))
    rw = None if cap.is_readonly else cap.to_string()
    return DirEntry(rw, cap.readonly().to_string(), dict(metadata or {}))


# --- encryption of child write caps ------------------------------------------------------------------------------
def encrypt_rw_uri(dir_writekey: bytes, rw_uri: bytes) -> bytes:
    salt = mutable_rwcap_salt_hash(rw_uri)
    key = mutable_rwcap_key_hash(salt, dir_writekey)
    crypttext = aes_ctr(key, rw_uri)
    return salt + crypttext + tahoe_hmac(key, salt + crypttext)


def decrypt_rwcapdata(dir_writekey: bytes, data: bytes) -> bytes:
    if len(data) < 48:
        raise FormatError(f"encrypted child write cap of {len(data)} bytes is too short")
    salt, crypttext = data[:16], data[16:-32]
    return aes_ctr(mutable_rwcap_key_hash(salt, dir_writekey), crypttext)


def strip_prefix_for_ro(ro_uri: str, deep_immutable: bool) -> str:
    """A read cap slot implies read-only; `imm.` is implied only inside an immutable directory."""
    if ro_uri.startswith(IMMUTABLE_PREFIX):
        return ro_uri[len(IMMUTABLE_PREFIX) :] if deep_immutable else ro_uri
    if ro_uri.startswith(READONLY_PREFIX):
        return ro_uri[len(READONLY_PREFIX) :]
    return ro_uri


# --- packing ---------------------------------------------------------------------------------------------------
def pack_entry(name: str, entry: DirEntry, dir_writekey: bytes | None, deep_immutable: bool = False) -> bytes:
    """The netstring-wrapped bytes of one entry (reusing the bytes it was read with, if unchanged)."""
    if entry.packed is not None:
        return entry.packed
    rw_uri = (entry.rw_uri or "").encode("utf-8")
    if deep_immutable and rw_uri:
        raise FormatError(f"child {name!r} has a write cap and cannot go into an immutable directory")
    ro_uri = strip_prefix_for_ro(entry.ro_uri or "", deep_immutable).encode("utf-8")
    rwcapdata = encrypt_rw_uri(dir_writekey, rw_uri) if dir_writekey is not None else b""
    metadata = json.dumps(entry.metadata).encode("utf-8")  # Python's json, like Tahoe: ", " and ": ", ASCII
    body = netstring(normalize(name).encode("utf-8")) + netstring(ro_uri) + netstring(rwcapdata) + netstring(metadata)
    return netstring(body)


def pack_directory(children: dict[str, DirEntry], dir_writekey: bytes | None, deep_immutable: bool = False) -> bytes:
    """Serialize children (names NFC-normalized, sorted by code point). `dir_writekey` is None when immutable."""
    normalized = {normalize(name): entry for name, entry in children.items()}
    if len(normalized) != len(children):
        raise FormatError("two child names are equal after NFC normalization")
    return b"".join(pack_entry(name, normalized[name], dir_writekey, deep_immutable) for name in sorted(normalized))


def unpack_directory(data: bytes, dir_writekey: bytes | None, mutable: bool = True) -> dict[str, DirEntry]:
    """Parse a directory's plaintext. With `dir_writekey` the child write caps are decrypted; without, they
    are left out (a read-only view). Malformed framing, names or metadata raise FormatError."""
    children: dict[str, DirEntry] = {}
    pos = 0
    while pos < len(data):
        start = pos
        body, pos = read_netstring(data, pos)
        name_bytes, ro_bytes, rwcapdata, metadata_bytes = split_netstrings(body, required=4)
        if not mutable and rwcapdata:
            raise FormatError("an immutable directory entry carries a write cap")
        try:
            name = normalize(name_bytes.decode("utf-8"))
            metadata = json.loads(metadata_bytes.decode("utf-8"))
            ro_uri = ro_bytes.decode("utf-8").rstrip(" ") or None
            rw_uri = None
            if dir_writekey is not None and rwcapdata:
                rw_uri = decrypt_rwcapdata(dir_writekey, rwcapdata).decode("utf-8").rstrip(" ") or None
        except (ValueError, RecursionError) as exc:  # bad UTF-8, bad or absurdly nested JSON
            raise FormatError(f"malformed directory entry: {exc}") from None
        if not isinstance(metadata, dict):
            raise FormatError("directory entry metadata is not a JSON object")
        if name in children:
            raise FormatError(f"directory lists {name!r} twice")
        # Bytes can be reused on repacking only when they would be produced again with the same key.
        reusable = dir_writekey is not None or not mutable
        children[name] = DirEntry(rw_uri, ro_uri, metadata, data[start:pos] if reusable else None)
    return children


# --- metadata --------------------------------------------------------------------------------------------------
def update_metadata(old: Metadata | None, new: Metadata | None, now: float) -> Metadata:
    """Tahoe's link-time maintenance (`dirnode.update_metadata`).

    `new` (if given) replaces the user metadata but never the `tahoe` key; `tahoe.linkcrtime` is kept (or taken
    from a legacy `ctime`) and `tahoe.linkmotime` set to `now`.
    """
    metadata = dict(old or {})
    old_ctime = metadata.get("ctime")
    if new is not None:
        replacement = {key: value for key, value in new.items() if key != "tahoe"}
        if "tahoe" in metadata:
            replacement["tahoe"] = metadata["tahoe"]
        metadata = replacement
    system = dict(metadata.get("tahoe", {}))
    if "linkcrtime" not in system:
        system["linkcrtime"] = old_ctime if old_ctime is not None else now
    system["linkmotime"] = now
    metadata["tahoe"] = system
    return metadata
