"""Mounting for tests: the real `blackmatch mount` command line, daemonizing, and a cleanup that never leaves a mount.

    with Mount(node_dir, mountpoint) as mount:      # blackmatch mount MOUNTPOINT -d NODEDIR [--no-split]
        (mountpoint / "f").write_bytes(b"...")
    # a node directory that does not exist yet is made first (blackmatch create-node NODEDIR), and so is the
    # mountpoint; Mount(None, mountpoint, home=HOME) runs every command as a user whose HOME is HOME, without -d
    # and without making anything first (the node directory is then HOME/.blackmatch)
    # here `blackmatch unmount` has returned and the serving process is gone (asserted); in split mode the
    # grid server is gone too once no other Mount of the node directory is open (asserted, within 10 s)

The mode is the environment's BLACKMATCH_MOUNT_MODE, `split` (the default, as for users) or `no-split`:
runtests.py runs every test marked `mount` (the `requires_fuse` decorator marks them) once in each mode.

If the test body fails, or mount or unmount does, the exit still lazily unmounts (`fusermount3 -u -z`) and
SIGKILLs the serving process (and a grid server left behind), so a failing test leaves nothing mounted.
`kill_mount(mount)` is kill -9 for crash tests; `wipe_cache(node_dir)` forgets everything downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from fuse_client.mount_commands import canonical_mountpoint, find_mount, log_file, pid_file, process_alive
from grid_server.server_files import ServerFiles
from lafs_core.grid.nodedir import NodeDirectory

ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 120.0
UNMOUNT_TIMEOUT = 300.0
EXIT_TIMEOUT = 10.0
MODES = ("split", "no-split")
MODE = os.environ.get("BLACKMATCH_MOUNT_MODE", "split")
if MODE not in MODES:
    raise RuntimeError(f"BLACKMATCH_MOUNT_MODE must be one of {MODES}, not {MODE!r}")


def blackmatch(*args: str, timeout: float = 60.0, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line as a user would (`python -m fuse_client.cli ...`), in this checkout or in `cwd`."""
    if cwd != ROOT:  # python -m must still find this checkout's packages
        env = kwargs.get("env", os.environ)
        kwargs["env"] = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fuse_client.cli", *args],
        cwd=cwd,
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


needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or "")


# A filesystem test mounts, is skipped without FUSE, and runtests.py runs it in both modes: `pytestmark =
# MOUNT_MARKS` for a module of them, `@requires_fuse` for one.
MOUNT_MARKS = [pytest.mark.mount, needs_fuse]


def requires_fuse(test):
    return pytest.mark.mount(needs_fuse(test))


def mode_args(split: bool | None = None) -> list[str]:
    """The `blackmatch mount` arguments for a mode (None: this run's MODE)."""
    split = MODE == "split" if split is None else split
    return [] if split else ["--no-split"]


def server_pid(node_dir: Path) -> int | None:
    """The pid of the node directory's grid server, if one is alive."""
    pid = read_pid(ServerFiles.of(NodeDirectory(node_dir)).pid)
    return pid if pid is not None and process_alive(pid) else None


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


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


class Mount:
    """`blackmatch mount MOUNTPOINT -d NODEDIR [--no-split] EXTRA...` for the length of a `with` block."""

    open_mounts: ClassVar[dict[Path, int]] = {}  # node directory -> Mounts of it inside a `with` block

    def __init__(
        self,
        node_dir: Path | None,
        mountpoint: Path,
        *extra_args: str,
        split: bool | None = None,
        home: Path | None = None,
    ) -> None:
        if home is not None:
            assert node_dir is None, "with home, the node directory is the default one, HOME/.blackmatch"
            node_dir = home / ".blackmatch"
        assert node_dir is not None
        self.node_dir = Path(node_dir).absolute()
        self.home = home
        self.requested = Path(mountpoint)
        self.extra_args = extra_args
        self.split = MODE == "split" if split is None else split
        self.mountpoint = self.requested
        self.pid: int | None = None
        self.killed = False
        self.mount_result: subprocess.CompletedProcess | None = None
        self.server_problem: str | None = None  # set by cleanup: the grid server outlived the last unmount

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
        """The serving process's log, followed in split mode by the grid server's."""
        logs = [self.log_file] + ([ServerFiles.of(self.node).log] if self.split else [])
        return "".join(read_text(path) for path in logs)

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """`blackmatch ARGS -d NODEDIR`, or with home: `blackmatch ARGS` with that HOME."""
        if self.home is None:
            return blackmatch(*args, "-d", str(self.node_dir), timeout=timeout)
        return blackmatch(*args, timeout=timeout, env={**os.environ, "HOME": str(self.home)})

    def __enter__(self) -> Mount:
        if self.home is None:
            self.requested.mkdir(parents=True, exist_ok=True)
            if not self.node_dir.exists():
                created = blackmatch("create-node", str(self.node_dir))
                assert created.returncode == 0, created.stderr
        self.mountpoint = canonical_mountpoint(self.requested)
        args = ["mount", str(self.requested), *self.extra_args, *mode_args(self.split)]
        Mount.open_mounts[self.node_dir] = Mount.open_mounts.get(self.node_dir, 0) + 1
        try:
            self.mount_result = self.run(*args, timeout=MOUNT_TIMEOUT)
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
        if problem is None and self.split and not self.killed and Mount.open_mounts.get(self.node_dir, 0) == 0:
            problem = self.server_problem
        self.server_problem = None
        if problem is not None and exc_type is None:
            raise AssertionError(f"{problem}\nlog:\n{self.log()[-4000:]}")
        return False

    def unmount(self) -> str | None:
        """`blackmatch unmount`; what went wrong, if anything."""
        try:
            result = self.run("unmount", str(self.mountpoint), timeout=UNMOUNT_TIMEOUT)
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
        """Leave nothing behind, whatever state things are in: no mount, no serving process, and no grid server
        once the last Mount of the node directory is done (it must have exited by itself within 10 s)."""
        lazy_unmount(self.mountpoint)
        pid = self.pid or read_pid(self.pid_file)
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until_gone(pid)
        lazy_unmount(self.mountpoint)
        left = Mount.open_mounts.get(self.node_dir, 1) - 1
        Mount.open_mounts[self.node_dir] = left
        server = server_pid(self.node_dir)
        if left == 0 and server is not None and not wait_until_gone(server, EXIT_TIMEOUT):
            self.server_problem = f"the grid server (pid {server}) did not exit within {EXIT_TIMEOUT:g} s"
            os.kill(server, signal.SIGKILL)
            wait_until_gone(server)


def kill_mount(mount: Mount) -> None:
    """kill -9 the serving process, and in split mode the grid server with it (a crash of the machine, as far as
    blackmatch can tell), then lazily unmount the dead mount they leave."""
    assert mount.pid is not None, "no serving process known"
    server = server_pid(mount.node_dir) if mount.split else None
    # The shim first, then the server, both before waiting: a server that saw its mount go first would start to
    # drain, and a shim that saw its server go first would start another.
    victims = [pid for pid in (mount.pid, server) if pid is not None]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    for pid in victims:
        assert wait_until_gone(pid), f"process {pid} survived SIGKILL"
    lazy_unmount(mount.mountpoint)
    mount.killed = True


def wipe_cache(node_dir: Path) -> None:
    """Remove the disk cache of downloaded content (NODEDIR/private/blackmatch/cache)."""
    shutil.rmtree(Path(node_dir) / "private" / "blackmatch" / "cache", ignore_errors=True)
