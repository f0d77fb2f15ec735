"""The `-d/--node-directory` option every grid command takes, and where the node directory defaults to."""

from __future__ import annotations

import argparse
from pathlib import Path

from lafs_core.errors import LafsError
from lafs_core.grid.nodedir import NodeDirectory

DEFAULT_NODE_DIRECTORY = Path("~/.blackmatch").expanduser()


def add_node_directory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-d",
        "--node-directory",
        metavar="NODEDIR",
        type=Path,
        default=None,
        help=f"node directory (default {DEFAULT_NODE_DIRECTORY})",
    )


def existing_node(args: argparse.Namespace) -> NodeDirectory:
    """The node directory a command names (or the default); it must exist."""
    node = NodeDirectory(args.node_directory or DEFAULT_NODE_DIRECTORY)
    if not node.exists():
        raise LafsError(f"{node.path} is not a node directory (make one with: blackmatch create-node)")
    return node


def optional_node(args: argparse.Namespace) -> NodeDirectory | None:
    """The node directory named by -d (which must exist), else the default one if it exists."""
    if args.node_directory is not None:
        return existing_node(args)
    default = NodeDirectory(DEFAULT_NODE_DIRECTORY)
    return default if default.exists() else None
