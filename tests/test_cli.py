"""The command line as a user meets it: help, usage errors, clear one-line failures."""

import subprocess
import sys

import pytest

from .shared_data import SAMPLE_GRID, sample_caps, sample_convergence


def run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "fuse_client.cli", *args], capture_output=True, text=True, check=False, **kwargs
    )


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0
    assert "debug" in result.stdout


@pytest.mark.parametrize(
    "args",
    [[], ["no-such-command"], ["debug"], ["debug", "cap"], ["debug", "cap", "f", "--needed", "x"]],
)
def test_usage_errors(args):
    result = run(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["debug", "cap", "/no/such/file", "--convergence", "aaaa"], "No such file"),
        (["debug", "cap", str(SAMPLE_GRID / "plaintext" / "chk-1k"), "--convergence", "not base32!"], "base32"),
        (["debug", "cap", str(SAMPLE_GRID / "plaintext" / "chk-1k"), "--needed", "11", "--convergence", "aa"], "K"),
        (["debug", "cap", str(SAMPLE_GRID / "plaintext" / "chk-1k"), "-d", "/no/such/nodedir"], "node directory"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = run(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_convergence_comes_from_the_node_directory(tmp_path):
    node = tmp_path / "node"
    (node / "private").mkdir(parents=True)
    (node / "private" / "convergence").write_text(sample_convergence() + "\n")
    (node / "tahoe.cfg").write_text("[client]\nshares.needed = 3\nshares.happy = 5\nshares.total = 10\n")
    result = run("debug", "cap", str(SAMPLE_GRID / "plaintext" / "chk-1m-plus-1"), "-d", str(node))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sample_caps()["chk-1m-plus-1"]


def test_node_encoding_changes_the_cap(tmp_path):
    node = tmp_path / "node"
    (node / "private").mkdir(parents=True)
    (node / "private" / "convergence").write_text(sample_convergence())
    (node / "tahoe.cfg").write_text("[client]\nshares.needed = 2\nshares.total = 4\n")
    result = run("debug", "cap", str(SAMPLE_GRID / "plaintext" / "chk-1k"), "-d", str(node))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(":2:4:1024")
    assert result.stdout.strip() != sample_caps()["chk-1k"]


def test_max_segment_size_changes_large_caps(tmp_path):
    path = SAMPLE_GRID / "plaintext" / "chk-1m-plus-1"
    small = run("debug", "cap", str(path), "--convergence", sample_convergence(), "--max-segment-size", "131072")
    assert small.returncode == 0
    assert small.stdout.strip() != sample_caps()["chk-1m-plus-1"]
