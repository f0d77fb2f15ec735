"""Capability strings (`src/allmydata/uri.py`): parse, format, and derive read-only and verify caps.

Every cap is a frozen dataclass whose `str()` is its canonical string. `parse_cap` recognises every kind
Tahoe 1.20 writes; a string with an unknown prefix becomes `UnknownCap` and is kept verbatim (a directory may
hold caps from a future Tahoe), while a known prefix with a malformed body raises CapError.

Caps found inside directories may carry `ro.` (alleged read-only) or `imm.` (alleged immutable) prefixes;
`parse_cap(..., allow_prefixes=True)` strips them and refuses a write cap under either prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from . import base32
from .errors import CapError
from .hashes import ssk_readkey_hash, ssk_storage_index_hash, storage_index_hash

READONLY_PREFIX = "ro."
IMMUTABLE_PREFIX = "imm."

_B128 = "([a-z2-7]{25}[aeimquy4])"
_B256 = "([a-z2-7]{51}[aq])"
_NUM = "(0|[1-9][0-9]*)"


def _b32(text: str, prefix: str) -> bytes:
    try:
        return base32.decode(text)
    except ValueError:
        raise _malformed(prefix, "is malformed (bad base32)") from None


class Cap:
    """Common behaviour of all caps."""

    prefix: ClassVar[str]
    is_mutable: ClassVar[bool] = False
    is_readonly: ClassVar[bool] = True
    is_directory: ClassVar[bool] = False

    def __str__(self) -> str:
        return self.to_string()

    def to_string(self) -> str:
        raise NotImplementedError

    def readonly(self) -> Cap:
        """The read-only form of this cap (itself when already read-only)."""
        return self

    def verifier(self) -> Cap | None:
        """The verify cap, or None for LIT caps (nothing is stored to verify)."""
        return None

    def abbreviated(self) -> str:
        """The cap's kind and an ellipsis (`URI:CHK:...`), to name it in a message: caps are secrets, never shown
        whole."""
        return f"{self.prefix}..." if self.prefix else "a cap of an unknown kind"

    if TYPE_CHECKING:  # declared for the checker only: a dataclass field of a subclass must not inherit it

        @property
        def storage_index(self) -> bytes | None:
            """The 16 bytes naming the cap's shares on servers, or None (LIT, unknown)."""


@dataclass(frozen=True)
class LiteralCap(Cap):
    """A file of at most 55 bytes whose content is the cap itself."""

    data: bytes
    prefix: ClassVar[str] = "URI:LIT:"

    def to_string(self) -> str:
        return self.prefix + base32.encode(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def storage_index(self) -> None:
        return None


@dataclass(frozen=True)
class ChkCap(Cap):
    """An immutable CHK file: the AES key plus the UEB hash that pins everything else."""

    key: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int
    prefix: ClassVar[str] = "URI:CHK:"

    def to_string(self) -> str:
        return (
            f"{self.prefix}{base32.encode(self.key)}:{base32.encode(self.ueb_hash)}:"
            f"{self.needed}:{self.total}:{self.size}"
        )

    @property
    def storage_index(self) -> bytes:
        return storage_index_hash(self.key)

    def verifier(self) -> ChkVerifierCap:
        return ChkVerifierCap(self.storage_index, self.ueb_hash, self.needed, self.total, self.size)


@dataclass(frozen=True)
class ChkVerifierCap(Cap):
    storage_index: bytes
    ueb_hash: bytes
    needed: int
    total: int
    size: int
    prefix: ClassVar[str] = "URI:CHK-Verifier:"

    def to_string(self) -> str:
        return (
            f"{self.prefix}{base32.encode(self.storage_index)}:{base32.encode(self.ueb_hash)}:"
            f"{self.needed}:{self.total}:{self.size}"
        )

    def verifier(self) -> ChkVerifierCap:
        return self


@dataclass(frozen=True)
class _MutableCap(Cap):
    """Fields shared by SDMF (`SSK`) and MDMF caps: a 16-byte key and the public-key fingerprint."""

    key: bytes
    fingerprint: bytes
    kind: ClassVar[str]  # "SSK" or "MDMF"


@dataclass(frozen=True)
class MutableWriteCap(_MutableCap):
    """Write cap of a mutable file; `key` is the writekey."""

    is_mutable: ClassVar[bool] = True
    is_readonly: ClassVar[bool] = False

    @property
    def writekey(self) -> bytes:
        return self.key

    @property
    def readkey(self) -> bytes:
        return ssk_readkey_hash(self.key)

    @property
    def storage_index(self) -> bytes:
        return ssk_storage_index_hash(self.readkey)

    def to_string(self) -> str:
        return f"{self.prefix}{base32.encode(self.key)}:{base32.encode(self.fingerprint)}"

    def readonly(self) -> MutableReadCap:
        return _READ_OF[type(self)](self.readkey, self.fingerprint)

    def verifier(self) -> MutableVerifierCap:
        return _VERIFY_OF[type(self)](self.storage_index, self.fingerprint)


@dataclass(frozen=True)
class MutableReadCap(_MutableCap):
    """Read cap of a mutable file; `key` is the readkey."""

    is_mutable: ClassVar[bool] = True

    @property
    def readkey(self) -> bytes:
        return self.key

    @property
    def storage_index(self) -> bytes:
        return ssk_storage_index_hash(self.key)

    def to_string(self) -> str:
        return f"{self.prefix}{base32.encode(self.key)}:{base32.encode(self.fingerprint)}"

    def verifier(self) -> MutableVerifierCap:
        return _VERIFY_OF[type(self)](self.storage_index, self.fingerprint)


@dataclass(frozen=True)
class MutableVerifierCap(_MutableCap):
    """Verify cap of a mutable file; `key` is the storage index."""

    @property
    def storage_index(self) -> bytes:
        return self.key

    def to_string(self) -> str:
        return f"{self.prefix}{base32.encode(self.key)}:{base32.encode(self.fingerprint)}"

    def verifier(self) -> MutableVerifierCap:
        return self


@dataclass(frozen=True)
class SskWriteCap(MutableWriteCap):
    prefix: ClassVar[str] = "URI:SSK:"
    kind: ClassVar[str] = "SSK"


@dataclass(frozen=True)
class SskReadCap(MutableReadCap):
    prefix: ClassVar[str] = "URI:SSK-RO:"
    kind: ClassVar[str] = "SSK"


@dataclass(frozen=True)
class SskVerifierCap(MutableVerifierCap):
    prefix: ClassVar[str] = "URI:SSK-Verifier:"
    kind: ClassVar[str] = "SSK"


@dataclass(frozen=True)
class MdmfWriteCap(MutableWriteCap):
    prefix: ClassVar[str] = "URI:MDMF:"
    kind: ClassVar[str] = "MDMF"


@dataclass(frozen=True)
class MdmfReadCap(MutableReadCap):
    prefix: ClassVar[str] = "URI:MDMF-RO:"
    kind: ClassVar[str] = "MDMF"


@dataclass(frozen=True)
class MdmfVerifierCap(MutableVerifierCap):
    prefix: ClassVar[str] = "URI:MDMF-Verifier:"
    kind: ClassVar[str] = "MDMF"


_READ_OF: dict[type[Cap], type[MutableReadCap]] = {SskWriteCap: SskReadCap, MdmfWriteCap: MdmfReadCap}
_VERIFY_OF: dict[type[Cap], type[MutableVerifierCap]] = {
    SskWriteCap: SskVerifierCap,
    SskReadCap: SskVerifierCap,
    MdmfWriteCap: MdmfVerifierCap,
    MdmfReadCap: MdmfVerifierCap,
}


@dataclass(frozen=True)
class DirectoryCap(Cap):
    """A directory: a file cap of the backing file, written with a `URI:DIR2*:` prefix instead of its own."""

    file_cap: Cap
    is_directory: ClassVar[bool] = True

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return _DIR_PREFIX_OF[type(self.file_cap)]

    @property
    def is_mutable(self) -> bool:  # type: ignore[override]
        return isinstance(self.file_cap, MutableWriteCap | MutableReadCap)

    @property
    def is_readonly(self) -> bool:  # type: ignore[override]
        return not isinstance(self.file_cap, MutableWriteCap)

    @property
    def storage_index(self) -> bytes | None:
        return self.file_cap.storage_index

    def to_string(self) -> str:
        inner = self.file_cap.to_string()
        return self.prefix + inner[len(self.file_cap.prefix) :]

    def readonly(self) -> DirectoryCap:
        return self if self.is_readonly else DirectoryCap(self.file_cap.readonly())

    def verifier(self) -> DirectoryCap | None:
        inner = self.file_cap.verifier()
        return None if inner is None else DirectoryCap(inner)


_DIR_PREFIX_OF: dict[type[Cap], str] = {
    SskWriteCap: "URI:DIR2:",
    SskReadCap: "URI:DIR2-RO:",
    SskVerifierCap: "URI:DIR2-Verifier:",
    MdmfWriteCap: "URI:DIR2-MDMF:",
    MdmfReadCap: "URI:DIR2-MDMF-RO:",
    MdmfVerifierCap: "URI:DIR2-MDMF-Verifier:",
    ChkCap: "URI:DIR2-CHK:",
    ChkVerifierCap: "URI:DIR2-CHK-Verifier:",
    LiteralCap: "URI:DIR2-LIT:",
}


@dataclass(frozen=True)
class UnknownCap(Cap):
    """A cap of a kind this code does not know; kept as the exact string so it survives a rewrite."""

    text: str
    reason: str = field(default="unknown cap kind", compare=False)

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return ""

    def to_string(self) -> str:
        return self.text

    @property
    def storage_index(self) -> None:
        return None


# --- parsing ---------------------------------------------------------------------------------------------------
def _malformed(prefix: str, why: str = "is truncated or malformed") -> CapError:
    """The error for a cap that does not parse, naming the kind typed (`URI:DIR2:...`, not the file cap inside)
    and never the rest: a cap is a secret."""
    return CapError(f"not a valid cap: {prefix}... {why}")


CapParser = Callable[[str, str], Cap]
"""parse(body, prefix) -> the cap whose string is prefix + body; CapError if the body is malformed."""


def _chk_parser(cls: type[ChkCap | ChkVerifierCap]) -> CapParser:
    def parse(body: str, prefix: str) -> Cap:
        m = re.fullmatch(f"{_B128}:{_B256}:{_NUM}:{_NUM}:{_NUM}", body)
        if not m:
            raise _malformed(prefix)
        needed, total, size = int(m[3]), int(m[4]), int(m[5])
        if not 1 <= needed <= total <= 256:
            raise _malformed(prefix, f"has impossible k={needed} N={total}")
        return cls(_b32(m[1], prefix), _b32(m[2], prefix), needed, total, size)

    return parse


def _parse_lit(body: str, prefix: str) -> Cap:
    try:
        return LiteralCap(base32.decode(body))
    except ValueError:
        raise _malformed(prefix, "is malformed (bad base32)") from None


def _mutable_parser(cls: type[_MutableCap], allow_extension: bool) -> CapParser:
    tail = "(?::.*)?" if allow_extension else ""

    def parse(body: str, prefix: str) -> Cap:
        m = re.fullmatch(f"{_B128}:{_B256}{tail}", body, re.DOTALL)
        if not m:
            raise _malformed(prefix)
        return cls(_b32(m[1], prefix), _b32(m[2], prefix))

    return parse


_FILE_PARSERS: dict[type[Cap], CapParser] = {
    ChkCap: _chk_parser(ChkCap),
    ChkVerifierCap: _chk_parser(ChkVerifierCap),
    LiteralCap: _parse_lit,
    SskWriteCap: _mutable_parser(SskWriteCap, False),
    SskReadCap: _mutable_parser(SskReadCap, False),
    SskVerifierCap: _mutable_parser(SskVerifierCap, False),
    MdmfWriteCap: _mutable_parser(MdmfWriteCap, True),
    MdmfReadCap: _mutable_parser(MdmfReadCap, True),
    MdmfVerifierCap: _mutable_parser(MdmfVerifierCap, True),
}

# Longest prefixes first, so "URI:DIR2-MDMF-RO:" is tried before "URI:DIR2-MDMF:" and "URI:DIR2:".
_PREFIXES: list[tuple[str, type[Cap], bool]] = sorted(
    [(cls.prefix, cls, False) for cls in _FILE_PARSERS]
    + [(prefix, cls, True) for cls, prefix in _DIR_PREFIX_OF.items()],
    key=lambda item: -len(item[0]),
)


def parse_cap(text: str | bytes, *, allow_prefixes: bool = False) -> Cap:
    """Parse a cap string. Unknown kinds give UnknownCap; a malformed known kind raises CapError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CapError("cap is not UTF-8") from None
    original = text
    must_be_readonly = must_be_immutable = False
    if allow_prefixes:
        if text.startswith(IMMUTABLE_PREFIX):
            must_be_readonly = must_be_immutable = True
            text = text[len(IMMUTABLE_PREFIX) :]
        elif text.startswith(READONLY_PREFIX):
            must_be_readonly = True
            text = text[len(READONLY_PREFIX) :]
    for prefix, cls, is_dir in _PREFIXES:
        if text.startswith(prefix):
            body = text[len(prefix) :]
            inner = _FILE_PARSERS[cls](body, prefix)
            cap: Cap = DirectoryCap(inner) if is_dir else inner
            break
    else:
        return UnknownCap(original)
    if must_be_immutable and cap.is_mutable:
        return UnknownCap(original, "mutable cap in an immutable context")
    if must_be_readonly and not cap.is_readonly:
        return UnknownCap(original, "write cap in a read-only context")
    return cap


def parse_known_cap(text: str | bytes) -> Cap:
    """Parse a cap that must be of a kind this code can use; unknown kinds raise CapError."""
    cap = parse_cap(text)
    if isinstance(cap, UnknownCap):
        shown = cap.text if len(cap.text) < 20 else cap.text[:16] + "..."
        raise CapError(f"not a recognised Tahoe cap: {shown!r}")
    return cap
