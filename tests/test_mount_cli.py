"""`blackmatch mount` and `blackmatch unmount` as a user meets them: usage and input errors, and real mounts.

The mount tests run the real command line (it daemonizes) over a fresh node directory with an embedded grid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_client.mount_commands import (
    MountError,
    canonical_mountpoint,
    find_mount,
    fuse_options,
    is_blackmatch,
    lock_pid_file,
    mount_key,
    parse_size,
    process_alive,
    take_unmount_request,
    unmount_request,
)
from lafs_core.grid.nodedir import NodeDirectory

from .mounting import (
    ROOT,
    Mount,
    blackmatch,
    kill_mount,
    lazy_unmount,
    mode_args,
    read_pid,
    requires_fuse,
    wait_until_gone,
)
from .shared_data import sample_caps


def one_line_error(result: subprocess.CompletedProcess, status: int = 1) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blackmatch: error: ")
    return lines[0]


# --- usage and input errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["mount"],
        ["mount", "/tmp", "--bogus"],
        ["mount", "/tmp", "--alias", "a", "--root-cap", "URI:DIR2:x:y"],
        ["mount", "/tmp", "--cache-size", "lots"],
        ["mount", "/tmp", "--cache-timeout", "-1"],
        ["unmount"],
        ["unmount", "/tmp", "--timeout", "soon"],
    ],
)
def test_usage_errors(args):
    result = blackmatch(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_mountpoint_parent_must_exist(tmp_path):
    """mount creates a missing mountpoint, but only its last component."""
    line = one_line_error(blackmatch("mount", str(tmp_path / "missing" / "mnt"), "-d", str(tmp_path / "node")))
    assert "does not exist" in line and str(tmp_path / "missing") in line
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "node").exists()  # nothing is created for a mount that cannot happen


@pytest.mark.parametrize("named", ["missing", "", "typo"])
def test_a_node_directory_named_must_exist(tmp_path, named):
    """Only the default node directory is made by mount: a mistyped or empty -d is an error, as for ls or put,
    not a new empty grid mounted in its place."""
    node, cwd = tmp_path / "node", tmp_path / "cwd"  # an empty -d names the working directory
    assert blackmatch("create-node", str(node)).returncode == 0
    (tmp_path / "mnt").mkdir()
    cwd.mkdir()
    given = {"missing": str(tmp_path / "other"), "": "", "typo": str(node) + "e"}[named]
    try:
        line = one_line_error(blackmatch("mount", str(tmp_path / "mnt"), "-d", given, cwd=cwd))
        assert "is not a node directory" in line and "blackmatch create-node" in line
        assert one_line_error(blackmatch("ls", "-d", given, cwd=cwd)) == line  # as the other commands say it
        assert find_mount(canonical_mountpoint(tmp_path / "mnt")) is None
        assert not (cwd / (given or ".") / "private").exists()
    finally:  # before the fix, a mount of a new grid ran there
        Mount(cwd / (given or "."), tmp_path / "mnt").cleanup()


def test_a_stale_unmount_request_is_not_the_next_mounts(tmp_path):
    """An unmount killed before fusermount ran leaves its --timeout beside the pid file; the next mount of that
    mountpoint must not take it as its own when it ends."""
    pid_path = tmp_path / "mount.pid"
    unmount_request(pid_path).write_text("3\n")
    lock = lock_pid_file(pid_path, tmp_path / "mnt")
    try:
        assert take_unmount_request(pid_path) is None
    finally:
        lock.release()


def test_mountpoint_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line_error(blackmatch("mount", str(tmp_path / "file"), "-d", str(tmp_path / "node")))
    assert "not a directory" in line


def test_mountpoint_must_not_be_mounted(tmp_path):
    line = one_line_error(blackmatch("mount", "/proc", "-d", str(tmp_path / "node")))
    assert "already mounted" in line
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize(("cap", "message"), [("garbage", "not a recognised Tahoe cap"), ("file", "not a directory")])
def test_root_cap_must_be_a_directory(tmp_path, cap, message):
    if cap == "file":
        cap = sample_caps()["chk-1k"]
    (tmp_path / "m").mkdir()
    line = one_line_error(blackmatch("mount", str(tmp_path / "m"), "-d", str(tmp_path / "node"), "--root-cap", cap))
    assert message in line
    assert cap not in line or cap == "garbage"  # a cap is a secret: never echoed whole
    assert not (tmp_path / "node").exists()


def test_unknown_alias(tmp_path):
    (tmp_path / "m").mkdir()
    node = tmp_path / "node"
    assert blackmatch("create-node", str(node)).returncode == 0
    line = one_line_error(blackmatch("mount", str(tmp_path / "m"), "-d", str(node), "--alias", "nope"))
    assert "no alias nope:" in line


def test_unmount_what_is_not_mounted(tmp_path):
    line = one_line_error(blackmatch("unmount", str(tmp_path), "-d", str(tmp_path / "node")))
    assert "not mounted" in line


# --- pieces ----------------------------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1k") == 1024


def test_mount_key_names_the_whole_path():
    a, b = mount_key(Path("/mnt/a b")), mount_key(Path("/mnt/a_b"))
    assert a != b and a.startswith("mnt_a_b-") and "/" not in a


def test_mount_table_is_read_without_touching_mounts():
    proc = find_mount(Path("/proc"))
    assert proc is not None and proc.fstype == "proc" and not is_blackmatch(proc)
    assert canonical_mountpoint(Path("/proc/../proc")) == Path("/proc")


def test_fuse_options():
    options = fuse_options(["allow_other,noatime", "debug,nonempty"], read_only=True)
    assert "nonempty" not in options
    assert {"fsname=blackmatch", "subtype=blackmatch", "default_permissions", "ro"} <= options
    assert {"allow_other", "noatime", "debug"} <= options
    assert "allow_other" not in fuse_options([], read_only=False)
    assert "nosuid" not in fuse_options(["suid"], read_only=False)
    for update in ("relatime", "atime", "strictatime"):
        with pytest.raises(MountError, match=f"-o {update} is not supported"):
            fuse_options([f"allow_other,{update}"], read_only=False)


# --- real mounts -----------------------------------------------------------------------------------------------
@requires_fuse
def test_mount_write_unmount_remount(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    data = os.urandom(300_000)
    with Mount(node, mountpoint) as mount:
        assert mount.pid is not None and process_alive(mount.pid) and mount.pid != os.getpid()
        assert "log" in mount.mount_result.stdout and str(mount.log_file) in mount.mount_result.stdout
        (mountpoint / "hello.txt").write_text("hello, grid\n")
        (mountpoint / "sub").mkdir()
        (mountpoint / "sub" / "data.bin").write_bytes(data)
        assert (mountpoint / "hello.txt").read_text() == "hello, grid\n"
        assert sorted(os.listdir(mountpoint)) == ["hello.txt", "sub"]
        find = find_mount(mount.mountpoint)
        assert find is not None and is_blackmatch(find)
    assert find_mount(mount.mountpoint) is None
    assert not mount.pid_file.exists()
    assert os.listdir(mountpoint) == []  # the bare directory again
    assert "mounted" in mount.log()

    with Mount(node, mountpoint):
        assert (mountpoint / "hello.txt").read_text() == "hello, grid\n"
        assert (mountpoint / "sub" / "data.bin").read_bytes() == data


@requires_fuse
def test_unmount_lazy_detaches_a_busy_mount_and_its_writes_still_upload(tmp_path):
    """As umount -l: a plain unmount of a busy mountpoint fails and says so; --lazy detaches it at once, the file
    held open still works, and once it is closed the process uploads and exits."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        held = open(mountpoint / "held.txt", "w")  # noqa: SIM115 - held open across the unmount on purpose
        try:
            held.write("before ")
            held.flush()
            busy = one_line_error(mount.run("unmount", str(mountpoint), timeout=60))
            assert "busy" in busy and "--lazy" in busy, busy
            detached = mount.run("unmount", str(mountpoint), "--lazy", timeout=60)
            assert detached.returncode == 0 and f"Detached {mountpoint}" in detached.stdout, detached.stderr
            assert find_mount(mount.mountpoint) is None and os.listdir(mountpoint) == []
            assert mount.pid is not None and process_alive(mount.pid)
            status = mount.run("status", timeout=60).stdout
            assert f"  {mountpoint} (pid {mount.pid}, detached: it finishes once nothing uses it)" in status, status
            held.write("and after the detach")
        finally:
            held.close()
        assert wait_until_gone(mount.pid), "the detached mount's process did not exit once it was unused"
        mount.killed = True  # unmounted here, not by the Mount
    with Mount(node, mountpoint):
        assert (mountpoint / "held.txt").read_text() == "before and after the detach"


@requires_fuse
def test_the_readme_mount_on_a_fresh_home(tmp_path):
    """`./blackmatch mount ~/grid` as the README gives it, for a user with nothing yet: no ~/.blackmatch and no
    ~/grid. Both are made (each said in one line on stderr), the mount works, and ~/grid stays afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    with Mount(None, home / "grid", home=home) as mount:
        stderr = mount.mount_result.stderr
        assert f"Created the mountpoint {home / 'grid'}\n" in stderr, stderr
        assert f"Node directory created in {home / '.blackmatch'}" in stderr, stderr
        (home / "grid" / "hello.txt").write_text("hello")
        status = mount.run("status", timeout=60)
        assert f"  {home / 'grid'} (pid {mount.pid})" in status.stdout, status.stdout
    assert os.listdir(home / "grid") == []
    with Mount(None, home / "grid", home=home) as again:
        assert "Created" not in again.mount_result.stderr
        assert (home / "grid" / "hello.txt").read_text() == "hello"


def test_a_refused_mount_creates_no_mountpoint(tmp_path):
    line = one_line_error(blackmatch("mount", str(tmp_path / "mnt"), "-d", str(tmp_path / "node")))
    assert "is not a node directory" in line
    assert not (tmp_path / "mnt").exists()


@requires_fuse
def test_a_non_empty_mountpoint_is_refused_unless_asked(tmp_path):
    """Mounting hides what the directory holds: refused with a clear error, unless -o nonempty (which libfuse3
    itself rejects as unknown, so blackmatch must not pass it on)."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    assert blackmatch("create-node", str(node)).returncode == 0
    mountpoint.mkdir()
    (mountpoint / "local.txt").write_text("mine")
    try:
        line = one_line_error(blackmatch("mount", str(mountpoint), "-d", str(node), *mode_args()))
        assert f"{mountpoint} is not empty" in line and "-o nonempty" in line
        assert find_mount(canonical_mountpoint(mountpoint)) is None
    finally:  # before the fix, it was mounted
        Mount(node, mountpoint).cleanup()
    with Mount(node, mountpoint, "-o", "nonempty"):
        assert os.listdir(mountpoint) == []  # the grid's root, which hides the local file
        (mountpoint / "grid.txt").write_text("on the grid")
    assert os.listdir(mountpoint) == ["local.txt"]
    assert (mountpoint / "local.txt").read_text() == "mine"


@requires_fuse
def test_an_unmount_that_leaves_changes_queued_says_so_and_the_next_mount_uploads_them(cluster, tmp_path):
    """With every storage server down, the uploads never move: unmount gives up after its --timeout, fails
    saying how many changes stay queued, and leaves nothing running; the next mount of the mountpoint works and,
    the grid back, uploads them."""
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    mountpoint, data = tmp_path / "mnt", os.urandom(100_000)
    with Mount(node, mountpoint) as mount:
        (mountpoint / "late.bin").write_bytes(data)
        for index in range(len(cluster.processes)):
            cluster.stop(index)
        try:
            started = time.monotonic()
            result = blackmatch("unmount", str(mountpoint), "-d", str(node), "--timeout", "3", timeout=120)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            line = result.stderr.strip().splitlines()[-1]  # after the "Waiting for pid ..." it says while it waits
            assert line.startswith("blackmatch: error: ")
            assert re.search(r"unmounted, but \d+ changes? could not be uploaded", line), line
            assert "the next mount uploads them" in line
            assert time.monotonic() - started < 60
            mount.killed = True  # unmounted here, not by the Mount
            assert mount.pid is not None and not process_alive(mount.pid)
            status = blackmatch("status", "-d", str(node))
            assert "Mounts: none" in status.stdout, status.stdout
        finally:
            for index in range(len(cluster.processes)):
                cluster.restart(index)
    with Mount(node, mountpoint):
        assert (mountpoint / "late.bin").read_bytes() == data
    fetched = blackmatch("get", "-d", str(node), "tahoe:late.bin", str(tmp_path / "fetched.bin"))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "fetched.bin").read_bytes() == data  # from the grid itself


@requires_fuse
def test_servers_that_do_not_answer_are_said_at_mount_and_failed_calls_logged(cluster, tmp_path):
    """No server answering fails the mount at once, naming each (never its NURL: the swissnum is a secret); some
    not answering, or fewer than shares.happy, is a warning; a listing the grid cannot give is EIO, and the log
    says why."""
    node = cluster.create_node(tmp_path / "node", 3, 5, 10)
    assert blackmatch("mkdir", "-d", str(node), "tahoe:sub").returncode == 0
    secrets = [nurl for path in cluster.servers_files for nurl in re.findall(r"pb://\S+", path.read_text())]
    secrets += [NodeDirectory(node).aliases()["tahoe"]]
    mountpoint = tmp_path / "mnt"
    down = range(len(cluster.processes))
    try:
        for index in down:
            cluster.stop(index)
        result = blackmatch("mount", str(mountpoint), "-d", str(node), *mode_args(), timeout=120)
        try:
            line = one_line_error(result)
            assert "no storage server answers" in line
            for index, servers_file in enumerate(cluster.servers_files):
                port = re.search(r"127\.0\.0\.1:(\d+)", servers_file.read_text())
                assert port is not None and f"storage-{index} (127.0.0.1:{port.group(1)})" in line, line
            assert not any(secret in result.stderr for secret in secrets)
            assert find_mount(canonical_mountpoint(mountpoint)) is None and not mountpoint.exists()
        finally:  # before the fix, it was mounted
            Mount(node, mountpoint).cleanup()

        down = range(3, len(cluster.processes))
        for index in range(3):
            cluster.restart(index)
        with Mount(node, mountpoint) as mount:
            stderr = mount.mount_result.stderr
            assert "warning: 2 of 5 storage servers do not answer: storage-3 (127.0.0.1:" in stderr, stderr
            assert "storage-4 (127.0.0.1:" in stderr
            assert "only 3 storage servers answer, and an upload needs 5 (shares.happy)" in stderr, stderr
            assert not any(secret in stderr for secret in secrets)
            down = range(len(cluster.processes))
            for index in range(3):
                cluster.stop(index)
            with pytest.raises(OSError) as failure:
                os.listdir(mountpoint / "sub")
            assert failure.value.errno == errno.EIO
            log = mount.log_file.read_text()
            assert re.search(r"WARNING blackmatch.fuse: \w+: \[EIO\] cannot read directory: \w", log), log
            assert not any(secret in mount.log() for secret in secrets)
            for index in down:
                cluster.restart(index)
            down = range(0)
    finally:
        for index in down:
            cluster.restart(index)


@requires_fuse
def test_mount_refuses_a_mounted_mountpoint(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint):
        line = one_line_error(blackmatch("mount", str(mountpoint), "-d", str(node), *mode_args()))
        assert "already mounted" in line


@requires_fuse
def test_foreground_mount_stops_on_sigterm_and_keeps_what_was_written(tmp_path):
    """SIGTERM unmounts and the process exits 0 after uploading, even with a file still open for writing
    (the kernel never sends that file's RELEASE: the shim releases it when the session ends)."""
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    mountpoint.mkdir()
    assert blackmatch("create-node", str(node)).returncode == 0
    command = ["mount", str(mountpoint), "-d", str(node), *mode_args(), "--foreground"]
    process = subprocess.Popen(
        [sys.executable, "-m", "fuse_client.cli", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    held = None
    try:
        deadline = time.monotonic() + 60
        while find_mount(canonical_mountpoint(mountpoint)) is None:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "not mounted after 60 s"
            time.sleep(0.05)
        (mountpoint / "closed.txt").write_text("closed before SIGTERM")
        held = open(mountpoint / "open.txt", "w")  # noqa: SIM115 - held open across the unmount on purpose
        held.write("still open at SIGTERM")
        held.flush()
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(f"still serving 120 s after SIGTERM; its log:\n{stderr[-4000:]}") from None
        assert process.returncode == 0, stderr
        assert "Mounted tahoe: on" in stdout
        assert find_mount(canonical_mountpoint(mountpoint)) is None
    finally:
        if held is not None:
            with contextlib.suppress(OSError):
                held.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        lazy_unmount(canonical_mountpoint(mountpoint))
    with Mount(node, mountpoint):
        assert (mountpoint / "closed.txt").read_text() == "closed before SIGTERM"
        assert (mountpoint / "open.txt").read_text() == "still open at SIGTERM"


@requires_fuse
def test_dead_mount_is_reported_and_unmount_clears_it(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        pid = mount.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until_gone(pid)
        mount.killed = True
        assert find_mount(mount.mountpoint) is not None  # the kernel still lists the dead mount
        line = one_line_error(blackmatch("mount", str(mountpoint), "-d", str(node), *mode_args()))
        assert "no blackmatch process serves it" in line and "blackmatch unmount" in line
        result = blackmatch("unmount", str(mountpoint), "-d", str(node))
        assert result.returncode == 0, result.stderr
        assert find_mount(mount.mountpoint) is None
        assert read_pid(mount.pid_file) == pid  # stale: the next mount takes it over
    with Mount(node, mountpoint) as again:
        assert again.pid != pid and read_pid(again.pid_file) == again.pid


@requires_fuse
def test_kill_mount_helper(tmp_path):
    node, mountpoint = tmp_path / "node", tmp_path / "mnt"
    with Mount(node, mountpoint) as mount:
        kill_mount(mount)
        assert find_mount(mount.mountpoint) is None
        assert mount.pid is not None and not process_alive(mount.pid)
