"""`blackmatch mount MOUNTPOINT` and `blackmatch unmount MOUNTPOINT`.

`mount` serves a grid directory (the node's alias `tahoe:` unless told otherwise) at MOUNTPOINT, an empty
directory (any directory with `-o nonempty`), created if only its last component is missing. The default node
directory (~/.blackmatch) is created first if it does not exist yet, as `blackmatch create-node` would (an embedded
local grid and a root directory); a node directory named with -d must exist. Without `--foreground` the command
returns once the mount is ready and a background process keeps serving it: that process is forked, leaves the
terminal's session, and writes its log to `NODEDIR/private/blackmatch/mounts/KEY.log`; its pid is in `KEY.pid` next
to it, where KEY names the mountpoint. The pid file is locked (flock) for as long as the process lives, which tells
a live process from a stale file.

The process unmounts on SIGTERM, SIGINT or SIGHUP, or when something unmounts the filesystem (`blackmatch
unmount`, `fusermount3 -u`); then it lets the filesystem finish its uploads and exits. A second signal while it is
finishing stops it at once; what was not uploaded yet stays queued on disk and goes up on the next mount.

`unmount` runs `fusermount3 -u MOUNTPOINT` and waits until the serving process has exited; it exits 0 only when
every write is on the grid. The process waits for its uploads while they make progress, and gives up once nothing
has moved for two minutes, or for `unmount --timeout` seconds if that is less (the request is left next to the pid
file, `KEY.unmount`); what it could not upload stays queued in the node directory for the next mount. Before it
exits it adds how many changes stay queued to its pid file, which `unmount` holds open and reads (`left N`), so
`unmount` can fail saying so.

How the filesystem is reached is a parameter (`Transport`). By default the process is only the FUSE shim: it
forwards every operation over the RPC socket to the node directory's grid server (started first if none runs;
grid_server_process.py), and unmounting waits until that server has put this mount's changes on the grid. With
`--no-split` the filesystem runs in the mounting process itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pyfuse3
import trio

from grid_server.failures import log_failure
from grid_server.filesystem import FilesystemOptions
from grid_server.operations import FsError, Operations
from grid_server.pid_lock import PidLock, lock_held_on
from lafs_core import sizes
from lafs_core.caps import ChkVerifierCap, DirectoryCap, MutableVerifierCap, parse_known_cap
from lafs_core.errors import LafsError, sole_exception
from lafs_core.grid.nodedir import NodeDirectory

from .background import Report, configure_logging, start_daemon
from .grid_commands import create_node
from .grid_server_process import ensure_grid_server, start_grid_server_apart
from .node_options import DEFAULT_NODE_DIRECTORY, add_node_directory_option, existing_node
from .rpc_client import ServerUnavailable, open_rpc_operations
from .server_probe import probe_servers
from .shim import FuseShim

log = logging.getLogger("blackmatch.mount")

FSNAME = "blackmatch"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MOUNT_ATTEMPTS = 3
SERVER_GONE = 75  # run_server's status when the grid server exited before the mount was up: start it again
READY_TIMEOUT = 300.0  # seconds `mount` waits for the background process to have mounted
UNMOUNT_TIMEOUT = 600.0  # default seconds `unmount` waits for the serving process to finish its uploads
EXIT_GRACE = 30.0  # seconds `unmount` gives the serving process beyond --timeout to give up, say so and exit
CHANGES_LEFT = "left"  # the pid file's last line at a clean exit: "left N", the changes that stay queued
NONEMPTY = "nonempty"  # -o nonempty, as fuse2 and rclone spell it: mount over a directory that holds something


class MountError(LafsError):
    """A mount or unmount that cannot go ahead; the message is the one line the user sees."""


# --- command line ----------------------------------------------------------------------------------------------
def add_mount_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mount = commands.add_parser(
        "mount",
        help="mount a grid directory (served in the background until unmounted)",
        description="Mount a grid directory at MOUNTPOINT. Without --foreground, returns once it is mounted and "
        "serves it from a background process; stop it with: blackmatch unmount MOUNTPOINT.",
    )
    mount.add_argument(
        "mountpoint", metavar="MOUNTPOINT", type=Path, help="an empty directory (created if only it is missing)"
    )
    add_node_directory_option(mount)
    root = mount.add_mutually_exclusive_group()
    root.add_argument("--alias", metavar="NAME", help="mount this alias of the node (default: tahoe)")
    root.add_argument("--root-cap", metavar="CAP", help="mount this directory cap (a read-only cap mounts read-only)")
    mount.add_argument(
        "--no-split", action="store_true", help="serve the filesystem in the mounting process, not a grid server"
    )
    mount.add_argument("--foreground", action="store_true", help="serve in this process until unmounted or Ctrl-C")
    mount.add_argument(
        "--cache-timeout",
        type=non_negative_float,
        metavar="SECONDS",
        help=f"re-read directories from the grid when their copy is older than this (default "
        f"{FilesystemOptions.cache_timeout:g})",
    )
    mount.add_argument(
        "--cache-size",
        type=parse_size,
        metavar="BYTES",
        help=f"disk cache of file contents, suffixes K, M, G, T (default {FilesystemOptions.cache_size >> 30}G)",
    )
    mount.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="OPTION[,OPTION...]",
        help="FUSE mount option, e.g. allow_other, or nonempty to mount over a directory that is not empty "
        "(repeatable)",
    )
    mount.set_defaults(handler=mount_command)

    unmount = commands.add_parser(
        "unmount",
        help="unmount a blackmatch mount; returns when its uploads are done",
        description="Unmount MOUNTPOINT and wait until the process serving it has finished uploading and exited.",
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="where the grid is mounted")
    add_node_directory_option(unmount)
    unmount.add_argument(
        "--timeout",
        type=non_negative_float,
        default=UNMOUNT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for pending uploads (default {UNMOUNT_TIMEOUT:g}); uploads that make no progress "
        "for this long (or for 120 s) stay queued for the next mount",
    )
    unmount.add_argument(
        "--lazy",
        action="store_true",
        help="detach a busy mountpoint now and return; its process uploads and exits once nothing uses it",
    )
    unmount.set_defaults(handler=unmount_command)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def parse_size(text: str) -> int:
    """A byte count for argparse (lafs_core.sizes: digits with an optional suffix K, M, G or T)."""
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- transports ------------------------------------------------------------------------------------------------
class GivenSettings(TypedDict, total=False):
    cache_timeout: float
    cache_size: int


@dataclass(frozen=True)
class FilesystemSettings:
    """What the command line says about the filesystem, whichever transport serves it (None: its default)."""

    cache_timeout: float | None = None
    cache_size: int | None = None

    def given(self) -> GivenSettings:
        """The settings given, by name, as FilesystemOptions and the grid server's `attach` take them."""
        given: GivenSettings = {}
        if self.cache_timeout is not None:
            given["cache_timeout"] = self.cache_timeout
        if self.cache_size is not None:
            given["cache_size"] = self.cache_size
        return given


# Opens the operations the shim forwards to; leaving the context must finish (or durably queue) the uploads.
OperationsOpener = Callable[[], AbstractAsyncContextManager[Operations]]
Transport = Callable[[NodeDirectory, str, FilesystemSettings], OperationsOpener]


def in_process_transport(node: NodeDirectory, root_cap: str, settings: FilesystemSettings) -> OperationsOpener:
    """`--no-split`: a GridFilesystem in this process. Imported here, before any fork, so a missing or broken
    grid_server shows up as an error of the command rather than in the log of the background process."""
    try:
        from grid_server.filesystem import FilesystemOptions, open_filesystem
    except ImportError as exc:
        raise MountError(f"cannot load the grid filesystem (grid_server.filesystem): {exc}") from None
    options = FilesystemOptions(**settings.given())
    return lambda: open_filesystem(node, root_cap, options)


def split_transport(node: NodeDirectory, root_cap: str, settings: FilesystemSettings) -> OperationsOpener:
    """The node directory's grid server (found, or started now), reached over its RPC socket. The mount's
    connection is its keepalive: the server lives while some mount is connected."""
    socket_path = ensure_grid_server(node, settings.cache_size)

    def note_settings(in_effect: dict[str, Any]) -> None:
        for name, asked in settings.given().items():
            if in_effect.get(name) != asked:
                log.warning(
                    "--%s %s does not take effect: the grid server of %s runs with %s until it exits",
                    name.replace("_", "-"),
                    asked,
                    node.path,
                    in_effect.get(name),
                )

    async def start_server() -> None:
        await start_grid_server_apart(node, settings.cache_size)

    return lambda: open_rpc_operations(socket_path, root_cap, settings.given(), note_settings, start_server)


def choose_transport(split: bool) -> Transport:
    return split_transport if split else in_process_transport


# --- mounts, as the kernel lists them --------------------------------------------------------------------------
@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[MountEntry]:
    """Every mount this process sees (/proc/self/mountinfo): never touches the mounted filesystems, so a dead
    or hung FUSE mount cannot block it."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.rstrip("\n").split(" ")
            try:
                separator = fields.index("-", 6)
            except ValueError:
                continue
            entries.append(MountEntry(_unescape_mountinfo(fields[4]), fields[separator + 1], fields[separator + 2]))
    return entries


def find_mount(mountpoint: Path) -> MountEntry | None:
    """The mount at `mountpoint` (canonical), the topmost one if several are stacked there."""
    found = None
    for entry in mounts():
        if entry.mountpoint == str(mountpoint):
            found = entry
    return found


def is_blackmatch(entry: MountEntry) -> bool:
    return entry.fstype == f"fuse.{FSNAME}" or (entry.fstype.startswith("fuse") and entry.source == FSNAME)


def canonical_mountpoint(path: Path) -> Path:
    """The absolute path the kernel lists the mount under, found without looking inside the mount itself (a dead
    FUSE mount fails every stat, a hung one blocks it): the parent is resolved, the last component only when
    nothing is mounted on it (it may be a symlink to the real mountpoint)."""
    path = Path(os.path.abspath(path))
    if path.parent == path:
        return path
    candidate = Path(os.path.realpath(path.parent)) / path.name
    if find_mount(candidate) is not None:
        return candidate
    return Path(os.path.realpath(candidate))


# --- per-mount files: pid and log ------------------------------------------------------------------------------
def mount_key(mountpoint: Path) -> str:
    """A file name for a mountpoint: readable, and unique by a hash of the whole path."""
    text = str(mountpoint)
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[-40:] or "root"
    return f"{readable}-{hashlib.sha256(os.fsencode(text)).hexdigest()[:12]}"


def mounts_directory(node: NodeDirectory) -> Path:
    """`NODEDIR/private/blackmatch/mounts` (0700)."""
    directory = node.private / "blackmatch" / "mounts"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for level in (directory.parent, directory):
        os.chmod(level, 0o700)
    return directory


def pid_file(node: NodeDirectory, mountpoint: Path) -> Path:
    return node.private / "blackmatch" / "mounts" / f"{mount_key(mountpoint)}.pid"


def log_file(node: NodeDirectory, mountpoint: Path) -> Path:
    return node.private / "blackmatch" / "mounts" / f"{mount_key(mountpoint)}.log"


def unmount_request(pid_path: Path) -> Path:
    """Where `unmount` leaves its --timeout for the serving process whose pid file is `pid_path`."""
    return pid_path.with_suffix(".unmount")


def take_unmount_request(pid_path: Path) -> float | None:
    """The --timeout `unmount` asked for, if it did (the request is used up)."""
    path = unmount_request(pid_path)
    try:
        text = path.read_text()
        path.unlink()
        return float(text)
    except (OSError, ValueError):
        return None


def lock_pid_file(path: Path, mountpoint: Path) -> PidLock:
    """The serving process's pid file (its pid, then the mountpoint), locked while it lives. An unmount request
    left beside it (by an unmount that was killed, or a process that died before reading it) is not this mount's."""
    try:
        lock = PidLock(path, (str(mountpoint),))
    except BlockingIOError:
        raise MountError(f"another blackmatch process already serves {mountpoint} (see {path})") from None
    unmount_request(path).unlink(missing_ok=True)
    return lock


@dataclass
class ServingProcess:
    """A live process serving a mountpoint, as `unmount` finds it: its pid, and its pid file kept open to watch
    the lock (which the process holds until it exits)."""

    pid: int
    mountpoint: str  # as the pid file's second line names it
    path: Path
    fd: int

    @classmethod
    def from_pid_file(cls, path: Path) -> ServingProcess | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        process = None
        try:
            lines = os.read(fd, 8192).decode("utf-8", "surrogateescape").split("\n")
            process = cls(int(lines[0]), lines[1] if len(lines) > 1 else "", path, fd)
            if process.exited():
                process = None
        except ValueError:
            process = None
        finally:
            if process is None:
                os.close(fd)
        return process

    def exited(self) -> bool:
        return not lock_held_on(self.fd) and not process_alive(self.pid)

    def changes_left(self) -> int | None:
        """Once it has exited: how many changes it left queued, or None if it did not say (it was killed)."""
        lines = os.pread(self.fd, 8192, 0).decode("utf-8", "surrogateescape").splitlines()
        word, _, count = lines[-1].partition(" ") if lines else ("", "", "")
        return int(count) if word == CHANGES_LEFT and count.isdigit() else None

    def close(self) -> None:
        os.close(self.fd)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: nobody may be reaping an orphaned daemon)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in (b"Z", b"X")


def find_serving_process(node: NodeDirectory, mountpoint: Path) -> ServingProcess | None:
    """The process serving `mountpoint`: from the pid file in `node`; else any process holding a blackmatch pid
    file for this mountpoint open (found through /proc, whichever node directory it uses)."""
    process = ServingProcess.from_pid_file(pid_file(node, mountpoint))
    if process is not None:
        return process
    suffix = f"/private/blackmatch/mounts/{mount_key(mountpoint)}.pid"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.endswith(suffix):
                process = ServingProcess.from_pid_file(Path(link))
                if process is not None and process.pid == int(entry.name):
                    return process
                if process is not None:
                    process.close()
    return None


# --- mount -----------------------------------------------------------------------------------------------------
def check_mountpoint(path: Path, node: NodeDirectory, nonempty: bool) -> Path:
    """The canonical mountpoint, if a mount may go there: nothing mounted on it, and an empty directory (any
    directory with `nonempty`: mounting hides what it holds until unmounted), or a name the mount may create
    (its parent exists)."""
    mountpoint = canonical_mountpoint(path)
    entry = find_mount(mountpoint)
    if entry is not None:
        if is_blackmatch(entry) and find_serving_process(node, mountpoint) is None:
            raise MountError(
                f"{mountpoint} is still mounted, but no blackmatch process serves it any more; "
                f"clear it with: blackmatch unmount {mountpoint}"
            )
        raise MountError(f"{mountpoint} is already mounted")
    try:
        is_directory = mountpoint.is_dir()
        exists = is_directory or mountpoint.exists()
    except OSError as exc:
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not exists:
        if not mountpoint.parent.is_dir():
            raise MountError(f"mountpoint {mountpoint} does not exist, and neither does {mountpoint.parent}")
        return mountpoint
    if not is_directory:
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if not nonempty:
        try:
            with os.scandir(mountpoint) as entries:
                empty = next(entries, None) is None
        except OSError as exc:
            raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        if not empty:
            raise MountError(
                f"mountpoint {mountpoint} is not empty; mounting would hide what it holds "
                f"(-o {NONEMPTY} mounts over it all the same)"
            )
    return mountpoint


def make_mountpoint(mountpoint: Path) -> bool:
    """Create a missing mountpoint (its last component only, as `check_mountpoint` allowed); whether it did, so
    that a mount that then fails can take it away again."""
    try:
        mountpoint.mkdir()
    except FileExistsError:
        return False
    except OSError as exc:
        raise MountError(f"cannot create the mountpoint {mountpoint}: {exc.strerror}") from None
    print(f"Created the mountpoint {mountpoint}", file=sys.stderr)
    return True


def check_servers(node: NodeDirectory) -> None:
    """Fail when no storage server of `node` answers (the mount could only give EIO); warn when some do not, or
    when fewer answer than an upload needs (shares.happy: writes would wait in the queue)."""
    probe = probe_servers(node)
    if probe.answering == 0:
        if not probe.silent:
            raise MountError(f"{node.path} configures no storage servers blackmatch can use")
        failures = "; ".join(f"{server.name}: {server.reason}" for server in probe.silent)
        raise MountError(f"no storage server answers, so nothing could be read or written: {failures}")
    if probe.silent:
        names = ", ".join(server.name for server in probe.silent)
        _warn(f"{len(probe.silent)} of {probe.answering + len(probe.silent)} storage servers do not answer: {names}")
    happy = node.encoding().happy
    if probe.answering < happy:
        _warn(
            f"only {probe.answering} storage servers answer, and an upload needs {happy} (shares.happy): "
            "writes wait in the upload queue until enough answer"
        )


def _warn(text: str) -> None:
    print(f"blackmatch: warning: {text}", file=sys.stderr)


def check_root_cap(text: str) -> DirectoryCap:
    cap = parse_known_cap(text.strip())
    if not isinstance(cap, DirectoryCap):
        raise MountError("--root-cap is not a directory cap")
    if isinstance(cap.file_cap, ChkVerifierCap | MutableVerifierCap):
        raise MountError("--root-cap is a verify cap, which cannot list a directory")
    return cap


def node_for_mount(args: argparse.Namespace) -> NodeDirectory:
    """The node directory to use. Only the default one is made (with an embedded grid and a root directory) when
    it does not exist, so that the first `blackmatch mount ~/grid` just works; any other must exist, as for every
    other command: an empty or mistyped -d would otherwise mount a new, empty grid instead of the user's."""
    node = NodeDirectory(args.node_directory or DEFAULT_NODE_DIRECTORY)
    if node.path != NodeDirectory(DEFAULT_NODE_DIRECTORY).path:
        return existing_node(args)
    if not node.exists():
        create_node(node.path)
        print(f"Node directory created in {node.path}, with an embedded local grid", file=sys.stderr)
    return node


def root_of(node: NodeDirectory, args: argparse.Namespace) -> tuple[str, str]:
    """The root cap to mount, and how to name it to the user (never the cap itself)."""
    if args.root_cap:
        return args.root_cap.strip(), "the directory cap given"
    alias = (args.alias or "tahoe").removesuffix(":")
    cap = node.aliases().get(alias)
    if cap is None:
        raise MountError(f"no alias {alias}: in {node.private / 'aliases'}")
    return cap, f"{alias}:"


def option_items(extra: list[str]) -> list[str]:
    """The options of every -o, each of which may hold several separated by commas."""
    return [item for option in extra for item in (item.strip() for item in option.split(",")) if item]


def fuse_options(extra: list[str], read_only: bool) -> set[str]:
    """The mount options: the kernel checks permissions against the modes the server reports
    (default_permissions); set-user-id bits and device files from a shared grid mean nothing here (nosuid, nodev);
    reads never change atime (noatime: the server keeps no access times of reads, which would cost a directory
    update each, so the mount table says so); a read-only root mounts read-only. Options from -o are added, and
    `suid`, `dev` or `rw` there drop the default they contradict (libfuse gets the options as a set, in no order);
    `nonempty` is blackmatch's own (libfuse3 mounts over anything and rejects it as unknown)."""
    options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "default_permissions", "nosuid", "nodev", "noatime"}
    if read_only:
        options.add("ro")
    for item in option_items(extra):
        if item in _ATIME_UPDATES:
            raise MountError(f"-o {item} is not supported: the mount is noatime, reads never change a file's atime")
        if item != NONEMPTY:
            options.discard(_CONTRADICTS.get(item, ""))
            options.add(item)
    return options


_ATIME_UPDATES = {"atime", "relatime", "strictatime"}  # what the server cannot do: it keeps no access times of reads


_CONTRADICTS = {"suid": "nosuid", "dev": "nodev", "rw": "ro", "nosuid": "suid", "nodev": "dev", "ro": "rw"}


@dataclass(frozen=True)
class MountPlan:
    mountpoint: Path
    node: NodeDirectory
    what: str
    open_operations: OperationsOpener
    options: set[str]


def mount_command(args: argparse.Namespace) -> int:
    nonempty = NONEMPTY in option_items(args.fuse_options)
    named_node = NodeDirectory(args.node_directory or DEFAULT_NODE_DIRECTORY)
    mountpoint = check_mountpoint(args.mountpoint, named_node, nonempty)
    if args.root_cap:
        check_root_cap(args.root_cap)
    node = node_for_mount(args)
    root_cap, what = root_of(node, args)
    read_only = check_root_cap(root_cap).is_readonly
    node.lease_renewal()  # a bad setting is this command's one-line error, not a background process's log line
    check_servers(node)
    settings = FilesystemSettings(cache_timeout=args.cache_timeout, cache_size=args.cache_size)
    transport = choose_transport(split=not args.no_split)
    options = fuse_options(args.fuse_options, read_only)
    mounts_directory(node)
    created = make_mountpoint(mountpoint)
    status = 1
    try:
        for _attempt in range(MOUNT_ATTEMPTS):
            plan = MountPlan(mountpoint, node, what, transport(node, root_cap, settings), options)
            status = serve_foreground(plan) if args.foreground else serve_in_background(plan)
            if status != SERVER_GONE:
                return status
            log.info("the grid server exited just as this mount started; starting it again")
        raise MountError(f"the grid server kept exiting before {mountpoint} was mounted; see its log")
    finally:
        if created and status != 0:
            with contextlib.suppress(OSError):  # (still mounted after all: EBUSY)
                mountpoint.rmdir()  # a failed mount leaves nothing behind


def _unmount_hint(plan: MountPlan) -> str:
    default = NodeDirectory(DEFAULT_NODE_DIRECTORY).path
    node_option = "" if plan.node.path == default else f" -d {plan.node.path}"
    return f"blackmatch unmount {plan.mountpoint}{node_option}"


def serve_foreground(plan: MountPlan) -> int:
    configure_logging()

    def ready() -> None:
        print(f"Mounted {plan.what} on {plan.mountpoint}; Ctrl-C or `{_unmount_hint(plan)}` unmounts", flush=True)

    return run_server(plan, ready)


def serve_in_background(plan: MountPlan) -> int:
    def run(report: Report) -> int:
        status = run_server(plan, lambda: report("ready"))
        if status == SERVER_GONE:
            report("server-gone")
        return status

    outcome = start_daemon(log_file(plan.node, plan.mountpoint), run, READY_TIMEOUT)
    for warning in outcome.warnings:
        _warn(warning)
    if outcome.word == "server-gone":
        return SERVER_GONE
    if outcome.word == "ready" and find_mount(plan.mountpoint) is not None:
        print(f"Mounted {plan.what} on {plan.mountpoint} (pid {outcome.pid}; log {outcome.log_path})")
        print(f"Unmount with: {_unmount_hint(plan)}")
        return 0
    if outcome.word == "timeout":
        problem = f"{plan.mountpoint} was not mounted after {READY_TIMEOUT:g} s; stopped the attempt"
    elif outcome.word == "ready":
        problem = f"the background process reported ready, but {plan.mountpoint} is not mounted"
    else:
        problem = f"mounting {plan.mountpoint} failed (the background process ended)"
    print(f"blackmatch: error: {problem}; log: {outcome.log_path}", file=sys.stderr)
    for line in outcome.log_tail():
        print(f"  {line}", file=sys.stderr)
    return 1


def run_server(plan: MountPlan, ready: Callable[[], None]) -> int:
    """Serve the mount until it is unmounted or a signal stops it; 0 when it ended cleanly."""
    log.info("serving %s on %s (pid %d)", plan.what, plan.mountpoint, os.getpid())
    try:
        pid_handle = lock_pid_file(pid_file(plan.node, plan.mountpoint), plan.mountpoint)
    except MountError as exc:
        log.error("%s", exc)
        return 1
    try:
        return trio.run(_serve, plan, ready, lambda left: pid_handle.add_line(f"{CHANGES_LEFT} {left}"))
    except Exception as failure:
        cause = sole_exception(failure)
        if isinstance(cause, ServerUnavailable) or (isinstance(cause, FsError) and cause.errno == errno.ENOTCONN):
            log.warning("the grid server went away before the mount was ready: %s", cause)
            return SERVER_GONE
        log_failure(log, "the mount failed", cause)
        return 1
    finally:
        pid_handle.release()
        log.info("exiting")


async def _serve(plan: MountPlan, ready: Callable[[], None], finished: Callable[[int], None]) -> int:
    """Mount, serve until unmounted, then wait for the uploads and tell `finished` how many changes stay queued."""
    phase = "opening"
    life = trio.CancelScope()

    async def on_signals(signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if phase == "serving":
                log.info("%s: unmounting", name)
                pyfuse3.terminate()
            elif phase == "opening":
                log.info("%s: giving up before the mount was ready", name)
                life.cancel()
            else:
                log.warning("%s: stopping without waiting for uploads; they resume on the next mount", name)
                life.cancel()

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signals, signals)
            try:
                with life:
                    async with plan.open_operations() as operations:
                        shim = FuseShim(operations)
                        try:
                            pyfuse3.init(shim, str(plan.mountpoint), plan.options)
                        except RuntimeError as exc:  # libfuse printed the reason just before
                            raise MountError(f"FUSE could not mount {plan.mountpoint}: {exc}") from None
                        phase = "serving"
                        try:
                            ready()
                            log.info("mounted %s", plan.mountpoint)
                            await pyfuse3.main()
                        finally:
                            phase = "draining"
                            pyfuse3.close(unmount=True)
                            log.info("unmounted %s; finishing uploads", plan.mountpoint)
                            await shim.release_leftovers()
                        give_up_after = take_unmount_request(pid_file(plan.node, plan.mountpoint))
                        try:
                            finished(await operations.finish_uploads(give_up_after))
                        except FsError as exc:  # no grid server could be started: unmount says nothing is known
                            log.warning("cannot finish the uploads (%s); they stay queued for the next mount", exc)
            finally:
                nursery.cancel_scope.cancel()
    if life.cancelled_caught:
        return 1 if phase == "opening" else 0
    log.info("all done")
    return 0


# --- unmount ---------------------------------------------------------------------------------------------------
def unmount_command(args: argparse.Namespace) -> int:
    mountpoint = canonical_mountpoint(args.mountpoint)
    node = NodeDirectory(args.node_directory or DEFAULT_NODE_DIRECTORY)
    entry = find_mount(mountpoint)
    if entry is not None and not is_blackmatch(entry):
        raise MountError(f"{mountpoint} is not a blackmatch mount (it is {entry.fstype})")
    process = find_serving_process(node, mountpoint)
    if entry is None and process is None:
        raise MountError(f"{mountpoint} is not mounted")
    try:
        if entry is not None:
            if process is not None:
                unmount_request(process.path).write_text(f"{args.timeout}\n")
            try:
                _fusermount_unmount(mountpoint, lazy=args.lazy)
            except MountError:
                if process is not None:
                    unmount_request(process.path).unlink(missing_ok=True)
                raise
        if process is None:
            print(
                f"Unmounted {mountpoint}; no process was serving it any more "
                "(writes it had not uploaded go up on the next mount of the same node directory)",
            )
            return 0
        if args.lazy:
            print(
                f"Detached {mountpoint}; its process (pid {process.pid}) finishes uploading and exits once nothing "
                f"uses it any more (blackmatch status lists it as detached until then)"
            )
            return 0
        _wait_for_exit(process, mountpoint, args.timeout + EXIT_GRACE)
        left = process.changes_left()
    finally:
        if process is not None:
            process.close()
    if left is None:
        raise MountError(
            f"{mountpoint} is unmounted, but its process (pid {process.pid}) ended before its uploads were done "
            f"(log {process.path.with_suffix('.log')}); what it had not uploaded goes up on the next mount"
        )
    if left:
        raise MountError(
            f"{mountpoint} is unmounted, but {left} change{'' if left == 1 else 's'} could not be uploaded (the "
            "grid took nothing for a while); they stay queued in the node directory and the next mount uploads them"
        )
    print(f"Unmounted {mountpoint}")
    return 0


def _fusermount_unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    command = shutil.which("fusermount3") or shutil.which("fusermount")
    if command is None:
        raise MountError("cannot unmount: fusermount3 is not installed (Debian package fuse3)")
    lazily = ["-z"] if lazy else []
    result = subprocess.run([command, "-u", *lazily, str(mountpoint)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"{Path(command).name} exited with status {result.returncode}"
        if "busy" in reason.lower():
            reason += " (something still uses it: a shell's working directory, an open file; --lazy detaches it now)"
        raise MountError(f"cannot unmount {mountpoint}: {reason}")


def _wait_for_exit(process: ServingProcess, mountpoint: Path, timeout: float) -> None:
    """Wait until the serving process has exited; MountError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    told = False
    started = time.monotonic()
    while not process.exited():
        now = time.monotonic()
        if now >= deadline:
            log_path = process.path.with_suffix(".log")
            raise MountError(
                f"{mountpoint} is unmounted, but its process (pid {process.pid}) is still finishing uploads "
                f"after {timeout:g} s; it goes on in the background (log {log_path})"
            )
        if not told and now - started > 2:
            print(f"Waiting for pid {process.pid} to finish uploading...", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.05)
