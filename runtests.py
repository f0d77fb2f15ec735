#!/usr/bin/env python3
"""Run blackmatch's whole test suite, installing whatever is missing first.

    ./runtests.py                   everything, the interoperability tier with real Tahoe-LAFS 1.20.0 included
    ./runtests.py --skip-interop    all but that tier (it installs Tahoe into .venv-tahoe and runs a Tahoe grid)
    ./runtests.py --mode split      the filesystem tests in one mode only (split or no-split)
    ./runtests.py -k caps           other arguments go to pytest

The suite runs in parts: first the static type check (mypy --strict over lafs_core, grid_server and fuse_client,
configured in pyproject.toml), then every test that does not mount, then the filesystem tests (marked `mount`)
once per mode, `split` (the FUSE shim and a grid server daemon) and `no-split` (one process), chosen by the
environment variable BLACKMATCH_MOUNT_MODE. Each part's results are reported, and a summary at the end. With
--mode only the filesystem tests of that mode run.

Exit status is 0 when every part passed. A run in which no part collected a test fails: an empty run proves
nothing.
"""

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import bootstrap

NO_TESTS_COLLECTED = 5
TYPE_CHECK = "type check (mypy --strict)"
MODES = ("split", "no-split")


def take_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    if name not in argv:
        return argv, None
    index = argv.index(name)
    if index + 1 >= len(argv):
        sys.exit(f"runtests: {name} needs a value")
    return argv[:index] + argv[index + 2 :], argv[index + 1]


def counts(junit: Path) -> str:
    """'N passed, M failed, ...' from pytest's JUnit XML report."""
    try:
        suite = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return "no report"
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    parts = [f"{total - failures - errors - skipped} passed"]
    parts += [f"{n} {what}" for n, what in ((failures, "failed"), (errors, "errors"), (skipped, "skipped")) if n]
    return ", ".join(parts)


def type_check(python: Path) -> tuple[int, str]:
    """Run mypy as pyproject.toml configures it; its exit status and a summary ('ok', or how many errors)."""
    command = [str(python), "-m", "mypy"]
    bootstrap.log(f"{TYPE_CHECK}: " + " ".join(command[1:]))
    result = subprocess.run(command, cwd=bootstrap.ROOT, capture_output=True, text=True, check=False)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()  # before pytest writes to the same terminal
    if result.returncode == 0:
        return 0, "ok"
    lines = (result.stdout + result.stderr).strip().splitlines()
    last = lines[-1] if lines else "no output"
    # "Found 3 errors in 2 files (checked 78 source files)" -> "3 errors in 2 files"
    return result.returncode, last.removeprefix("Found ").split(" (checked")[0]


def main(argv: list[str]) -> int:
    python = bootstrap.ensure_all()
    bootstrap.ensure_debian_packages(bootstrap.TEST_DEBIAN_PACKAGES)
    argv, mode = take_option(argv, "--mode")
    if mode is not None and mode not in MODES:
        sys.exit(f"runtests: --mode must be one of {', '.join(MODES)}")
    if "--skip-interop" in argv:
        argv = [arg for arg in argv if arg != "--skip-interop"]
        interop = " and not interop"
    else:
        bootstrap.ensure_tahoe_venv()  # before pytest starts, so an install failure is reported as such
        interop = ""
    parts = [] if mode else [("tests that do not mount", f"not mount{interop}", None)]
    parts += [(f"filesystem tests, {each}", f"mount{interop}", each) for each in MODES if mode in (None, each)]
    checked = None if mode else type_check(python)
    results = []
    with tempfile.TemporaryDirectory(prefix="blackmatch-runtests-") as reports:
        for number, (title, selection, each_mode) in enumerate(parts):
            junit = Path(reports) / f"part{number}.xml"
            command = [str(python), "-m", "pytest", "-m", selection, f"--junitxml={junit}", *argv]
            env = dict(os.environ)
            if each_mode is not None:
                env["BLACKMATCH_MOUNT_MODE"] = each_mode
            bootstrap.log(f"{title}: " + " ".join(command[1:]))
            status = subprocess.run(command, cwd=bootstrap.ROOT, env=env, check=False).returncode
            results.append((title, status, counts(junit) if status != NO_TESTS_COLLECTED else "no tests"))
    print("\nruntests summary:")
    if checked is not None:
        status, summary = checked
        print(f"  {TYPE_CHECK}: {summary}" + ("" if status == 0 else f": FAILED (mypy status {status})"))
    for title, status, summary in results:
        verdict = "ok" if status in (0, NO_TESTS_COLLECTED) else f"FAILED (pytest status {status})"
        print(f"  {title}: {summary}: {verdict}")
    if all(status == NO_TESTS_COLLECTED for _, status, _ in results):
        print("runtests: no tests were collected; that is a failure", file=sys.stderr)
        return 1
    statuses = [status for _, status, _ in results if status != NO_TESTS_COLLECTED]
    if checked is not None:
        statuses.append(checked[0])
    return max(statuses, default=0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
