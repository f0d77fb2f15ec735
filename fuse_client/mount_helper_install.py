"""`blackmatch install-mount-helper [--uninstall]`: put the mount(8) and umount(8) helpers where those look.

mount(8) and umount(8) look for `mount.fuse.blackmatch` and `umount.fuse.blackmatch` in /sbin only, and may run
them with no PATH and no HOME (under systemd, say). So each helper is a small shell script that runs this very
Python interpreter (a virtualenv's, by its absolute path) on this very copy of blackmatch (by PYTHONPATH, so a
checkout works as well as an installed package). Writing to /sbin is for root. Installing again rewrites the
scripts, which is how they follow a virtualenv that moved; `--uninstall` removes them, but never a file of the same
name that this command did not write.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from lafs_core.errors import LafsError

SYSTEM_HELPER_DIRECTORY = Path("/sbin")
HELPER_NAMES = {"mount": "mount.fuse.blackmatch", "umount": "umount.fuse.blackmatch"}
MARKER = "# Written by `blackmatch install-mount-helper`"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the directory that holds fuse_client


def add_install_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = commands.add_parser(
        "install-mount-helper",
        help="let mount(8), /etc/fstab and systemd mount blackmatch (type fuse.blackmatch); as root",
        description=f"Write {' and '.join(HELPER_NAMES.values())} into {SYSTEM_HELPER_DIRECTORY}, where mount(8) "
        "and umount(8) find them, running this Python and this blackmatch. Needs root; safe to run again.",
    )
    install.add_argument("--uninstall", action="store_true", help="remove the helpers this command installed")
    install.set_defaults(handler=install_command)


def install_command(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise LafsError(f"writing to {SYSTEM_HELPER_DIRECTORY} needs root: run it with sudo")
    if args.uninstall:
        uninstall_helpers(SYSTEM_HELPER_DIRECTORY)
    else:
        install_helpers(SYSTEM_HELPER_DIRECTORY)
    return 0


def helper_script(role: str) -> str:
    """The script `role`(8) runs: this interpreter on this copy of the helpers, whatever PATH and cwd are (-P
    keeps a `fuse_client` in the working directory from being imported instead)."""
    return (
        "#!/bin/sh\n"
        f"{MARKER}; remove with `blackmatch install-mount-helper --uninstall`.\n"
        f"# {role}(8) runs this for file systems of type fuse.blackmatch.\n"
        f"PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))}\n"
        "export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -P -m fuse_client.mount_helper {role} "$@"\n'
    )


def install_helpers(directory: Path) -> None:
    for role, name in HELPER_NAMES.items():
        path, script = directory / name, helper_script(role)
        if _existing_text(path) == script:
            print(f"Already installed: {path}")
            continue
        _refuse_foreign(path)
        temporary = path.with_name(f".{name}.new")
        temporary.write_text(script)
        temporary.chmod(0o755)
        temporary.replace(path)  # never a half-written helper for a mount that runs just now
        print(f"Installed {path}")


def uninstall_helpers(directory: Path) -> None:
    for name in HELPER_NAMES.values():
        path = directory / name
        if _existing_text(path) is None:
            print(f"Not installed: {path}")
            continue
        _refuse_foreign(path)
        path.unlink()
        print(f"Removed {path}")


def _existing_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def _refuse_foreign(path: Path) -> None:
    text = _existing_text(path)
    if text is not None and MARKER not in text:
        raise LafsError(f"{path} exists and was not written by blackmatch; leaving it alone (remove it yourself)")
