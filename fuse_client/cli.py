"""The `blackmatch` command line: argument parsing and dispatch to the subcommands.

Errors that come from bad input (a malformed cap, a missing file, a broken node directory) are printed as one
line and exit with status 1; usage mistakes exit with status 2 via argparse. No traceback reaches the user.
"""

import argparse
import importlib.metadata
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lafs_core.errors import LafsError, sole_exception

from . import debug_commands
from .flush_command import add_flush_command
from .grid_commands import add_grid_commands
from .maintenance_commands import add_maintenance_commands
from .mount_commands import add_mount_commands
from .mount_helper_install import add_install_command
from .node_options import add_node_directory_option
from .status_command import add_status_command
from .storage_commands import add_storage_commands

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackmatch",
        description="Use a Tahoe-LAFS grid from ordinary software.",
    )
    parser.add_argument("--version", action="version", version=f"blackmatch {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_grid_commands(commands)
    add_maintenance_commands(commands)
    add_storage_commands(commands)
    add_mount_commands(commands)
    add_install_command(commands)
    add_status_command(commands)
    add_flush_command(commands)

    debug = commands.add_parser("debug", help="inspect formats without a grid")
    debug_sub = debug.add_subparsers(dest="debug_command", metavar="DEBUGCOMMAND", required=True)
    cap = debug_sub.add_parser("cap", help="print the cap a file would get, without uploading it")
    cap.add_argument("file", type=Path, help="local file")
    add_node_directory_option(cap)
    cap.add_argument("--convergence", metavar="BASE32", help="convergence secret (default: the node's)")
    cap.add_argument("--needed", "-k", type=int, metavar="K", help="shares needed (default 3 or the node's)")
    cap.add_argument("--total", "-N", type=int, metavar="N", help="shares in all (default 10 or the node's)")
    cap.add_argument(
        "--max-segment-size",
        type=int,
        metavar="BYTES",
        default=None,
        help="maximum segment size (default 1048576; Tahoe up to 1.18 used 131072)",
    )
    cap.set_defaults(handler=debug_commands.cap_command)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("blackmatch")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        status = handler(args)
        sys.stdout.flush()  # now, not at exit, so a reader that has gone is noticed here
        return status
    except BaseException as raised:  # trio wraps what a task raised (Ctrl-C too) in exception groups
        failure = sole_exception(raised)
        if isinstance(failure, KeyboardInterrupt):
            return 130
        if isinstance(failure, BrokenPipeError) and _reader_gone(sys.stdout.fileno()):
            return _closed_pipe()
        if isinstance(failure, LafsError | OSError | ValueError):
            print(f"blackmatch: error: {failure}", file=sys.stderr)
            return 1
        raise


def _reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe whose reading end is closed (poll reports an error on its writing end): only then is
    a broken pipe the reader's choice, not a failure (a download into a FIFO whose reader died is one)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _closed_pipe() -> int:
    """Whoever read our output stopped (`blackmatch ls | head`): exit quietly with the status of a process
    SIGPIPE killed, as coreutils do. Standard output goes to /dev/null so the interpreter's final flush of what
    is still buffered cannot complain either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
