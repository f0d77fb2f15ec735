"""The mount(8) and umount(8) helpers of file systems of type `fuse.blackmatch`.

For `mount -t fuse.blackmatch SOURCE MOUNTPOINT -o OPTIONS`, or an /etc/fstab line of that type, mount(8) runs
`/sbin/mount.fuse.blackmatch SOURCE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS]`; umount(8) runs
`/sbin/umount.fuse.blackmatch MOUNTPOINT [-flnrv] [-N NAMESPACE] [-t TYPE]` when that file exists (mount(8) and
umount(8) look in /sbin and nowhere else). `blackmatch install-mount-helper` writes both there.

The mount helper turns what mount(8) hands it into a `blackmatch mount` command line and runs it in this process,
which returns once the mount is up and a background process serves it (what mount(8) waits for). SOURCE is
`NODEDIR`, `NODEDIR:ALIAS` or `NODEDIR:URI:DIR2...`, with NODEDIR an absolute path (mount may run with no working
directory or HOME that means anything). The umount helper is `blackmatch unmount`: it returns once the uploads are
done, so a `umount` (or systemd stopping a mount unit) drains as `blackmatch unmount` does.

mount(8) keeps `auto`, `noauto`, `comment=` and `x-*` to itself, but hands on the other options of fstab's mount
column it understands itself (`rw`, `user`, `nofail`, `_netdev`, ... and the `noexec,nosuid,nodev` that `user`
implies), so the helper ignores those; blackmatch's own options become `blackmatch mount` arguments, the FUSE
ones go on to the kernel, and anything else is refused (ignored with -s, mount's "sloppy").
"""

from __future__ import annotations

import argparse
import getopt
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lafs_core.errors import LafsError

from .cli import main as blackmatch_main
from .mount_commands import non_negative_float, parse_size

# mount(8)'s exit statuses, which its helpers are to use: bad invocation, and a mount that failed.
USAGE_FAILURE = 1
MOUNT_FAILURE = 32

FLAG_OPTIONS = {"no_split": "--no-split"}  # blackmatch's own options, without and with a value
VALUE_OPTIONS = {"cache_size": ("--cache-size", parse_size), "cache_timeout": ("--cache-timeout", non_negative_float)}
# Handed to the kernel through `blackmatch mount -o`: FUSE's own, and the flags fstab's `user` implies
# (noexec, nosuid, nodev) with their opposites.
FUSE_OPTIONS = frozenset({"allow_other", "default_permissions", "ro", "nonempty", "noatime"}) | frozenset(
    {"noexec", "exec", "nosuid", "suid", "nodev", "dev"}
)
# What mount(8) and systemd read from fstab themselves: nothing for the helper to do.
MOUNT_ONLY_OPTIONS = frozenset(
    {"defaults", "rw", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev"}
)
MOUNT_ONLY_PREFIXES = ("x-", "X-", "comment=")


class HelperError(LafsError):
    """What mount(8) handed the helper cannot be mounted; the message is the one line the user sees."""


@dataclass(frozen=True)
class Source:
    """The SOURCE column: a node directory, and the alias or directory cap in it to mount (neither: `tahoe:`)."""

    node_directory: Path
    alias: str | None = None
    root_cap: str | None = None


def parse_source(text: str) -> Source:
    """`NODEDIR`, `NODEDIR:ALIAS` or `NODEDIR:URI:DIR2...` (a cap holds colons; an alias never does)."""
    node, separator, cap = text.partition(":URI:")
    if separator:
        return Source(_node_directory(node), root_cap="URI:" + cap)
    node, separator, alias = text.rpartition(":")
    if not separator:
        return Source(_node_directory(alias))
    if not alias or "/" in alias:
        raise HelperError(f"{text!r} is not NODEDIR, NODEDIR:ALIAS or NODEDIR:DIRCAP")
    return Source(_node_directory(node), alias=alias)


def _node_directory(text: str) -> Path:
    path = Path(text)
    if not path.is_absolute():
        raise HelperError(f"the node directory must be an absolute path, not {text!r}")
    return path


@dataclass
class Options:
    """The -o options sorted out: `blackmatch mount` arguments, and what goes on to FUSE."""

    arguments: list[str] = field(default_factory=list)
    fuse: list[str] = field(default_factory=list)


def sort_options(items: Sequence[str], sloppy: bool = False) -> Options:
    """Each option in `items` as blackmatch's own, FUSE's or mount(8)'s; an unknown one is refused unless
    `sloppy`, and a blackmatch option with a bad value always."""
    options = Options()
    for item in items:
        name, has_value, value = item.partition("=")
        if item in FLAG_OPTIONS:
            options.arguments.append(FLAG_OPTIONS[item])
        elif name in VALUE_OPTIONS:
            argument, check = VALUE_OPTIONS[name]
            if not has_value:
                raise HelperError(f"-o {name} needs a value ({name}=...)")
            try:
                check(value)
            except argparse.ArgumentTypeError as exc:
                raise HelperError(f"-o {item}: {exc}") from None
            options.arguments += [argument, value]
        elif item in FUSE_OPTIONS:
            options.fuse.append(item)
        elif item in MOUNT_ONLY_OPTIONS or item.startswith(MOUNT_ONLY_PREFIXES) or sloppy:
            continue
        else:
            known = ", ".join(sorted([*FLAG_OPTIONS, *(f"{name}=" for name in VALUE_OPTIONS), *FUSE_OPTIONS]))
            raise HelperError(f"unknown mount option {item!r} (blackmatch takes: {known})")
    return options


@dataclass(frozen=True)
class MountRequest:
    """What mount(8) asked for: the `blackmatch mount` command line, and whether to stop short of mounting (-f)."""

    command: list[str]
    fake: bool


def parse_mount_helper_args(argv: Sequence[str]) -> MountRequest:
    """`SOURCE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]`, options anywhere, as mount(8) passes."""
    flags, positionals = _getopt(argv, "sfnvN:o:t:")
    if len(positionals) != 2:
        raise HelperError("usage: mount.fuse.blackmatch NODEDIR[:ALIAS|:DIRCAP] MOUNTPOINT [-o OPTIONS]")
    source, mountpoint = parse_source(positionals[0]), positionals[1]
    option_items = [item for flag, value in flags if flag == "-o" for item in value.split(",") if item]
    options = sort_options(option_items, sloppy=any(flag == "-s" for flag, _ in flags))
    command = ["mount", mountpoint, "-d", str(source.node_directory)]
    if source.alias is not None:
        command += ["--alias", source.alias]
    if source.root_cap is not None:
        command += ["--root-cap", source.root_cap]
    command += options.arguments
    if options.fuse:
        command += ["-o", ",".join(options.fuse)]
    return MountRequest(command, fake=any(flag == "-f" for flag, _ in flags))


def parse_umount_helper_args(argv: Sequence[str]) -> list[str]:
    """`MOUNTPOINT [-flnrv] [-N NAMESPACE] [-t TYPE]` as umount(8) passes it: the `blackmatch unmount` command
    line (-l, umount's lazy unmount, is `--lazy`; -f, -n, -r, -v mean nothing more for a FUSE mount)."""
    flags, positionals = _getopt(argv, "flnrvN:t:")
    if len(positionals) != 1:
        raise HelperError("usage: umount.fuse.blackmatch MOUNTPOINT [-l]")
    lazy = ["--lazy"] if any(flag == "-l" for flag, _ in flags) else []
    return ["unmount", positionals[0], *lazy]


def _getopt(argv: Sequence[str], letters: str) -> tuple[list[tuple[str, str]], list[str]]:
    try:
        flags, positionals = getopt.gnu_getopt(list(argv), letters)
    except getopt.GetoptError as exc:
        raise HelperError(str(exc)) from None
    if any(flag == "-N" for flag, _ in flags):
        raise HelperError("mounting in another mount namespace (-N) is not supported")
    return flags, positionals


def mount_main(argv: Sequence[str] | None = None) -> int:
    """/sbin/mount.fuse.blackmatch."""
    try:
        request = parse_mount_helper_args(sys.argv[1:] if argv is None else argv)
    except HelperError as exc:
        return _usage_failure(exc)
    if request.fake:
        return 0
    return MOUNT_FAILURE if blackmatch_main(request.command) else 0


def umount_main(argv: Sequence[str] | None = None) -> int:
    """/sbin/umount.fuse.blackmatch."""
    try:
        command = parse_umount_helper_args(sys.argv[1:] if argv is None else argv)
    except HelperError as exc:
        return _usage_failure(exc)
    return blackmatch_main(command)


def _usage_failure(error: HelperError) -> int:
    print(f"blackmatch: error: {error}", file=sys.stderr)
    return USAGE_FAILURE


HELPERS = {"mount": mount_main, "umount": umount_main}

if __name__ == "__main__":  # python -m fuse_client.mount_helper mount|umount ARGS, as the installed scripts run it
    helper = HELPERS.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if helper is None:
        sys.exit(_usage_failure(HelperError("usage: python -m fuse_client.mount_helper mount|umount ARGS...")))
    sys.exit(helper(sys.argv[2:]))
