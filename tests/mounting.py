"""Mounting for tests: the real `blackmatch mount` command line, daemonizing, and a cleanup that never leaves a mount.

    with Mount(node_dir, mountpoint) as mount:      # blackmatch mount MOUNTPOINT -d NODEDIR --no-split
        (mountpoint / "f").write_bytes(b"...")
    # here `blackmatch unmount` has returned and the serving process is gone (asserted)

If the test body fails, or mount or unmount does, the exit still lazily unmounts (`fusermount3 -u -z`) and
SIGKILLs the serving process, so a failing test leaves nothing mounted. `kill_mount(mount)` is kill -9 for
crash tests; `wipe_cache(node_dir)` forgets everything downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_client.mount_commands import canonical_mountpoint, find_mount, log_file, pid_file, process_alive
from lafs_core.grid.nodedir import NodeDirectory

ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 120.0
UNMOUNT_TIMEOUT = 300.0
EXIT_TIMEOUT = 10.0


def blackmatch(*args: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line as a user would (`python -m fuse_client.cli ...`)."""
    return subprocess.run(
        [sys.executable, "-m", "fuse_client.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def fuse_unavailable() -> str | None:
    """Why FUSE mounts cannot be tested here, or None."""
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


requires_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or "")


def lazy_unmount(mountpoint: Path) -> None:
    if find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


def wait_until_gone(pid: int, timeout: float = EXIT_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


class Mount:
    """`blackmatch mount MOUNTPOINT -d NODEDIR [--no-split] EXTRA...` for the length of a `with` block."""

    def __init__(self, node_dir: Path, mountpoint: Path, *extra_args: str, split: bool = False) -> None:
        self.node_dir = Path(node_dir)
        self.requested = Path(mountpoint)
        self.extra_args = extra_args
        self.split = split
        self.mountpoint = self.requested
        self.pid: int | None = None
        self.killed = False
        self.mount_result: subprocess.CompletedProcess | None = None

    @property
    def node(self) -> NodeDirectory:
        return NodeDirectory(self.node_dir)

    @property
    def pid_file(self) -> Path:
        return pid_file(self.node, self.mountpoint)

    @property
    def log_file(self) -> Path:
        return log_file(self.node, self.mountpoint)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Mount:
        self.requested.mkdir(parents=True, exist_ok=True)
        self.mountpoint = canonical_mountpoint(self.requested)
        args = ["mount", str(self.requested), "-d", str(self.node_dir), *self.extra_args]
        if not self.split:
            args.append("--no-split")
        try:
            self.mount_result = blackmatch(*args, timeout=MOUNT_TIMEOUT)
        except BaseException:
            self.cleanup()
            raise
        self.pid = read_pid(self.pid_file)
        if self.mount_result.returncode != 0 or find_mount(self.mountpoint) is None:
            self.cleanup()
            raise AssertionError(
                f"blackmatch mount failed (status {self.mount_result.returncode}):\n{self.mount_result.stderr}\n"
                f"log:\n{self.log()[-4000:]}"
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        problem = None
        try:
            if not self.killed:
                problem = self.unmount()
        finally:
            self.cleanup()
        if problem is not None and exc_type is None:
            raise AssertionError(f"{problem}\nlog:\n{self.log()[-4000:]}")
        return False

    def unmount(self) -> str | None:
        """`blackmatch unmount`; what went wrong, if anything."""
        try:
            result = blackmatch("unmount", str(self.mountpoint), "-d", str(self.node_dir), timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "blackmatch unmount timed out"
        if result.returncode != 0:
            return f"blackmatch unmount failed (status {result.returncode}): {result.stderr.strip()}"
        if find_mount(self.mountpoint) is not None:
            return f"{self.mountpoint} is still mounted after blackmatch unmount"
        if self.pid is not None and process_alive(self.pid):
            return f"the serving process {self.pid} is still alive after blackmatch unmount returned"
        return None

    def cleanup(self) -> None:
        """Leave nothing behind, whatever state things are in: no mount, no serving process."""
        lazy_unmount(self.mountpoint)
        pid = self.pid or read_pid(self.pid_file)
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until_gone(pid)
        lazy_unmount(self.mountpoint)


def kill_mount(mount: Mount) -> None:
    """kill -9 the serving process, then lazily unmount the dead mount it leaves (as a crash would)."""
    assert mount.pid is not None, "no serving process known"
    os.kill(mount.pid, signal.SIGKILL)
    assert wait_until_gone(mount.pid), f"process {mount.pid} survived SIGKILL"
    lazy_unmount(mount.mountpoint)
    mount.killed = True


def wipe_cache(node_dir: Path) -> None:
    """Remove the disk cache of downloaded content (NODEDIR/private/blackmatch/cache)."""
    shutil.rmtree(Path(node_dir) / "private" / "blackmatch" / "cache", ignore_errors=True)
