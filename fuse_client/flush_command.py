"""`blackmatch flush [PATH]`: wait until everything written to the mount holding PATH is on the grid.

It asks the mount through the mount itself: reading the extended attribute `user.blackmatch.flush` of a path on
it has every pending change tried now, and `user.blackmatch.queue` says how far the queue is (changes left, share
bytes stored, failing items; GridFilesystem._flush_progress). The kernel takes the read to whichever process
serves the mount, so the one channel works in both modes: over the RPC socket to the grid server in split mode,
to the mounting process itself with `--no-split`, without a socket of its own or a way to find that process.

It flushes the whole mount (one root), not only PATH's subtree: the write-back queue is the root's, and a change
below PATH may wait on a directory update above it. It gives up once nothing has moved for as long as a drain
waits (the grid is down, or not enough servers answer for happiness), or after `--timeout` seconds.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from grid_server.filesystem import DRAIN_GIVE_UP, FLUSH_XATTR, QUEUE_XATTR
from lafs_core.errors import LafsError
from lafs_core.sizes import format_size

POLL_INTERVAL = 0.2  # seconds between looks at the queue


class FlushError(LafsError):
    """The flush could not finish; the message is the one line the user sees."""


def add_flush_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flush = commands.add_parser(
        "flush",
        help="wait until every change of a mount is on the grid",
        description="Return once everything written to the mount holding PATH (the whole mount, not only below "
        "PATH) is on the grid, uploaded with happiness met and its directories published. Exits 1 saying what is "
        f"still queued once nothing has moved for {DRAIN_GIVE_UP:g} s (the grid is down), or after --timeout.",
    )
    flush.add_argument(
        "path", metavar="PATH", type=Path, nargs="?", default=Path("."), help="a path on the mount (default: .)"
    )
    flush.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="give up after this many seconds (default: none)"
    )
    flush.set_defaults(handler=flush_command)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


@dataclass(frozen=True)
class Progress:
    """One answer of the mount (see GridFilesystem._flush_progress)."""

    left: int
    uploading: int
    stored_bytes: int
    failing: list[dict[str, Any]]

    def mark(self) -> tuple[int, int]:
        """What changes when the flush moves."""
        return self.left, self.stored_bytes


def flush_command(args: argparse.Namespace) -> int:
    target = _attribute_target(args.path)
    start = time.monotonic()
    deadline = None if args.timeout is None else start + args.timeout
    progress = _read(target, FLUSH_XATTR)
    first_stored = progress.stored_bytes
    mark, quiet_since = progress.mark(), start
    line = ProgressLine(sys.stderr)
    try:
        while progress.left:
            now = time.monotonic()
            if progress.mark() != mark:
                mark, quiet_since = progress.mark(), now
            line.show(progress, progress.stored_bytes - first_stored)
            if deadline is not None and now >= deadline:
                raise FlushError(_not_done(progress, f"after {args.timeout:g} s"))
            if now - quiet_since >= DRAIN_GIVE_UP:
                raise FlushError(_not_done(progress, f"nothing moved for {DRAIN_GIVE_UP:g} s"))
            time.sleep(POLL_INTERVAL if deadline is None else max(0.0, min(POLL_INTERVAL, deadline - now)))
            progress = _read(target, QUEUE_XATTR)
    finally:
        line.clear()
    print(f"Everything written to the mount holding {args.path} is on the grid")
    return 0


def _attribute_target(path: Path) -> Path:
    """Where to read the attributes: PATH if it is a directory, else its directory (the kernel allows user
    attributes on regular files and directories only, and a symlink's target may be off the mount)."""
    try:
        return path if path.is_dir() else path.absolute().parent
    except OSError as exc:
        raise FlushError(f"{path}: {exc.strerror}") from None


def _read(target: Path, attribute: str) -> Progress:
    try:
        answer = json.loads(os.getxattr(target, attribute))
        return Progress(answer["left"], answer["uploading"], answer["stored_bytes"], answer["failing"])
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            raise FlushError(f"{target} is not on a blackmatch mount") from None
        raise FlushError(f"cannot ask the mount of {target}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise FlushError(f"the mount of {target} gave an answer this blackmatch does not understand") from None


def _not_done(progress: Progress, why: str) -> str:
    """The one line a flush that gives up says: what stays queued, and the failures that keep it there."""
    text = f"{_changes(progress.left)} still queued {why}"
    if progress.failing:
        failures = "; ".join(f"{entry['what']} of {entry['item']}: {entry['error']}" for entry in progress.failing)
        text += f" (failing: {failures})"
    return text + "; they stay queued and go up once the grid takes them"


def _changes(count: int) -> str:
    return f"{count} change{'' if count == 1 else 's'}"


class ProgressLine:
    """One line on a terminal, redrawn in place; nothing when the stream is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown = False
        self.on_terminal = stream.isatty()

    def show(self, progress: Progress, sent: int) -> None:
        if not self.on_terminal:
            return
        text = f"Flushing: {_changes(progress.left)} left, {format_size(sent)} of shares sent"
        if progress.uploading:
            text += f", {progress.uploading} uploading"
        if progress.failing:
            text += f", {len(progress.failing)} failing"
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
