"""Starting a daemon and waiting until it is ready: the mount's serving process and the grid server both start so.

The command forks; the child starts a new session (setsid) and forks again, so the daemon is no session leader
(it can never get a controlling terminal) and, its parent gone, is adopted by init. Whoever started the command (a
shell, runtests.py, systemd) is not held by it. The daemon runs with umask 077, in /, with stdin from /dev/null
and stdout and stderr appended to its log. It reports through a pipe: first its pid, then one word when it is
ready (or busy, or whatever else the caller agrees with it); the command waits for that word, with a timeout.
Warnings the daemon logs before that word (a setting that does not take effect, servers that do not answer) also
go through the pipe, so that the command can show them on its terminal and not only in the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOG_TAIL_LINES = 20
LOG_ROTATE_BYTES = 8 << 20

Report = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    word: str  # what the daemon reported, or "timeout", or "exited" (it ended without a word)
    pid: int | None
    log_path: Path
    log_start: int  # where this run's part of the log begins
    warnings: list[str]  # what the daemon logged as warnings (or worse) before its word, one line each

    def log_tail(self) -> list[str]:
        return log_tail(self.log_path, self.log_start)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def log_tail(path: Path, start: int = 0) -> list[str]:
    try:
        with open(path, "rb") as log_handle:
            log_handle.seek(start)
            text = log_handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-LOG_TAIL_LINES:]


def _open_log(path: Path) -> int:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def start_daemon(log_path: Path, run: Callable[[Report], int], timeout: float) -> Outcome:
    """Run `run(report)` as a daemon logging to `log_path`; return once it reports a word, ends, or `timeout`
    seconds pass (then it is sent SIGTERM)."""
    log_fd = _open_log(log_path)
    log_start = os.fstat(log_fd).st_size
    report_read, report_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(report_read)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.umask(0o077)
            os.chdir("/")
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            configure_logging()
            _write_quietly(report_write, f"pid {os.getpid()}\n")
            to_starter = _WarningsToStarter(report_write)
            logging.getLogger().addHandler(to_starter)

            def report(word: str) -> None:
                logging.getLogger().removeHandler(to_starter)  # the command stops reading at the word
                _write_quietly(report_write, word + "\n")

            status = run(report)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    os.close(report_write)
    os.close(log_fd)
    os.waitpid(child, 0)  # the first child exits at once, leaving the daemon to init
    warnings: list[str] = []
    try:
        word, pid = _wait_for_word(report_read, timeout, warnings)
    finally:
        os.close(report_read)
    if word == "timeout" and pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    return Outcome(word, pid, log_path, log_start, warnings)


def _write_quietly(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):  # the starting command went away: carry on regardless
        os.write(fd, text.encode())


_WARNING = "warning "


class _WarningsToStarter(logging.Handler):
    """In the daemon until it reports its word: each warning logged, as one line to the starting command."""

    def __init__(self, report_fd: int) -> None:
        super().__init__(logging.WARNING)
        self.report_fd = report_fd

    def emit(self, record: logging.LogRecord) -> None:
        _write_quietly(self.report_fd, _WARNING + " ".join(record.getMessage().split()) + "\n")


def _wait_for_word(fd: int, timeout: float, warnings: list[str]) -> tuple[str, int | None]:
    """The daemon's word and pid; the warnings it sends meanwhile are added to `warnings`."""
    deadline = time.monotonic() + timeout
    received = b""
    pid = None
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if not readable:
            continue
        chunk = os.read(fd, 256)
        received += chunk
        *lines, received = received.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith("pid "):
                pid = int(text[4:])
            elif text.startswith(_WARNING):
                warnings.append(text.removeprefix(_WARNING))
            else:
                return text, pid
        if not chunk:
            return "exited", pid
    return "timeout", pid
