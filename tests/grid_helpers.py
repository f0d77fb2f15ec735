"""Building grids of in-process local servers for tests."""

from pathlib import Path

from lafs_core.grid.grid import Grid
from lafs_core.grid.local_client import LocalStorageServer
from lafs_core.grid.nodedir import EncodingConfig


def local_grid(root: Path, count: int = 5, needed: int = 3, happy: int = 5, total: int = 10) -> Grid:
    servers = [LocalStorageServer(root / f"server-{i}", server_id=f"server-{i}") for i in range(count)]
    return Grid(servers, convergence=b"c" * 32, lease_secret=b"l" * 32, encoding=EncodingConfig(needed, happy, total))


def share_files(root: Path) -> list[Path]:
    """Every final share file of every local server under `root`."""
    return [p for p in root.glob("server-*/shares/*/*/*") if p.is_file() and "incoming" not in p.parts]
