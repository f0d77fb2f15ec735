"""Permissions on the mount as on tmpfs: sticky and setgid directories, set-user-ID bits cleared by writes and
chown, chown's rules for other users, and mode bits checked for other uids (`-o allow_other`). Each case runs on
tmpfs and on the mount; cases that act as another user run in a child process with that uid."""

from __future__ import annotations

import os
from pathlib import Path

from .mounting import MOUNT_MARKS
from .posix_compare import Places, as_user, outcome, places_fixture, stat_fields

pytestmark = MOUNT_MARKS

places = places_fixture()

ALICE, BOB = 4101, 4102  # uids that own nothing else here
STAFF, OTHERS = 4201, 4202  # gids: alice is in STAFF, nobody in OTHERS


def _write(path: Path, data: bytes) -> int:
    with open(path, "ab") as file:
        return file.write(data)


def _make_file(path: Path) -> None:
    path.write_bytes(b"")


def test_a_setgid_directory_passes_its_group_on(places: Places) -> None:
    def case(root: Path) -> object:
        shared = root / "shared"
        shared.mkdir()
        os.chown(shared, 0, STAFF)
        os.chmod(shared, 0o2777)
        (shared / "file").write_bytes(b"x")
        (shared / "dir").mkdir(mode=0o755)
        os.symlink("file", shared / "link")
        os.mkfifo(shared / "fifo", 0o644)
        made_by_alice = as_user(ALICE, ALICE, _make_file, shared / "alices", groups=(STAFF,))
        return [made_by_alice] + [
            stat_fields(shared / name, "kind", "mode", "gid") for name in ("file", "dir", "link", "fifo", "alices")
        ]

    places.same(case)


def test_a_sticky_directory_lets_only_owners_remove(places: Places) -> None:
    def case(root: Path) -> object:
        common = root / "common"
        common.mkdir()
        os.chmod(common, 0o1777)
        as_user(ALICE, ALICE, _make_file, common / "alices")
        as_user(ALICE, ALICE, _make_file, common / "alices2")
        return [
            as_user(BOB, BOB, os.unlink, common / "alices"),
            as_user(BOB, BOB, os.rename, common / "alices", common / "bobs"),
            as_user(BOB, BOB, _make_file, common / "bobs"),
            as_user(ALICE, ALICE, os.rename, common / "bobs", common / "stolen"),
            as_user(ALICE, ALICE, os.unlink, common / "alices"),
            outcome(os.unlink, common / "alices2"),  # root may
            sorted(os.listdir(common)),
        ]

    places.same(case)


def test_writes_and_chown_clear_set_user_id_bits(places: Places) -> None:
    def case(root: Path) -> object:
        results = []
        for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("sgid-noexec", 0o2745), ("both", 0o6777)):
            path = root / name
            path.write_bytes(b"x")
            os.chown(path, ALICE, STAFF)
            os.chmod(path, mode)
            written = as_user(ALICE, ALICE, _write, path, b"more", groups=(STAFF,))
            after_write = stat_fields(path, "mode")
            os.chmod(path, mode)
            os.chown(path, BOB, -1)
            results.append([name, written, after_write, stat_fields(path, "mode", "uid", "gid")])
        return results

    places.same(case)


def test_chown_rules_for_other_users(places: Places) -> None:
    def case(root: Path) -> object:
        path = root / "alices"
        path.write_bytes(b"x")
        os.chown(path, ALICE, ALICE)
        return [
            as_user(ALICE, ALICE, os.chown, path, BOB, -1, groups=(STAFF,)),  # giving a file away: EPERM
            as_user(ALICE, ALICE, os.chown, path, -1, OTHERS, groups=(STAFF,)),  # a group she is not in: EPERM
            as_user(ALICE, ALICE, os.chown, path, -1, STAFF, groups=(STAFF,)),  # one of hers: fine
            as_user(BOB, BOB, os.chown, path, -1, BOB),  # not his file: EPERM
            as_user(BOB, BOB, os.chmod, path, 0o777),  # not his file: EPERM
            as_user(ALICE, ALICE, os.chmod, path, 0o600, groups=(STAFF,)),
            stat_fields(path, "mode", "uid", "gid"),
        ]

    places.same(case)


def test_mode_bits_are_checked_for_other_users(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "secret").write_bytes(b"x")
        os.chmod(root / "secret", 0o600)
        (root / "readable").write_bytes(b"x")
        os.chmod(root / "readable", 0o644)
        (root / "private").mkdir(mode=0o700)
        (root / "private" / "inside").write_bytes(b"x")
        (root / "closed").mkdir(mode=0o755)
        return [
            as_user(ALICE, ALICE, Path.read_bytes, root / "secret"),
            as_user(ALICE, ALICE, Path.read_bytes, root / "readable"),
            as_user(ALICE, ALICE, _write, root / "readable", b"y"),
            as_user(ALICE, ALICE, os.listdir, root / "private"),
            as_user(ALICE, ALICE, os.stat, root / "private" / "inside"),
            as_user(ALICE, ALICE, _make_file, root / "closed" / "new"),
            as_user(ALICE, ALICE, os.unlink, root / "readable"),  # the case directory is 0777: allowed
        ]

    places.same(case)
