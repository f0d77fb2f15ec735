"""How a storage server is named: NURLs (GBS over HTTPS) and fURLs (Foolscap), parsed and formatted.

A NURL, `pb://<spki-hash>@<host>:<port>/<swissnum>#v=1`, says where the server listens, which TLS public key it
must present (the SPKI hash: unpadded urlsafe base64 of SHA-256 of the DER SubjectPublicKeyInfo, 43 characters)
and the swissnum that authorizes requests. `pb+tor://` NURLs name the same thing reached over Tor.

A fURL, `pb://<tubid>@<hints>/<swissnum>`, is Foolscap's name for the same service. blackmatch does not speak
Foolscap, but the TubID in it (base32 of SHA-1 of the server's certificate, 20 bytes) is what lease and
write-enabler secrets are derived from, so every client must read it.

Pure code: no I/O. Malformed input raises FormatError saying what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import base32
from .errors import FormatError

NURL_SCHEMES = ("pb", "pb+tor")
NURL_VERSION_FRAGMENT = "v=1"
SPKI_HASH_LENGTH = 43  # 32 bytes of SHA-256 in unpadded base64
TUBID_LENGTH = 20

_SPKI_HASH_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Swissnums are base32 in practice; any URL-unreserved text is accepted so no valid NURL is refused.
_SWISSNUM_RE = re.compile(r"[A-Za-z0-9._~-]+")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?"
)
_PORT_RE = re.compile(r"[0-9]{1,5}")


def subject_public_key_info(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate, as Tahoe re-encodes it (`http_common.get_spki`)."""
    try:
        certificate = x509.load_der_x509_certificate(cert_der)
        return certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"not a usable DER certificate: {exc}") from None


def spki_hash(cert_der: bytes) -> str:
    """The NURL pin of a DER certificate: unpadded urlsafe base64 of SHA-256 of its SubjectPublicKeyInfo."""
    digest = hashlib.sha256(subject_public_key_info(cert_der)).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def tubid(cert_der: bytes) -> bytes:
    """Foolscap's TubID of a certificate: SHA-1 of its DER encoding (20 bytes)."""
    return hashlib.sha1(cert_der).digest()


def _check_spki_hash(text: str) -> str:
    if not _SPKI_HASH_RE.fullmatch(text):
        raise FormatError(f"SPKI hash must be {SPKI_HASH_LENGTH} urlsafe base64 characters, got {text[:60]!r}")
    try:
        digest = base64.urlsafe_b64decode(text + "=")
    except binascii.Error:  # pragma: no cover - the regex rules this out
        raise FormatError(f"SPKI hash is not base64: {text!r}") from None
    if base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=") != text:
        raise FormatError(f"SPKI hash is not canonical base64 (nonzero trailing bits): {text!r}")
    return text


def _url_host(text: str) -> str:
    """The host part of a URL authority: a hostname, an IPv4 address, or a bracketed IPv6 address (returned bare)."""
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise FormatError(f"bad IPv6 address {text[:80]!r}") from None
    if not _HOSTNAME_RE.fullmatch(text):
        raise FormatError(f"bad host name {text[:80]!r}")
    return text


def _check_host(host: str) -> str:
    """A host given by a caller: a hostname, an IPv4 address, or an IPv6 address with or without brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return _url_host(host)


def _check_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise FormatError(f"bad port {text[:20]!r}")
    return int(text)


def _check_swissnum(text: str) -> str:
    if not _SWISSNUM_RE.fullmatch(text):
        raise FormatError(f"bad swissnum (must be non-empty URL-safe text): {len(text)} characters")
    return text


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise FormatError(f"expected HOST:PORT, got {text[:80]!r}")
    return _url_host(host), _check_port(port)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Nurl:
    """A parsed NURL. `host` holds IPv6 addresses without brackets."""

    spki_hash: str
    host: str
    port: int
    swissnum: str
    scheme: str = "pb"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.spki_hash}@{_host_for_url(self.host)}:{self.port}/{self.swissnum}#v=1"

    @property
    def base_url(self) -> str:
        """Where the HTTPS requests go (`https://host:port`), with nothing secret in it."""
        return f"https://{_host_for_url(self.host)}:{self.port}"


def parse_nurl(text: str) -> Nurl:
    """Parse `pb://<spki-hash>@<host>:<port>/<swissnum>#v=1` (or `pb+tor://`)."""
    if not isinstance(text, str):
        raise FormatError(f"NURL must be text, not {type(text).__name__}")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in NURL_SCHEMES:
        raise FormatError(f"NURL must start with pb:// or pb+tor://: {text[:40]!r}")
    rest, sep, fragment = rest.partition("#")
    if fragment != NURL_VERSION_FRAGMENT:
        raise FormatError(f"NURL must end with #{NURL_VERSION_FRAGMENT} (an HTTP storage NURL), got #{fragment[:20]!r}")
    authority, sep, path = rest.partition("/")
    if not sep or "/" in path or "?" in path:
        raise FormatError("NURL path must be exactly one swissnum segment")
    pin, sep, address = authority.partition("@")
    if not sep:
        raise FormatError("NURL has no '<spki-hash>@' before its address")
    host, port = _split_host_port(address)
    return Nurl(_check_spki_hash(pin), host, port, _check_swissnum(path), scheme)


def format_nurl(spki_hash: str, host: str, port: int, swissnum: str, *, scheme: str = "pb") -> str:
    """The NURL text for a server; every part is validated so the result always parses back."""
    if scheme not in NURL_SCHEMES:
        raise FormatError(f"unknown NURL scheme {scheme!r}")
    _check_port(str(port))
    nurl = Nurl(_check_spki_hash(spki_hash), _check_host(host), port, _check_swissnum(swissnum), scheme)
    return str(nurl)


@dataclass(frozen=True)
class Furl:
    """A parsed fURL: the TubID, the connection hints as written (`tcp:host:port`, `tor:…`, legacy `host:port`)
    and the swissnum."""

    tubid: bytes
    location_hints: tuple[str, ...]
    swissnum: str

    def __str__(self) -> str:
        return f"pb://{base32.encode(self.tubid)}@{','.join(self.location_hints)}/{self.swissnum}"

    def tcp_addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs of the `tcp:` and legacy hints, in order."""
        addresses = []
        for hint in self.location_hints:
            if hint.startswith("tcp:"):
                addresses.append(_split_host_port(hint[4:]))
            elif hint.count(":") == 1:
                addresses.append(_split_host_port(hint))
        return addresses


def _check_hint(hint: str) -> str:
    if hint.startswith("tcp:") or hint.count(":") == 1:
        _split_host_port(hint.removeprefix("tcp:"))
    elif not re.fullmatch(r"[a-z0-9+-]+:[^/,@\s]+", hint):
        raise FormatError(f"bad fURL connection hint {hint[:80]!r}")
    return hint


def parse_furl(text: str) -> Furl:
    """Parse `pb://<tubid>@<hint>[,<hint>…]/<swissnum>`; the TubID is case-insensitive, as in Tahoe."""
    if not isinstance(text, str):
        raise FormatError(f"fURL must be text, not {type(text).__name__}")
    if not text.startswith("pb://"):
        raise FormatError(f"fURL must start with pb://: {text[:40]!r}")
    authority, sep, swissnum = text[len("pb://") :].partition("/")
    if not sep or "/" in swissnum or "#" in swissnum:
        raise FormatError("fURL path must be exactly one swissnum segment")
    tubid_text, sep, location = authority.partition("@")
    if not sep:
        raise FormatError("fURL has no '<tubid>@' before its connection hints")
    tubid_text = tubid_text.lower()
    if len(tubid_text) != base32.encoded_length(TUBID_LENGTH):
        raise FormatError(f"fURL TubID must be {base32.encoded_length(TUBID_LENGTH)} base32 characters")
    hints = tuple(_check_hint(hint) for hint in location.split(",")) if location else ()
    return Furl(base32.decode(tubid_text), hints, _check_swissnum(swissnum))


def format_furl(tubid: bytes, host: str, port: int, swissnum: str) -> str:
    """A fURL with one `tcp:` hint, as a Tahoe storage server announces it."""
    if len(tubid) != TUBID_LENGTH:
        raise FormatError(f"TubID must be {TUBID_LENGTH} bytes, got {len(tubid)}")
    _check_port(str(port))
    hint = f"tcp:{_host_for_url(_check_host(host))}:{port}"
    return str(Furl(tubid, (hint,), _check_swissnum(swissnum)))
