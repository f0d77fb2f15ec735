"""mount(8), umount(8) and /etc/fstab: the `fuse.blackmatch` helpers and `blackmatch install-mount-helper`.

The parsing is tested on its own; the real mounts run the installed helper scripts as mount(8) would (no HOME,
systemd's PATH), and run `mount -T FSTAB` and `umount` themselves in a private mount namespace (`unshare -m`)
whose /sbin is a tmpfs the helpers are installed into, so the host's /sbin and mount table are never touched.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_client.cli import main as blackmatch_main
from fuse_client.mount_commands import canonical_mountpoint, find_mount, process_alive
from fuse_client.mount_helper import (
    HelperError,
    Source,
    parse_mount_helper_args,
    parse_source,
    parse_umount_helper_args,
    sort_options,
)
from fuse_client.mount_helper_install import HELPER_NAMES, MARKER, install_helpers, uninstall_helpers
from lafs_core.errors import LafsError

from .mounting import MODE, ROOT, Mount, blackmatch, read_pid, requires_fuse, server_pid, wait_until_gone, wipe_cache

SYSTEMD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what mount(8) has under systemd; and no HOME


# --- SOURCE and options ----------------------------------------------------------------------------------------
def test_sources():
    assert parse_source("/srv/node") == Source(Path("/srv/node"))
    assert parse_source("/srv/node:backup") == Source(Path("/srv/node"), alias="backup")
    cap = "URI:DIR2:aaaa:bbbb"
    assert parse_source(f"/srv/no:de:{cap}") == Source(Path("/srv/no:de"), root_cap=cap)
    for bad in ("node:tahoe", "~/.blackmatch", "/srv/node:", "/srv/node:a/b"):
        with pytest.raises(HelperError):
            parse_source(bad)


@given(
    st.lists(st.text(st.characters(blacklist_characters=":/\0", blacklist_categories=["Cs"]), min_size=1), max_size=4),
    st.text(st.characters(blacklist_characters=":/\0", blacklist_categories=["Cs"]), min_size=1),
)
def test_any_node_directory_and_alias_come_back(parts, alias):
    node = Path("/", *parts)
    assert parse_source(f"{node}:{alias}") == Source(node, alias=alias)


def test_options_are_sorted_into_blackmatch_fuse_and_mounts_own():
    fstab_user_line = "rw,noexec,nosuid,nodev,no_split,cache_size=1G,cache_timeout=2.5,allow_other,user,_netdev,nofail"
    options = sort_options([*fstab_user_line.split(","), "x-systemd.automount", "comment=x", "defaults", "noauto"])
    assert options.arguments == ["--no-split", "--cache-size", "1G", "--cache-timeout", "2.5"]
    assert options.fuse == ["noexec", "nosuid", "nodev", "allow_other"]
    assert sort_options(["ro", "default_permissions"]).fuse == ["ro", "default_permissions"]
    assert sort_options(["frob", "ro"], sloppy=True).fuse == ["ro"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("frob", "unknown mount option 'frob'"),
        ("no_split=yes", "unknown mount option"),
        ("cache_size", "-o cache_size needs a value"),
        ("cache_size=lots", "not a size in bytes"),
        ("cache_timeout=-1", "must be a finite number"),
    ],
)
def test_bad_options_are_refused(item, message):
    with pytest.raises(HelperError, match=message):
        sort_options([item])
    if message.startswith("unknown"):  # a sloppy mount (-s) ignores what it does not know, but no bad value
        assert sort_options([item], sloppy=True) == sort_options([])
    else:
        with pytest.raises(HelperError, match=message):
            sort_options([item], sloppy=True)


def test_mount_helper_arguments_as_mount_passes_them():
    request = parse_mount_helper_args(["/n:photos", "/mnt/p", "-n", "-o", "rw,allow_other", "-o", "cache_size=8M"])
    expected = ["mount", "/mnt/p", "-d", "/n", "--alias", "photos", "--cache-size", "8M", "-o", "allow_other"]
    assert request.command == expected
    assert not request.fake
    cap = "URI:DIR2-RO:aaaa:bbbb"
    request = parse_mount_helper_args(["-f", "-v", "-t", "fuse.blackmatch", f"/n:{cap}", "/m", "-o", "no_split"])
    assert request.command == ["mount", "/m", "-d", "/n", "--root-cap", cap, "--no-split"]
    assert request.fake
    assert parse_mount_helper_args(["/n", "/m"]).command == ["mount", "/m", "-d", "/n"]
    for bad in (["/n"], ["/n", "/m", "/x"], ["/n", "/m", "-N", "4"], ["/n", "/m", "-q"]):
        with pytest.raises(HelperError):
            parse_mount_helper_args(bad)


def test_umount_helper_arguments():
    assert parse_umount_helper_args(["/m", "-t", "fuse.blackmatch"]) == ["unmount", "/m"]
    assert parse_umount_helper_args(["-l", "/m", "-v"]) == ["unmount", "/m", "--lazy"]
    with pytest.raises(HelperError):
        parse_umount_helper_args(["/m", "/n"])


# --- install-mount-helper --------------------------------------------------------------------------------------
def run_helper(directory: Path, role: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run an installed helper as mount(8) does: by its path, with systemd's PATH and no HOME."""
    path = directory / HELPER_NAMES[role]
    env = {"PATH": SYSTEMD_PATH}
    return subprocess.run([path, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)


def test_install_is_idempotent_and_uninstall_leaves_others_files(tmp_path, capsys):
    install_helpers(tmp_path)
    scripts = {name: (tmp_path / name).read_text() for name in HELPER_NAMES.values()}
    assert all(os.access(tmp_path / name, os.X_OK) for name in scripts)
    install_helpers(tmp_path)
    assert {name: (tmp_path / name).read_text() for name in scripts} == scripts
    assert capsys.readouterr().out.count("Already installed") == 2
    (tmp_path / "fuse_client").mkdir()  # a package of that name in mount's working directory is not imported
    (tmp_path / "fuse_client" / "__init__.py").write_text("raise SystemExit(99)\n")
    fake = run_helper(tmp_path, "mount", "/n:tahoe", "/m", "-f", "-o", "no_split,x-systemd.automount", cwd=tmp_path)
    assert (fake.returncode, fake.stderr) == (0, "")  # -f: everything but the mount
    refused = run_helper(tmp_path, "mount", "/n:tahoe", "/m", "-o", "frob", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [refused.stderr.strip()] and "unknown mount option 'frob'" in refused.stderr
    failed = run_helper(tmp_path, "mount", f"{tmp_path / 'missing'}:tahoe", str(tmp_path / "m"))
    assert failed.returncode == 32  # mount(8)'s "mount failure"
    assert failed.stderr.strip().splitlines() == [
        f"blackmatch: error: {tmp_path / 'missing'} is not a node directory (make one with: blackmatch create-node)"
    ]
    uninstall_helpers(tmp_path)
    uninstall_helpers(tmp_path)
    assert not any((tmp_path / name).exists() for name in scripts)
    (tmp_path / HELPER_NAMES["mount"]).write_text("#!/bin/sh\n# someone else's\n")
    with pytest.raises(LafsError, match="not written by blackmatch"):
        install_helpers(tmp_path)
    with pytest.raises(LafsError, match="not written by blackmatch"):
        uninstall_helpers(tmp_path)
    assert MARKER not in (tmp_path / HELPER_NAMES["mount"]).read_text()


def test_install_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert blackmatch_main(["install-mount-helper"]) == 1
    assert capsys.readouterr().err.strip() == "blackmatch: error: writing to /sbin needs root: run it with sudo"


# --- real mounts -----------------------------------------------------------------------------------------------
def mode_option() -> list[str]:
    return ["no_split"] if MODE == "no-split" else []


def assert_grid_holds(node: Path, tmp_path: Path, name: str, data: bytes) -> None:
    """`name` reads back from the grid itself: through `blackmatch get`, and a new mount over a wiped cache."""
    wipe_cache(node)
    fetched = blackmatch("get", "-d", str(node), f"tahoe:{name}", str(tmp_path / "fetched"))
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "fetched").read_bytes() == data
    with Mount(node, tmp_path / "again") as mount:
        assert (mount.mountpoint / name).read_bytes() == data


@requires_fuse
def test_the_helpers_run_as_mount_would_pass_fuse_options_and_drain(cluster, tmp_path):
    """mount.fuse.blackmatch with what mount(8) passes for a `user` fstab line (ignored), ro, allow_other and
    default_permissions (passed on to the kernel); umount.fuse.blackmatch returns once the uploads are done."""
    node, mountpoint, helpers = cluster.create_node(tmp_path / "node"), tmp_path / "mnt", tmp_path / "sbin"
    helpers.mkdir()
    install_helpers(helpers)
    data = os.urandom(200_000)
    mountpoint.mkdir()
    cleanup = Mount(node, mountpoint)
    try:
        user_options = "rw,noexec,nosuid,nodev,user,_netdev,nofail,allow_other,cache_size=64M"
        mounted = run_helper(helpers, "mount", f"{node}:tahoe", str(mountpoint), "-o", user_options, *mode_flags())
        assert mounted.returncode == 0, mounted.stderr
        entry = find_mount(canonical_mountpoint(mountpoint))
        assert entry is not None and entry.fstype == "fuse.blackmatch"
        options = mount_options(mountpoint)
        assert {"rw", "noexec", "nosuid", "nodev", "allow_other", "default_permissions"} <= options
        (mountpoint / "before-umount.bin").write_bytes(data)
        pid = read_pid(cleanup.pid_file)
        assert pid is not None and process_alive(pid)
        unmounted = run_helper(helpers, "umount", str(mountpoint), "-t", "fuse.blackmatch")
        assert unmounted.returncode == 0, unmounted.stderr
        assert not process_alive(pid)  # umount waited for it, as blackmatch unmount does
        assert find_mount(canonical_mountpoint(mountpoint)) is None

        mounted = run_helper(helpers, "mount", f"{node}:tahoe", str(mountpoint), "-o", "ro", *mode_flags())
        assert mounted.returncode == 0, mounted.stderr
        assert "ro" in mount_options(mountpoint)
        assert (mountpoint / "before-umount.bin").read_bytes() == data
        with pytest.raises(OSError) as refused:
            (mountpoint / "new").write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
        assert run_helper(helpers, "umount", str(mountpoint)).returncode == 0
    finally:
        cleanup.cleanup()
    assert_grid_holds(node, tmp_path, "before-umount.bin", data)


def mode_flags() -> list[str]:
    return ["-o", ",".join(mode_option())] if mode_option() else []


def mount_options(mountpoint: Path) -> set[str]:
    target = str(canonical_mountpoint(mountpoint))
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == target:
            return set(fields[3].split(","))
    raise AssertionError(f"{target} is not mounted")


FSTAB_SCRIPT = """
set -eu
trap 'fusermount3 -u -z "$MNT" 2>/dev/null || true' EXIT
sbin=$(readlink -f /sbin)
mount -t tmpfs -o mode=0755 blackmatch-test-sbin "$sbin"
PYTHONPATH="$ROOT" "$PY" -m fuse_client.cli install-mount-helper
PYTHONPATH="$ROOT" "$PY" -m fuse_client.cli install-mount-helper > "$OUT/again"
mount -T "$FSTAB" "$MNT"
grep " $MNT fuse.blackmatch " /proc/self/mounts > "$OUT/mounted"
cp "$DATA" "$MNT/written-before-umount"
head -n 1 "$PIDFILE" > "$OUT/pid"
umount "$MNT" > "$OUT/umount"
grep -c " $MNT " /proc/self/mounts > "$OUT/after" || true
PYTHONPATH="$ROOT" "$PY" -m fuse_client.cli install-mount-helper --uninstall > /dev/null
ls -A "$sbin" > "$OUT/left"
"""


@requires_fuse
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace with its own /sbin needs root")
def test_an_fstab_line_mounts_with_mount_and_umount_drains(cluster, tmp_path):
    """`mount -T FSTAB MOUNTPOINT` with a line such as users write (noauto, user, _netdev, nofail, x-systemd.*),
    then `umount`: the process has finished uploading when umount returns, and the file is on the grid."""
    node, mountpoint, out = cluster.create_node(tmp_path / "node"), tmp_path / "mnt", tmp_path / "out"
    mountpoint.mkdir()
    out.mkdir()
    options = ["noauto", "user", "_netdev", "nofail", "x-systemd.automount", "x-systemd.mount-timeout=30"]
    options += [*mode_option(), "cache_size=64M", "allow_other"]
    target = canonical_mountpoint(mountpoint)
    (tmp_path / "fstab").write_text(f"# blackmatch\n{node}:tahoe {target} fuse.blackmatch {','.join(options)} 0 0\n")
    data = os.urandom(300_000)
    (tmp_path / "data").write_bytes(data)
    cleanup = Mount(node, mountpoint)
    env = {"PATH": SYSTEMD_PATH, "ROOT": str(ROOT), "PY": sys.executable, "FSTAB": str(tmp_path / "fstab")}
    env |= {"MNT": str(target), "DATA": str(tmp_path / "data"), "PIDFILE": str(cleanup.pid_file), "OUT": str(out)}
    try:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", FSTAB_SCRIPT]
        ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\nlog:\n{cleanup.log()[-4000:]}"
        assert (out / "again").read_text().count("Already installed") == 2
        assert {"allow_other", "nosuid", "nodev", "noexec"} <= set((out / "mounted").read_text().split()[3].split(","))
        assert (out / "umount").read_text() == f"Unmounted {target}\n"  # umount ran blackmatch's helper
        pid = int((out / "pid").read_text())
        assert not process_alive(pid)  # umount returned only once the serving process had drained and exited
        assert (out / "after").read_text().strip() == "0"
        assert (out / "left").read_text() == ""  # --uninstall took both helpers away
        assert find_mount(target) is None  # the host never saw the mount
        server = server_pid(node)
        assert server is None or wait_until_gone(server)
    finally:
        cleanup.cleanup()
    assert_grid_holds(node, tmp_path, "written-before-umount", data)
