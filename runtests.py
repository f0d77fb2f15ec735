#!/usr/bin/env python3
"""Run blackmatch's whole test suite, installing whatever is missing first.

    ./runtests.py                   everything, the interoperability tier with real Tahoe-LAFS 1.20.0 included
    ./runtests.py --skip-interop    all but that tier (it installs Tahoe into .venv-tahoe and runs a Tahoe grid)
    ./runtests.py -k caps           other arguments go to pytest

Exit status is pytest's, except that a run which collected no tests fails: an empty run proves nothing.
"""

import subprocess
import sys

import bootstrap

NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
    python = bootstrap.ensure_all()
    bootstrap.ensure_debian_packages(bootstrap.TEST_DEBIAN_PACKAGES)
    if "--skip-interop" in argv:
        argv = [arg for arg in argv if arg != "--skip-interop"]
        selection = ["-m", "not interop"]
    else:
        bootstrap.ensure_tahoe_venv()  # before pytest starts, so an install failure is reported as such
        selection = []
    command = [str(python), "-m", "pytest", *selection, *argv]
    bootstrap.log("running: " + " ".join(command[1:]))
    status = subprocess.run(command, cwd=bootstrap.ROOT, check=False).returncode
    if status == NO_TESTS_COLLECTED:
        print("runtests: no tests were collected; that is a failure", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
