"""Names as the kernel gives them (bytes) and as Tahoe keeps them (Unicode), one to one.

Tahoe directory entries are named by Unicode strings; Linux names are any bytes but "/" and NUL. A name that is
valid UTF-8 is kept as the string it decodes to. Each byte of a name that is not part of valid UTF-8 (always one
of 0x80-0xFF) is kept as the private-use code point U+10FE00 + byte (U+10FE80-U+10FEFF), and shown through the
mount as that byte again. So that no valid name is ever mistaken for an escaped one, a code point of that range
in a valid name is itself kept as the escapes of its UTF-8 bytes: every name, whatever it holds, comes back
byte for byte.

Tahoe names are what the grid server, its journal and the RPC interface carry; the shim converts at the kernel
boundary with `to_tahoe` and `from_tahoe`. A name written by another Tahoe client holding escape code points in
an order `to_tahoe` never makes (escapes spelling valid UTF-8) is shown as the bytes they spell.
"""

from __future__ import annotations

NAME_MAX = 255  # bytes in one component, as on Linux filesystems (and statfs's f_namemax)
ESCAPE_BASE = 0x10FE00  # a byte b that is not part of valid UTF-8 is kept as chr(ESCAPE_BASE + b)
_ESCAPES = range(ESCAPE_BASE + 0x80, ESCAPE_BASE + 0x100)


def _escaped(data: bytes) -> str:
    return "".join(chr(ESCAPE_BASE + byte) for byte in data)


# Python's surrogateescape decodes a byte b that is not part of valid UTF-8 as U+DC00 + b; these tables turn that
# into the escape range and back (a code point of the escape range in a valid name goes as its bytes' escapes).
_TO_TAHOE = {0xDC00 + byte: chr(ESCAPE_BASE + byte) for byte in range(0x80, 0x100)} | {
    point: _escaped(chr(point).encode("utf-8")) for point in _ESCAPES
}
_FROM_TAHOE = {point: chr(point - ESCAPE_BASE + 0xDC00) for point in _ESCAPES}


def to_tahoe(raw: bytes) -> str:
    """The Tahoe name of the name `raw` (bytes, as the kernel passes it)."""
    if raw.isascii():
        return raw.decode("ascii")
    return raw.decode("utf-8", "surrogateescape").translate(_TO_TAHOE)


def from_tahoe(name: str) -> bytes:
    """The bytes a Tahoe name shows as through the mount: `to_tahoe` undone."""
    if name.isascii():
        return name.encode("ascii")
    return name.translate(_FROM_TAHOE).encode("utf-8", "surrogateescape")


def too_long(name: str) -> bool:
    """Whether the name shows as more than NAME_MAX bytes (ENAMETOOLONG for any call that takes it)."""
    return len(name) > NAME_MAX if name.isascii() else len(from_tahoe(name)) > NAME_MAX


def showable(name: str) -> bool:
    """Whether the mount can show a Tahoe name as a directory entry: Linux takes no empty name, none longer than
    NAME_MAX bytes, none holding "/" or NUL, and "." and ".." are the directory's own."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name and not too_long(name)
