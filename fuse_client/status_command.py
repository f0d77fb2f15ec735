"""`blackmatch status`: what runs for a node directory, its grid server and its mounts.

It asks the grid server over the RPC socket (how many mounts and roots it serves, how many changes wait to go up)
and lists the node's mounts from their pid files. It never touches a mounted filesystem, so a hung mount cannot
hang it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grid_server.server_files import ServerFiles

from .grid_server_process import server_status
from .mount_commands import ServingProcess, mounts_directory
from .node_options import add_node_directory_option, existing_node


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="show the grid server and the mounts of a node directory")
    add_node_directory_option(status)
    status.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    node = existing_node(args)
    files = ServerFiles.of(node)
    print(f"Node directory: {node.path}")
    report = server_status(files.socket)
    if report is None:
        print("Grid server: not running")
    else:
        print(
            f"Grid server: pid {report['pid']}, {_count(report['mounts'], 'mount')}, "
            f"{_count(report['roots'], 'root')}, {_count(report['queued'], 'change')} waiting to upload "
            f"(log {files.log})"
        )
    mounts = _live_mounts(mounts_directory(node))
    print("Mounts:" if mounts else "Mounts: none")
    for mountpoint, pid in mounts:
        print(f"  {mountpoint} (pid {pid})")
    return 0


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _live_mounts(directory: Path) -> list[tuple[str, int]]:
    """(mountpoint, pid) of each serving process whose pid file is held."""
    found = []
    for path in sorted(directory.glob("*.pid")):
        process = ServingProcess.from_pid_file(path)
        if process is not None:
            found.append((process.mountpoint or "?", process.pid))
            process.close()
    return found
