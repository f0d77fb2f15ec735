"""The split's processes, as a user's system sees them: the grid server is a daemon (its parent is init, no
controlling terminal), one per node directory shared by every mount of it, alive while some mount is, gone within
10 s of the last unmount; kill -9 of a shim lets the server finish and exit; another uid is refused on the socket;
`--no-split` starts no server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from random import Random

import pytest

from fuse_client.grid_commands import create_node
from fuse_client.grid_server_process import ensure_grid_server, server_answers
from fuse_client.mount_commands import SERVER_GONE, MountPlan, find_mount, mounts_directory, run_server
from fuse_client.rpc_client import open_rpc_operations
from grid_server.pid_lock import PidLock
from grid_server.rpc_wire import FrameReader, encode_frame, hello
from grid_server.server_files import ServerFiles
from lafs_core.grid.nodedir import NodeDirectory

from .mounting import (
    EXIT_TIMEOUT,
    Mount,
    blackmatch,
    kill_mount,
    needs_fuse,
    process_alive,
    server_pid,
    wait_until_gone,
    wipe_cache,
)
from .small_disk import needs_root

pytestmark = needs_fuse

NOBODY = 65534


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgrp, [3] session, [4] tty_nr."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_files(node: Path) -> ServerFiles:
    return ServerFiles.of(NodeDirectory(node))


def test_server_is_a_daemon_and_exits_after_the_unmount(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        server = server_pid(node)
        assert server is not None and server not in (os.getpid(), mount.pid)
        fields = proc_stat(server)
        assert int(fields[1]) == 1, f"the server's parent is {fields[1]}, not init"
        assert int(fields[4]) == 0, "the server has a controlling terminal"
        assert int(fields[3]) != os.getsid(0), "the server is in the session of whoever mounted"
        files = server_files(node)
        assert files.socket.stat().st_mode & 0o777 == 0o600 and files.directory.stat().st_mode & 0o777 == 0o700
        (mount.mountpoint / "file.txt").write_text("in split mode\n")
        unmounted = time.monotonic()
        problem = mount.unmount()
        assert problem is None, problem
        assert wait_until_gone(server, EXIT_TIMEOUT), "the server outlived its last mount by 10 s"
        assert time.monotonic() - unmounted < 60
        assert not files.socket.exists() and not files.pid.exists()
        mount.killed = True  # unmounted already
    assert "grid server exiting" in server_files(node).log.read_text()
    result = blackmatch("get", "-d", str(node), "tahoe:file.txt")
    assert result.returncode == 0 and result.stdout == "in split mode\n", result.stderr


def test_a_setting_the_running_server_does_not_take_is_said_on_the_terminal(tmp_path):
    node = tmp_path / "node"
    with Mount(node, tmp_path / "a", "--cache-size", "64M", split=True) as first:
        assert "warning" not in first.mount_result.stderr
        with Mount(node, tmp_path / "b", "--cache-size", "128M", split=True) as second:
            stderr = second.mount_result.stderr
            assert f"blackmatch: warning: --cache-size {128 << 20} does not take effect" in stderr, stderr
            assert f"runs with {64 << 20} until it exits" in stderr, stderr


def test_two_mounts_share_one_server_until_both_are_gone(tmp_path):
    node = tmp_path / "node"
    with Mount(node, tmp_path / "a", split=True) as first:
        server = server_pid(node)
        with Mount(node, tmp_path / "b", split=True) as second:
            assert server_pid(node) == server
            (second.mountpoint / "from-b.txt").write_text("b")
            assert (first.mountpoint / "from-b.txt").read_text() == "b"  # one root, one filesystem
            status = blackmatch("status", "-d", str(node))
            assert status.returncode == 0, status.stderr
            assert f"Grid server: pid {server}, 2 mounts, 1 root," in status.stdout, status.stdout
            for mount in (first, second):
                assert f"  {mount.mountpoint} (pid {mount.pid})" in status.stdout
        time.sleep(1)
        assert server is not None and process_alive(server), "the server left while a mount still used it"
        (first.mountpoint / "from-a.txt").write_text("a")
        assert sorted(os.listdir(first.mountpoint)) == ["from-a.txt", "from-b.txt"]
    assert server is not None and not process_alive(server)  # Mount's exit waited at most 10 s for it
    status = blackmatch("status", "-d", str(node))
    assert "Grid server: not running" in status.stdout and "Mounts: none" in status.stdout, status.stdout


def test_kill_9_of_the_shim_lets_the_server_finish_and_exit(tmp_path):
    """The killed mount's open file is released by the server for it, so even that upload completes; the server
    then exits, the dead mount is cleared, and a new mount works and shows everything."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        server = server_pid(node)
        (mount.mountpoint / "closed.txt").write_text("closed")
        held = open(mount.mountpoint / "open.txt", "w")  # noqa: SIM115 - open across the kill on purpose
        held.write("open at the kill")
        held.flush()
        assert mount.pid is not None
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_until_gone(mount.pid)
        mount.killed = True
        assert server is not None and wait_until_gone(server, 60), "the server did not exit after its shim died"
        with contextlib.suppress(OSError):  # ENOTCONN: the mount is dead
            held.close()
        result = blackmatch("unmount", str(mount.mountpoint), "-d", str(node))
        assert result.returncode == 0, result.stderr
    with Mount(node, mountpoint, split=True) as again:
        assert server_pid(node) != server
        assert (again.mountpoint / "closed.txt").read_text() == "closed"
        assert (again.mountpoint / "open.txt").read_text() == "open at the kill"
    log = server_files(node).log.read_text()
    assert "released its 1 files" in log


def test_a_mount_whose_server_dies_attaches_to_a_new_one(tmp_path):
    """kill -9 of the grid server: the mount stays a blackmatch mount (never the plain directory beneath it), the
    shim starts a new server and attaches to it; a file open across the kill fails with EIO, everything else goes
    on, and what was written before and after is on the grid after the unmount."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        (mount.mountpoint / "sub").mkdir()
        (mount.mountpoint / "sub" / "before.txt").write_text("written before the kill")
        held = open(mount.mountpoint / "held.txt", "w")  # noqa: SIM115 - open across the kill on purpose
        held.write("open at the kill")
        held.flush()
        server = server_pid(node)
        assert server is not None
        os.kill(server, signal.SIGKILL)
        assert wait_until_gone(server)
        with pytest.raises(OSError) as failure:
            held.write("more")
            held.flush()
        assert failure.value.errno in (errno.EIO, errno.ENOTCONN)  # ENOTCONN: sent before the shim saw the end
        with contextlib.suppress(OSError):
            held.close()
        assert find_mount(mount.mountpoint) is not None
        assert (mount.mountpoint / "sub" / "before.txt").read_text() == "written before the kill"
        (mount.mountpoint / "sub" / "after.txt").write_text("written after the kill")
        assert server_pid(node) not in (None, server)
        assert "starting the grid server again" in mount.log()
    assert os.listdir(mountpoint) == [], "something was written to the directory beneath the mount"
    with Mount(node, mountpoint, split=True) as again:
        assert (again.mountpoint / "sub" / "before.txt").read_text() == "written before the kill"
        assert (again.mountpoint / "sub" / "after.txt").read_text() == "written after the kill"
        assert (again.mountpoint / "held.txt").read_text() == "open at the kill"


def test_a_mount_without_a_server_fails_every_call_until_one_starts(tmp_path):
    """While no grid server can start (here: a broken tahoe.cfg), the mount stays and every call fails with
    ENOTCONN, as a dead sshfs or rclone mount does; nothing lands in the directory beneath. Once a server can
    start, the mount attaches again by itself."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        (mount.mountpoint / "before.txt").write_text("before")
        config = node / "tahoe.cfg"
        good = config.read_text()
        config.write_text("[node\nthis is not a tahoe.cfg\n")
        server = server_pid(node)
        assert server is not None
        os.kill(server, signal.SIGKILL)
        assert wait_until_gone(server)
        deadline = time.monotonic() + 60
        while "cannot attach to a grid server" not in mount.log():
            assert time.monotonic() < deadline, "no failed attempt to start the grid server was logged"
            time.sleep(0.1)
        for attempt in (lambda: (mount.mountpoint / "during.txt").write_text("lost?"), lambda: os.listdir(mountpoint)):
            with pytest.raises(OSError) as failure:
                attempt()
            assert failure.value.errno == errno.ENOTCONN
        assert find_mount(mount.mountpoint) is not None
        config.write_text(good)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert (mount.mountpoint / "before.txt").read_text() == "before"
                break
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN, exc
                assert time.monotonic() < deadline, "the mount did not attach to a new server within 60 s"
                time.sleep(0.2)
        (mount.mountpoint / "after.txt").write_text("after")
    assert os.listdir(mountpoint) == [], "something was written to the directory beneath the mount"
    with Mount(node, mountpoint, split=True) as again:
        assert sorted(os.listdir(again.mountpoint)) == ["after.txt", "before.txt"]


def test_kill_9_of_the_server_in_the_middle_of_cp_a(tmp_path):
    """kill -9 of the grid server under a running cp -a: the copy fails loudly for what was in flight or held open
    at the kill (cp names each, and exits 1; directories it holds open are stale), the mount stays, nothing lands
    beneath it, and every file whose copy cp did not report is on the grid byte for byte after a remount with an
    empty cache."""
    node, mountpoint, source = tmp_path / "node", tmp_path / "mnt", tmp_path / "source"
    random = Random(12)
    files = {}
    for number in range(400):
        path = source / f"d{number % 8}" / f"f{number}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        files[path.relative_to(source)] = random.randbytes(random.choice((0, 10, 4000, 70_000, 300_000)))
        path.write_bytes(files[path.relative_to(source)])
    with Mount(node, mountpoint, split=True) as mount:
        target = mount.mountpoint / "copy"
        copy = subprocess.Popen(
            ["cp", "-a", str(source), str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while sum(len(names) for _, _, names in os.walk(target)) < 60:
                assert copy.poll() is None, "cp finished before a quarter of the files: the test needs more"
                assert time.monotonic() < deadline
                time.sleep(0.05)
            server = server_pid(node)
            assert server is not None
            os.kill(server, signal.SIGKILL)
            _, errors = copy.communicate(timeout=300)
        finally:
            copy.kill()
        assert copy.returncode == (1 if errors else 0), errors
        assert find_mount(mount.mountpoint) is not None
        failed = {
            path
            for path in files
            if f"'{target / path}'" in errors or f"cannot create directory '{target / path.parent}'" in errors
        }
    assert os.listdir(mountpoint) == [], "something was written to the directory beneath the mount"
    wipe_cache(node)
    with Mount(node, mountpoint, split=True) as again:
        for path, content in files.items():
            if path not in failed:
                assert (again.mountpoint / "copy" / path).read_bytes() == content, path


def test_a_stale_socket_is_replaced(tmp_path):
    """kill -9 of shim and server leaves their socket and pid file; the next mount sees that nothing answers there,
    starts a new server, which replaces the socket."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        (mount.mountpoint / "before.txt").write_text("before the crash")
        os.sync()
        server = server_pid(node)
        kill_mount(mount)
    files = server_files(node)
    assert files.socket.exists() and not server_answers(files.socket)
    with Mount(node, mountpoint, split=True) as again:
        assert server_pid(node) not in (None, server)
        assert server_answers(files.socket)
        assert (again.mountpoint / "before.txt").read_text() == "before the crash"


@needs_root  # the test client becomes uid 65534
def test_another_uid_is_refused(tmp_path):
    """Another user cannot reach the socket (0600 in a 0700 directory); and if it could (here: a hard link to the
    socket in an open directory, the socket's mode loosened), the server itself refuses it by the peer's uid."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=True) as mount:
        files = server_files(node)
        assert connect_as(NOBODY, files.socket) == "PermissionError"
        with tempfile.TemporaryDirectory(dir="/tmp") as open_directory:
            os.chmod(open_directory, 0o755)
            link = Path(open_directory) / "link.sock"
            os.link(files.socket, link)
            os.chmod(files.socket, 0o666)
            try:
                assert connect_as(NOBODY, link) == "closed"
            finally:
                os.chmod(files.socket, 0o600)
        assert connect_as(os.getuid(), files.socket) == "answered"
        (mount.mountpoint / "still.txt").write_text("served")
        assert (mount.mountpoint / "still.txt").read_text() == "served"
    assert f"refused a connection from uid {NOBODY}" in files.log.read_text()


def connect_as(uid: int, path: Path) -> str:
    """In a child process running as `uid`: connect and send the handshake. "PermissionError", "closed" (the
    server hung up without answering) or "answered"."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        outcome = "error"
        try:
            os.close(read_end)
            if uid != os.getuid():
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(os.fspath(path))
                except PermissionError:
                    outcome = "PermissionError"
                else:
                    outcome = handshake(sock)
        except BaseException as exc:
            outcome = f"error {exc!r}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(child, 0)
    return outcome


def handshake(sock: socket.socket) -> str:
    try:
        sock.sendall(encode_frame(hello()))
        reader, frames = FrameReader(), []
        while not frames:
            data = sock.recv(4096)
            if not data:
                return "closed"
            frames = reader.feed(data)
    except (BrokenPipeError, ConnectionResetError):  # closed before our hello was sent, or with it unread
        return "closed"
    return "answered"


def test_no_split_starts_no_server(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint, split=False) as mount:
        (mount.mountpoint / "f.txt").write_text("one process")
        files = server_files(node)
        assert not files.socket.exists() and server_pid(node) is None
        assert not files.log.exists()
    assert (node / "private" / "blackmatch" / "roots").is_dir()


@pytest.mark.parametrize("split", [True, False], ids=["split", "no-split"])
def test_a_second_mode_cannot_take_a_node_directory_in_use(tmp_path, split):
    """A --no-split mount and a grid server would both write the node directory's state: the second is refused
    with a clear message, and the first goes on."""
    node = tmp_path / "node"
    (tmp_path / "b").mkdir()
    with Mount(node, tmp_path / "a", split=split) as first:
        other_mode = ["--no-split"] if split else []
        result = blackmatch("mount", str(tmp_path / "b"), "-d", str(node), *other_mode, timeout=120)
        assert result.returncode != 0
        assert "in use by another blackmatch process" in result.stderr, result.stderr
        if not split:  # the grid server could not start: the error gives its log's path and last lines
            assert f"log: {server_files(node).log}" in result.stderr, result.stderr
        (first.mountpoint / "f.txt").write_text("fine")


def test_a_server_gone_before_the_mount_is_ready_means_start_it_again(tmp_path):
    """The server's last mount can leave just after `mount` found it answering: when the shim then finds nothing
    on the socket, it says so (SERVER_GONE) instead of failing, and the mount command starts a server again."""
    node = NodeDirectory(tmp_path / "node")
    node.private.mkdir(parents=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounts_directory(node)
    socket_path = server_files(tmp_path / "node").socket

    def opener():
        return open_rpc_operations(socket_path, "URI:DIR2:x:y", {}, lambda _: None, None)

    plan = MountPlan(mountpoint, node, "tahoe:", opener, set())
    assert run_server(plan, lambda: None) == SERVER_GONE


def test_mount_waits_for_a_server_on_its_way_out(tmp_path):
    """A server that holds the lock but no longer answers is finishing its uploads: the mount's start-up waits for
    it to go, instead of starting servers that cannot run, and then starts a new one."""
    node = create_node(tmp_path / "node", needed=2, happy=3, total=4, local_grid=4)
    files = ServerFiles.of(node)
    leaving = PidLock(files.pid)
    releaser = threading.Timer(1.5, leaving.release)
    started = time.monotonic()
    releaser.start()
    try:
        assert ensure_grid_server(node, None) == files.socket
        assert time.monotonic() - started >= 1.5
        assert server_answers(files.socket)
    finally:
        releaser.join()
        server = server_pid(node.path)
        if server is not None:
            os.kill(server, signal.SIGTERM)
            assert wait_until_gone(server, EXIT_TIMEOUT)
    assert "another grid server already serves" not in files.log.read_text()
