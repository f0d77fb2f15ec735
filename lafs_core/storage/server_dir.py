"""A storage server's directory: its TLS identity, swissnum, listen address, shares, and how clients find it.

    DIR/                  (0700)
    DIR/server.cfg        [storage] listen = HOST:PORT, hostname = name in the NURL, nickname, and Tahoe's
                          lease-expiry settings (expire.enabled, expire.mode, ...; see expiry.py)
    DIR/private/node.pem  the TLS certificate and RSA-2048 key, as Tahoe's tub certificate (0600)
    DIR/private/swissnum  the secret that authorizes requests (0600)
    DIR/storage/          the ShareStore root: shares/, corruption-advisories/, journal/
    DIR/servers.yaml      this server's entry in Tahoe's `private/servers.yaml` format, for clients
    DIR/lease-checker.json  the lease checker's place in its pass over the shares, and its last pass's counts

The certificate is the server's identity: its SPKI hash goes in the NURL, its SHA-1 is the TubID that lease and
write-enabler secrets are derived from, and SHA-256 of its SPKI names the server (`v0-<base32>`), the way Tahoe
names servers by their Ed25519 key. The permutation seed is announced in Tahoe's form: base32 of the ASCII of
the server id's key part.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .. import base32
from ..errors import LafsError
from ..nurl import format_furl, format_nurl, spki_hash, subject_public_key_info, tubid
from .expiry import ExpirySettingError, ExpirySettings, expiry_settings

CONFIG_NAME = "server.cfg"
SERVERS_YAML = "servers.yaml"
LEASE_CHECKER_STATE = "lease-checker.json"
SWISSNUM_BYTES = 20  # 32 base32 characters, as Foolscap swissnums
CERTIFICATE_DAYS = 20 * 365


class ServerDirError(LafsError):
    """A storage server directory that cannot be created or read."""


@dataclass(frozen=True)
class ServerDir:
    """Everything `storage run` needs, read from a server directory."""

    path: Path
    listen_host: str
    listen_port: int
    hostname: str
    nickname: str
    cert_pem: bytes
    key_pem: bytes
    swissnum: str
    expiry: ExpirySettings = field(default_factory=ExpirySettings)

    @property
    def store_root(self) -> Path:
        return self.path / "storage"

    @property
    def lease_checker_state(self) -> Path:
        return self.path / LEASE_CHECKER_STATE

    @property
    def cert_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    @property
    def tubid(self) -> bytes:
        return tubid(self.cert_der)

    @property
    def server_id(self) -> str:
        return "v0-" + base32.encode(hashlib.sha256(subject_public_key_info(self.cert_der)).digest())

    @property
    def nurl(self) -> str:
        return format_nurl(spki_hash(self.cert_der), self.hostname, self.listen_port, self.swissnum)

    @property
    def furl(self) -> str:
        return format_furl(self.tubid, self.hostname, self.listen_port, self.swissnum)

    def announcement(self) -> dict[str, object]:
        """The `ann` of this server as Tahoe announces it (the keys clients use)."""
        return {
            "nickname": self.nickname,
            "anonymous-storage-FURL": self.furl,
            "anonymous-storage-NURLs": [self.nurl],
            "permutation-seed-base32": base32.encode(self.server_id[3:].encode("ascii")),
        }

    def servers_yaml(self) -> str:
        return yaml.safe_dump({"storage": {self.server_id: {"ann": self.announcement()}}}, sort_keys=False)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) as (host, port); port 0 means "pick one"."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ServerDirError(f"listen address must be HOST:PORT, got {text!r}")
    return host, int(port)


def _free_port(host: str) -> int:
    """A port nothing listens on now, so the NURL in servers.yaml is complete before the first `run`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _self_signed_certificate() -> tuple[bytes, bytes]:
    """An RSA-2048 key and a self-signed certificate for it, like Foolscap's tub certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "newpb_thingy")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def create_server_dir(
    path: Path, listen_host: str = "127.0.0.1", port: int = 0, hostname: str | None = None
) -> ServerDir:
    """Make a new server directory (refusing an existing non-empty one) and write its servers.yaml."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ServerDirError(f"{path} already exists and is not an empty directory")
    if not 0 <= port <= 65535:
        raise ServerDirError(f"bad port {port}")
    if hostname is None:
        hostname = socket.getfqdn() if listen_host in ("0.0.0.0", "::", "") else listen_host
    if port == 0:
        port = _free_port(listen_host)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    (path / "private").mkdir(mode=0o700)
    (path / "storage").mkdir(mode=0o700)
    cert_pem, key_pem = _self_signed_certificate()
    _write_private(path / "private" / "node.pem", cert_pem + key_pem)
    swissnum = base32.encode(secrets.token_bytes(SWISSNUM_BYTES))
    _write_private(path / "private" / "swissnum", swissnum.encode("ascii") + b"\n")
    config = configparser.ConfigParser(interpolation=None)
    listen = f"[{listen_host}]:{port}" if ":" in listen_host else f"{listen_host}:{port}"
    config["storage"] = {"listen": listen, "hostname": hostname, "nickname": path.resolve().name}
    with open(path / CONFIG_NAME, "w", encoding="utf-8") as f:
        config.write(f)
    server = load_server_dir(path)
    (path / SERVERS_YAML).write_text(server.servers_yaml(), encoding="utf-8")
    return server


def load_server_dir(path: Path) -> ServerDir:
    """Read a server directory made by `create_server_dir`."""
    path = Path(path)
    config = configparser.ConfigParser(interpolation=None)
    try:
        if not config.read(path / CONFIG_NAME, encoding="utf-8"):
            raise ServerDirError(f"{path} is not a storage server directory (no {CONFIG_NAME})")
        section = config["storage"]
        host, port = parse_listen(section["listen"])
        pem = (path / "private" / "node.pem").read_bytes()
        swissnum = (path / "private" / "swissnum").read_text(encoding="ascii").strip()
        hostname, nickname = section["hostname"], section.get("nickname", path.name)
        expiry = expiry_settings(section)
    except (OSError, KeyError, UnicodeDecodeError, configparser.Error) as exc:
        raise ServerDirError(f"cannot read storage server directory {path}: {exc}") from None
    except ExpirySettingError as exc:
        raise ServerDirError(f"{path / CONFIG_NAME}: {exc}") from None
    cert_pem = _pem_block(pem, b"CERTIFICATE")
    key_pem = _pem_block(pem, b"PRIVATE KEY")
    server = ServerDir(path, host, port, hostname, nickname, cert_pem, key_pem, swissnum, expiry)
    try:
        server.nurl  # noqa: B018 - validates certificate, hostname, port and swissnum together
    except ValueError as exc:
        raise ServerDirError(f"{path}: {exc}") from None
    return server


def _pem_block(pem: bytes, label: bytes) -> bytes:
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        raise ServerDirError(f"private/node.pem has no {label.decode()}")
    return pem[start : stop + len(end)] + b"\n"
