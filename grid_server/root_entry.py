"""The mount root's own metadata: its mode, owner, times and attributes.

Every other inode keeps these in its entry's metadata in its parent directory (metadata.py); the root has no parent
on the grid, so its metadata, the same dict an entry would have, is kept in the root's state directory
(`roots/KEY/root.json`, see node_state.py). It belongs to this node directory: another node mounting the same root
keeps its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT_FILE = "root.json"


def load_root_metadata(directory: Path) -> dict[str, Any] | None:
    """The root's metadata as last saved in `directory`, or None when none was (or what is there is damaged)."""
    try:
        metadata = json.loads((directory / ROOT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def save_root_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Replace the saved metadata whole (a crash leaves the old or the new, never a torn file); raises OSError."""
    temporary = directory / (ROOT_FILE + ".new")
    temporary.write_text(json.dumps(metadata, sort_keys=True))
    os.replace(temporary, directory / ROOT_FILE)
