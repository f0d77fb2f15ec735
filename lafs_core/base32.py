"""Tahoe's base32: RFC 4648 alphabet in lowercase, no padding, canonical last character.

Tahoe encodes every key, hash and storage index this way. A string whose unused trailing bits are not zero
decodes to the same bytes as the canonical one, so accepting it would give two spellings of one cap;
`decode` refuses it.
"""

import base64
import binascii

from .errors import FormatError

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ALPHABET_SET = frozenset(ALPHABET)
# Characters whose value has the low `n` bits clear, for a last character carrying 5-n data bits.
_TRAILING_ZERO_BITS = {n: frozenset(c for i, c in enumerate(ALPHABET) if i % (1 << n) == 0) for n in range(5)}


def encode(data: bytes) -> str:
    """Encode bytes as lowercase unpadded base32."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def encoded_length(nbytes: int) -> int:
    """Length of the base32 text of `nbytes` bytes."""
    return (nbytes * 8 + 4) // 5


def is_canonical(text: str) -> bool:
    """True when `text` is lowercase unpadded base32 whose trailing bits are zero."""
    if not text:
        return True
    if not _ALPHABET_SET.issuperset(text):
        return False
    unused_bits = len(text) * 5 % 8
    if unused_bits >= 5:
        return False  # a length no byte string encodes to: one character would be all padding
    return text[-1] in _TRAILING_ZERO_BITS[unused_bits]


def decode(text: str | bytes) -> bytes:
    """Decode canonical lowercase unpadded base32; anything else raises FormatError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("base32 text is not ASCII") from None
    if not is_canonical(text):
        raise FormatError(f"not canonical base32: {text[:60]!r}")
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except binascii.Error as exc:  # pragma: no cover - is_canonical already rules this out
        raise FormatError(f"bad base32: {exc}") from None
