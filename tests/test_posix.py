"""POSIX behaviour on the mount, each case run on tmpfs too in the same test: Linux's answer is the expectation.

Errno values and stat fields for names, kinds and the calls programs rely on, in this run's mode, on a mount with
`-o allow_other` of the embedded grid.
"""

from __future__ import annotations

import os
from pathlib import Path

from .mounting import MOUNT_MARKS
from .posix_compare import Places, outcome, places_fixture, stat_fields

pytestmark = MOUNT_MARKS

places = places_fixture()


def test_errors_of_directory_calls(places: Places) -> None:
    def case(root: Path) -> object:
        (root / "d").mkdir()
        (root / "d" / "f").write_bytes(b"x")
        (root / "e").mkdir()
        return [
            outcome(os.unlink, root / "d"),
            outcome(os.rmdir, root / "d"),
            outcome(os.mkdir, root / "d"),
            outcome(os.rmdir, root / "d" / "f"),
            outcome(os.rmdir, root / "missing"),
            outcome(os.rename, root / "d" / "f", root / "e"),
            outcome(os.rename, root / "e", root / "d"),
            stat_fields(root / "d" / "f"),
        ]

    places.same(case)
