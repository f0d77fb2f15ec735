#!/usr/bin/env python3
"""Run blackmatch's whole test suite, installing whatever is missing first.

    ./runtests.py               everything
    ./runtests.py -k caps       extra arguments go to pytest

Exit status is pytest's, except that a run which collected no tests fails: an empty run proves nothing.
"""

import subprocess
import sys

import bootstrap

NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
    python = bootstrap.ensure_all()
    command = [str(python), "-m", "pytest", *argv]
    bootstrap.log("running: " + " ".join(command[1:]))
    status = subprocess.run(command, cwd=bootstrap.ROOT, check=False).returncode
    if status == NO_TESTS_COLLECTED:
        print("runtests: no tests were collected; that is a failure", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
