"""A node directory, compatible with a Tahoe client's: `tahoe.cfg`, `private/convergence`, `private/secret`.

Only reading and writing of the files lives here; what the values mean is in the format modules.
"""

import configparser
from dataclasses import dataclass
from pathlib import Path

from .. import base32
from ..errors import LafsError

DEFAULT_NEEDED = 3
DEFAULT_HAPPY = 7
DEFAULT_TOTAL = 10


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


class NodeDirectory:
    """Paths and settings of one node directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    @property
    def private(self) -> Path:
        return self.path / "private"

    def exists(self) -> bool:
        return (self.path / "tahoe.cfg").is_file() or self.private.is_dir()

    def config(self) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(interpolation=None)
        cfg = self.path / "tahoe.cfg"
        if cfg.is_file():
            try:
                parser.read(cfg, encoding="utf-8")
            except configparser.Error as exc:
                raise NodeDirectoryError(f"{cfg}: {exc}") from None
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
        # Tahoe's default happiness (7) cannot be met with fewer shares; a smaller N implies a smaller default.
        return EncodingConfig(
            number("shares.needed", DEFAULT_NEEDED),
            number("shares.happy", min(DEFAULT_HAPPY, total)),
            total,
        )

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
