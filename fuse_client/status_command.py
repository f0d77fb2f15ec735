"""`blackmatch status`: what runs for a node directory, its grid server and its mounts.

It asks the grid server over the RPC socket (how many mounts and roots it serves, how many changes wait to go up,
where each root's lease renewal stands) and lists the node's mounts from their pid files. It never touches a
mounted filesystem, so a hung mount cannot hang it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from grid_server.node_state import root_key
from grid_server.server_files import ServerFiles
from lafs_core.caps import DirectoryCap, parse_cap
from lafs_core.errors import LafsError
from lafs_core.grid.nodedir import NodeDirectory

from .grid_server_process import server_status
from .mount_commands import ServingProcess, find_mount, mounts_directory
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
        names = _root_names(node)
        for renewal in report.get("lease_renewal", []):
            root = renewal["root"]
            print(f"Lease renewal ({names.get(root, f'root {root[:8]}')}): {renewal_summary(renewal)}")
    mounts = _live_mounts(mounts_directory(node))
    print("Mounts:" if mounts else "Mounts: none")
    for mountpoint, pid in mounts:
        detached = "" if find_mount(Path(mountpoint)) else ", detached: it finishes once nothing uses it"
        print(f"  {mountpoint} (pid {pid}{detached})")
    return 0


def _count(number: int, thing: str, things: str | None = None) -> str:
    return f"{number} {thing if number == 1 else things or thing + 's'}"


def _live_mounts(directory: Path) -> list[tuple[str, int]]:
    """(mountpoint, pid) of each serving process whose pid file is held."""
    found = []
    for path in sorted(directory.glob("*.pid")):
        process = ServingProcess.from_pid_file(path)
        if process is not None:
            found.append((process.mountpoint or "?", process.pid))
            process.close()
    return found


def renewal_summary(state: dict[str, Any]) -> str:
    """One root's lease renewal (GridFilesystem.queue_state's "lease_renewal") in one line: the last finished
    cycle and what it found (with background repair: what it repaired, and the paths it failed to), the one under
    way, when the next is due, and the last error."""
    if not state["enabled"]:
        return "off (tahoe.cfg [blackmatch] lease.renewal_interval)"
    parts = []
    last = state["last_result"]
    if last is None:
        parts.append("never finished")
    else:
        found = f"last finished {_when(state['last_finished_at'])}: {_count(last['renewed'], 'object')} renewed"
        if last["errors"]:
            found += f", {last['errors']} with errors (failed: {', '.join(last['failed_servers'])})"
        if last["unlisted"]:
            found += f", {_count(len(last['unlisted']), 'directory', 'directories')} not listed"
            found += f" ({_first_paths(last['unlisted'])})"
        if state.get("repair"):
            found += f", {last['repaired']} repaired"
            if last["repair_failed"]:
                found += f", {_count(last['repair_failures'], 'repair')} failed ({_first_paths(last['repair_failed'])})"
        parts.append(found)
    progress = state["progress"]
    if progress is not None:
        doing = "running" if state["running"] else "cycle half done"
        parts.append(f"{doing}: {_count(progress['objects'], 'object')} done")
    if state["next_due_at"] is not None:
        parts.append(f"next due {_when(state['next_due_at'])}")
    error = state["error"]
    if error is not None:
        retry = error["next_try_in"]
        next_try = f"next try in {retry:.0f} s" if isinstance(retry, int | float) else f"next try {retry}"
        parts.append(f"failing ({error['attempts']} tries, {next_try}): {error['error']}")
    return "; ".join(parts)


def _first_paths(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(seconds))


def _root_names(node: NodeDirectory) -> dict[str, str]:
    """Root keys (as `status` reports roots) of the node's aliases, by the alias that names each."""
    names: dict[str, str] = {}
    for alias, cap_text in node.aliases().items():
        try:
            cap = parse_cap(cap_text, allow_prefixes=True)
        except LafsError:
            continue
        if isinstance(cap, DirectoryCap):
            names.setdefault(root_key(cap), f"{alias}:")
    return names
