"""A node directory, compatible with a Tahoe client's: `tahoe.cfg`, secrets, aliases and storage servers.

    tahoe.cfg                                  [client] shares.needed / shares.happy / shares.total,
                                               [blackmatch] lease.renewal_interval / lease.renewal_rate,
                                               repair.background / repair.bandwidth
    private/convergence, private/secret        the convergence and lease secrets, base32
    private/aliases                            `name: URI:DIR2:...` per line
    private/servers.yaml                       static servers: Tahoe's format, plus `local: PATH` entries
    private/introducer_default_cache.yaml      announcements cached by a Tahoe client (read if present)
    private/blackmatch/                        blackmatch's own state (0700)

Only reading and writing of these files lives here; what the values mean is in the format modules.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .. import base32
from ..durations import DAY, parse_duration
from ..errors import LafsError
from ..sizes import parse_size

N = TypeVar("N", int, float)

DEFAULT_NEEDED = 3
DEFAULT_HAPPY = 7
DEFAULT_TOTAL = 10
DEFAULT_RENEWAL_INTERVAL = 7 * DAY  # Tahoe advises renewing weekly: leases last 31 days
DEFAULT_RENEWAL_RATE = 1.0  # objects a second: a tree of 100,000 objects takes a day, a small part of a week
DEFAULT_REPAIR_BANDWIDTH = 1 << 20  # bytes a second of files repaired in the background: a trickle beside a user's


class NodeDirectoryError(LafsError):
    """The node directory is missing a file or holds a value that makes no sense."""


@dataclass(frozen=True)
class EncodingConfig:
    needed: int = DEFAULT_NEEDED
    happy: int = DEFAULT_HAPPY
    total: int = DEFAULT_TOTAL

    def __post_init__(self) -> None:
        if not 1 <= self.needed <= self.total <= 256 or not 1 <= self.happy <= self.total:
            raise NodeDirectoryError(f"impossible encoding: needed={self.needed} happy={self.happy} total={self.total}")


@dataclass(frozen=True)
class LeaseRenewalConfig:
    """How the grid server renews the leases of what its mounted roots reach, and whether the same cycle also
    checks each object and repairs unhealthy ones (background health, off unless asked for)."""

    interval: int | None = DEFAULT_RENEWAL_INTERVAL  # seconds from the end of one cycle to the next; None: off
    rate: float = DEFAULT_RENEWAL_RATE  # objects renewed a second at most, so a big tree is a trickle
    repair: bool = False
    repair_bandwidth: int = DEFAULT_REPAIR_BANDWIDTH  # bytes of repaired files a second, on average at most


@dataclass(frozen=True)
class ServerSpec:
    """One configured storage server: a Tahoe announcement (reached over GBS) or a local share directory."""

    server_id: str
    nickname: str
    announcement: dict[str, Any] | None = None
    local_path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.local_path is not None


class NodeDirectory:
    """Paths and settings of one node directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().absolute()

    @property
    def private(self) -> Path:
        return self.path / "private"

    @property
    def state_dir(self) -> Path:
        """blackmatch's own private state; created 0700 on first use."""
        directory = self.private / "blackmatch"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory

    def exists(self) -> bool:
        return (self.path / "tahoe.cfg").is_file() or self.private.is_dir()

    def config(self) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(interpolation=None)
        cfg = self.path / "tahoe.cfg"
        if cfg.is_file():
            try:
                parser.read(cfg, encoding="utf-8")
            except configparser.Error as exc:
                raise NodeDirectoryError(_config_error(cfg, exc)) from None
        return parser

    def encoding(self) -> EncodingConfig:
        """`[client] shares.needed / shares.happy / shares.total`, with Tahoe's defaults."""
        config = self.config()
        section = config["client"] if config.has_section("client") else {}

        def number(key: str, default: int) -> int:
            raw = section.get(key, str(default))
            try:
                return int(raw)
            except ValueError:
                raise NodeDirectoryError(f"tahoe.cfg: [client] {key} = {raw!r} is not a number") from None

        total = number("shares.total", DEFAULT_TOTAL)
        # Tahoe's default happiness (7) cannot be met with fewer shares: a smaller N lowers the default.
        return EncodingConfig(
            number("shares.needed", DEFAULT_NEEDED), number("shares.happy", min(DEFAULT_HAPPY, total)), total
        )

    def mutable_format(self) -> str:
        """`[client] mutable.format`: "sdmf" (default) or "mdmf" for new directories and mutable files."""
        config = self.config()
        value = config.get("client", "mutable.format", fallback="sdmf").strip().lower()
        if value not in ("sdmf", "mdmf"):
            raise NodeDirectoryError(f"tahoe.cfg: [client] mutable.format = {value!r}: use sdmf or mdmf")
        return value

    def lease_renewal(self) -> LeaseRenewalConfig:
        """`[blackmatch] lease.renewal_interval` (a Tahoe duration, "0" or "off" for none; default 7 days) and
        `lease.renewal_rate` (objects a second, default 1); `repair.background` (default false) and
        `repair.bandwidth` (bytes a second, default 1M)."""
        config = self.config()
        interval_text = config.get("blackmatch", "lease.renewal_interval", fallback="").strip()
        interval: int | None = DEFAULT_RENEWAL_INTERVAL
        if interval_text.lower() in ("0", "off"):
            interval = None
        elif interval_text:
            try:
                interval = parse_duration(interval_text) or None
            except ValueError as exc:
                raise NodeDirectoryError(f"tahoe.cfg: [blackmatch] lease.renewal_interval: {exc}, or off") from None
        rate = _positive(config, "lease.renewal_rate", float, DEFAULT_RENEWAL_RATE, "use objects a second, above 0")
        repair = _boolean(config, "blackmatch", "repair.background")
        if repair and interval is None:
            raise NodeDirectoryError(
                "tahoe.cfg: [blackmatch] repair.background needs lease renewal: it checks what a renewal cycle "
                "visits, and lease.renewal_interval is off"
            )
        bandwidth = _positive(
            config,
            "repair.bandwidth",
            parse_size,
            DEFAULT_REPAIR_BANDWIDTH,
            "use bytes a second, above 0 (suffixes K, M, G)",
        )
        return LeaseRenewalConfig(interval, rate, repair, bandwidth)

    # --- secrets ---------------------------------------------------------------------------------------------
    def _secret(self, name: str) -> bytes:
        path = self.private / name
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise NodeDirectoryError(f"{path} is missing") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise NodeDirectoryError(f"cannot read {path}: {exc}") from None
        try:
            return base32.decode(text)
        except ValueError:
            raise NodeDirectoryError(f"{path} does not hold a base32 secret") from None

    def convergence_secret(self) -> bytes:
        return self._secret("convergence")

    def lease_secret(self) -> bytes:
        return self._secret("secret")

    # --- aliases ---------------------------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        path = self.private / "aliases"
        if not path.exists():
            return {}
        aliases = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, cap = line.partition(":")
            if not sep or not cap.strip():
                raise NodeDirectoryError(f"{path}:{number}: expected 'name: cap'")
            aliases[name.strip()] = cap.strip()
        return aliases

    def set_alias(self, name: str, cap: str) -> None:
        aliases = {**self.aliases(), name: cap}
        text = "".join(f"{alias}: {value}\n" for alias, value in aliases.items())
        _write_private(self.private / "aliases", text)

    # --- servers ---------------------------------------------------------------------------------------------
    def servers(self) -> list[ServerSpec]:
        """Static servers of `private/servers.yaml`, then those of a Tahoe client's introducer cache."""
        specs: dict[str, ServerSpec] = {}
        static = self.private / "servers.yaml"
        if static.exists():
            for spec in parse_servers_yaml(_load_yaml(static), static.parent):
                specs[spec.server_id] = spec
        cache = self.private / "introducer_default_cache.yaml"
        if cache.exists():
            for spec in parse_announcement_list(_load_yaml(cache) or []):
                specs.setdefault(spec.server_id, spec)
        return list(specs.values())


def _positive(config: configparser.ConfigParser, key: str, parse: Callable[[str], N], default: N, hint: str) -> N:
    """`[blackmatch] key`: a number above 0 (finite), as `parse` reads it; `default` when absent or empty."""
    text = config.get("blackmatch", key, fallback="").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise NodeDirectoryError(f"tahoe.cfg: [blackmatch] {key} = {text!r}: {hint}")
    return value


def _boolean(config: configparser.ConfigParser, section: str, key: str) -> bool:
    """A yes/no setting (true, false, yes, no, on, off, 1, 0, as Tahoe reads them); false when absent."""
    try:
        return config.getboolean(section, key, fallback=False)
    except ValueError:
        raise NodeDirectoryError(
            f"tahoe.cfg: [{section}] {key} = {config.get(section, key)!r}: use true or false"
        ) from None


def _config_error(cfg: Path, exc: configparser.Error) -> str:
    """configparser's complaint as one line naming the file and line, without its Python reprs."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"{cfg} line {exc.lineno}: expected a [section] header, found {exc.line.strip()!r}"
    if isinstance(exc, configparser.ParsingError):
        lineno, quoted = exc.errors[0]  # configparser keeps the line as its repr
        return f"{cfg} line {lineno}: cannot parse {ast.literal_eval(quoted).strip()!r}"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"{cfg} line {exc.lineno}: [{exc.section}] {exc.option} is set twice"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"{cfg} line {exc.lineno}: section [{exc.section}] appears twice"
    return f"{cfg}: {exc.message}"


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise NodeDirectoryError(f"cannot read {path}: {exc}") from None


def parse_servers_yaml(document: Any, base: Path) -> list[ServerSpec]:
    """Servers of a `servers.yaml` document: `storage: {id: {ann: {...}} | {local: PATH}}`."""
    if document is None:
        return []
    if not isinstance(document, dict) or not isinstance(document.get("storage", {}), dict):
        raise NodeDirectoryError("servers.yaml must map 'storage' to server entries")
    specs = []
    for server_id, entry in (document.get("storage") or {}).items():
        if not isinstance(entry, dict):
            raise NodeDirectoryError(f"servers.yaml: entry {server_id!r} is not a mapping")
        ann = entry.get("ann") or {}
        if not isinstance(ann, dict):
            raise NodeDirectoryError(f"servers.yaml: {server_id!r} has a malformed 'ann'")
        nickname = str(ann.get("nickname") or server_id)
        if "local" in entry:
            local = Path(str(entry["local"])).expanduser()
            specs.append(ServerSpec(str(server_id), nickname, None, local if local.is_absolute() else base / local))
        else:
            specs.append(ServerSpec(str(server_id), nickname, ann))
    return specs


def parse_announcement_list(document: Any) -> list[ServerSpec]:
    """Servers of Tahoe's introducer cache: a list of `{key_s: id, ann: {...}}` (storage announcements only)."""
    if not isinstance(document, list):
        raise NodeDirectoryError("introducer cache is not a list of announcements")
    specs = []
    for item in document:
        if not isinstance(item, dict) or not isinstance(item.get("ann"), dict):
            continue
        ann = item["ann"]
        if ann.get("service-name", "storage") != "storage":
            continue
        server_id = str(item.get("key_s") or ann.get("anonymous-storage-FURL") or "")
        if server_id:
            specs.append(ServerSpec(server_id, str(ann.get("nickname") or server_id), ann))
    return specs


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def create_node_directory(
    path: Path,
    *,
    encoding: EncodingConfig,
    server_files: Sequence[Path] = (),
    local_servers: Sequence[Path] = (),
    local_grid: int | None = None,
) -> NodeDirectory:
    """Make a node directory. Servers: the entries of `server_files` (servers.yaml format) and the
    `local_servers` directories; with neither, an embedded grid of `local_grid` (default N) share stores."""
    node = NodeDirectory(path)
    if node.exists():
        raise NodeDirectoryError(f"{node.path} already exists as a node directory")
    node.path.mkdir(parents=True, exist_ok=True)
    node.private.mkdir(mode=0o700, exist_ok=True)
    (node.path / "tahoe.cfg").write_text(
        "# Written by blackmatch create-node; Tahoe-compatible settings.\n"
        "[node]\nnickname = blackmatch\n\n"
        f"[client]\nshares.needed = {encoding.needed}\nshares.happy = {encoding.happy}\n"
        f"shares.total = {encoding.total}\n\n[storage]\nenabled = false\n",
        encoding="utf-8",
    )
    _write_private(node.private / "convergence", base32.encode(os.urandom(32)) + "\n")
    _write_private(node.private / "secret", base32.encode(os.urandom(32)) + "\n")
    storage: dict[str, Any] = {}
    for server_file in server_files:
        document = _load_yaml(Path(server_file))
        parse_servers_yaml(document, Path(server_file).parent)  # validate before copying
        storage.update(document.get("storage") or {})
    for directory in local_servers:
        directory = Path(directory).expanduser().absolute()
        if not (directory / "shares").is_dir():
            raise NodeDirectoryError(f"{directory} has no shares/ directory")
        server_id = "local-" + hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        storage[server_id] = {"local": str(directory), "ann": {"nickname": directory.name}}
    if not server_files and not local_servers:
        count = local_grid or encoding.total
        for i in range(count):
            directory = node.path / "local-grid" / f"server-{i}"
            (directory / "shares").mkdir(parents=True, exist_ok=True)
            storage[f"local-grid-{i}"] = {"local": str(directory), "ann": {"nickname": f"local-{i}"}}
    _write_private(node.private / "servers.yaml", yaml.safe_dump({"storage": storage}, sort_keys=True))
    return node
