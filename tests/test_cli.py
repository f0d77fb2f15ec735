"""The command line as a user meets it: help, usage errors, clear one-line failures."""

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_client.cli import build_parser
from lafs_core.caps import parse_cap

from .shared_data import SAMPLE_GRID, sample_caps, sample_convergence
from .storage_cluster import BLACKMATCH, REPO, StorageProcess, blackmatch


def run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "fuse_client.cli", *args], capture_output=True, text=True, check=False, **kwargs
    )


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0
    assert "debug" in result.stdout


def test_version_is_the_installed_one():
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"blackmatch {importlib.metadata.version('blackmatch')}\n")


def _commands(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and subcommand parser under `parser`, named as typed."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def test_every_argument_is_explained_with_its_default():
    """--help of each command says what every argument is, and the default of each option that has one."""
    for name, parser in _commands(build_parser(), "blackmatch"):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.metavar}"
            assert action.help, f"{label} has no help"
            takes_value = action.nargs != 0 and action.option_strings
            if takes_value and action.default not in (None, [], False) and "repeatable" not in action.help:
                assert "default" in action.help, f"{label} does not give its default ({action.default!r})"


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


# --- the grid commands, on a node with an embedded grid ---------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A node directory made by `create-node` with its embedded grid of ten local share stores."""
    path = tmp_path_factory.mktemp("cli") / "node"
    blackmatch("create-node", str(path))
    return str(path)


def put_bytes(node: str, data: bytes, *target: str) -> str:
    return blackmatch("put", "-d", node, "-", *target, stdin=data).stdout.decode().strip()


def mistyped(cap: str) -> str:
    """A CHK cap with one character of its UEB hash changed, as a typo would (its shares stay where they were)."""
    uri, kind, key, ueb_hash, rest = cap.split(":", 4)
    changed = ("b" if ueb_hash[3] == "a" else "a").join((ueb_hash[:3], ueb_hash[4:]))
    return ":".join((uri, kind, key, changed, rest))


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single error line of a failed command."""
    assert result.returncode == 1, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], result.stderr.decode()
    return lines[0]


def test_get_that_fails_leaves_local_files_alone(node: str, tmp_path: Path) -> None:
    cap = put_bytes(node, os.urandom(200_000))
    existing = tmp_path / "existing"
    existing.write_bytes(b"precious")
    existing.chmod(0o640)
    for bad in (mistyped(cap), f"{cap[:-1]}9"):
        assert blackmatch("get", "-d", node, bad, str(existing), check=False).returncode == 1
        assert blackmatch("get", "-d", node, bad, str(tmp_path / "new"), check=False).returncode == 1
        assert existing.read_bytes() == b"precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no empty file, no temporary one
    blackmatch("get", "-d", node, cap, str(existing))
    assert existing.read_bytes() == blackmatch("get", "-d", node, cap).stdout
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_get_into_a_fifo_or_a_device_writes_into_it(node: str, tmp_path: Path) -> None:
    """LOCAL that is not a regular file (a FIFO, a device such as /dev/null) is written in place, as cat would:
    replacing it with a regular file would put a file where a device was."""
    data = os.urandom(100_000)
    cap = put_bytes(node, data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    the_fifo = os.open(fifo, os.O_PATH)  # reaches the FIFO even if something replaced it at its path
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(fifo.read_bytes()))
    reader.start()
    getting = subprocess.Popen([*BLACKMATCH, "get", "-d", node, cap, str(fifo)], cwd=REPO, stderr=subprocess.PIPE)
    _out, err = getting.communicate(timeout=60)
    reader.join(10)
    if reader.is_alive():  # nothing was written into the FIFO: let the reader's open return, then fail
        os.close(os.open(f"/proc/self/fd/{the_fifo}", os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    os.close(the_fifo)
    assert getting.returncode == 0, err
    assert received == data and stat.S_ISFIFO(fifo.lstat().st_mode)
    if os.geteuid() == 0:  # a node of the null device, written to as /dev/null would be
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        blackmatch("get", "-d", node, cap, str(null))
        assert stat.S_ISCHR(null.lstat().st_mode) and null.lstat().st_rdev == os.makedev(1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "null"][: 1 + (os.geteuid() == 0)]


def test_get_interrupted_leaves_local_files_alone(node: str, tmp_path: Path) -> None:
    cap = put_bytes(node, os.urandom(48 * 1024 * 1024))
    local = tmp_path / "local"
    local.write_bytes(b"precious")
    getting = subprocess.Popen([*BLACKMATCH, "get", "-d", node, cap, str(local)], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2:  # the temporary file the download goes into
        assert getting.poll() is None and time.monotonic() < deadline, "the download never started"
        time.sleep(0.005)
    getting.send_signal(signal.SIGINT)
    _out, err = getting.communicate(timeout=60)
    assert getting.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]
    assert local.read_bytes() == b"precious"


def test_a_closed_pipe_is_a_quiet_exit(node: str) -> None:
    cap = put_bytes(node, os.urandom(4 * 1024 * 1024))  # more than a pipe holds
    reading = subprocess.Popen(
        [*BLACKMATCH, "get", "-d", node, cap], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reading.stdout is not None and reading.stderr is not None
    assert len(reading.stdout.read(1)) == 1
    reading.stdout.close()  # as `head -c 1` does, long before the file's end
    assert reading.wait(60) == 128 + signal.SIGPIPE
    assert reading.stderr.read() == b""


def test_put_and_mkdir_make_missing_directories(node: str) -> None:
    put_bytes(node, b"deep", "tahoe:made/by/put")
    assert blackmatch("get", "-d", node, "tahoe:made/by/put").stdout == b"deep"
    assert blackmatch("ls", "-d", node, "tahoe:made").stdout == b"by\n"
    blackmatch("mkdir", "-d", node, "tahoe:made/by/mkdir/too")
    assert blackmatch("ls", "-d", node, "tahoe:made/by").stdout.split() == [b"mkdir", b"put"]
    assert blackmatch("ls", "-d", node, "tahoe:made/by/mkdir/too").stdout == b""
    line = one_line(blackmatch("mkdir", "-d", node, "tahoe:made/by/put/under", check=False))
    assert line.endswith("made/by/put is a file, not a directory")


def test_a_file_cap_is_not_a_directory(node: str) -> None:
    cap = put_bytes(node, os.urandom(1000))
    for command in (["ls"], ["get"], ["mkdir"]):
        line = one_line(blackmatch(*command, "-d", node, f"{cap}/sub", check=False))
        assert line == "blackmatch: error: URI:CHK:... is a file, not a directory"


def test_a_verify_cap_cannot_be_read(node: str, tmp_path: Path) -> None:
    immutable = put_bytes(node, os.urandom(1000))
    mutable = blackmatch("put", "--mutable", "-d", node, "-", stdin=b"mutable").stdout.decode().strip()
    for cap in (immutable, mutable):
        verifier = str(parse_cap(cap).verifier())
        line = one_line(blackmatch("get", "-d", node, verifier, str(tmp_path / "local"), check=False))
        kind = verifier.split(":")[1]
        assert line == f"blackmatch: error: URI:{kind}:... cannot be read: only a read or write cap decrypts a file"
        assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("command", ["mv", "ln"])
def test_a_directory_cannot_go_inside_itself(node: str, command: str) -> None:
    top = f"tahoe:loop-{command}"
    blackmatch("mkdir", "-d", node, f"{top}/inner/deeper")
    before = blackmatch("ls", "-d", node, "--json", "tahoe:").stdout
    top_cap = json.loads(blackmatch("ls", "-d", node, "--json", top).stdout)[1]["rw_uri"]
    for source, target in [
        (top, top),
        (top, f"{top}/sub"),
        (top, f"{top}/inner/deeper"),
        (top, f"{top}/inner/deeper/sub"),
        (top_cap, f"{top}/inner/by-cap"),
    ]:
        if command == "mv" and source == top_cap:
            continue  # mv needs a place to move from
        line = one_line(blackmatch(command, "-d", node, source, target, check=False))
        assert line.endswith("a directory cannot go inside itself") and top_cap not in line
    assert blackmatch("ls", "-d", node, "--json", "tahoe:").stdout == before
    assert blackmatch("ls", "-d", node, f"{top}/inner").stdout == b"deeper\n"
    assert blackmatch("ls", "-d", node, f"{top}/inner/deeper").stdout == b""
    blackmatch(command, "-d", node, f"{top}/inner/deeper", top)  # into an ancestor is fine
    assert blackmatch("ls", "-d", node, top).stdout.split() == [b"deeper", b"inner"]


@pytest.fixture(scope="module", params=["sdmf", "mdmf"])
def mutable_node(request: pytest.FixtureRequest, node: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The node directory, or a copy of it (on the same grid) that makes MDMF mutable files."""
    if request.param == "sdmf":
        return node
    copy = tmp_path_factory.mktemp("mdmf") / "node"
    shutil.copytree(node, copy, ignore=shutil.ignore_patterns("local-grid", "blackmatch"))
    config = copy / "tahoe.cfg"
    config.write_text(config.read_text().replace("[client]\n", "[client]\nmutable.format = mdmf\n"))
    return str(copy)


def test_put_overwrites_a_mutable_file_in_place(mutable_node: str, node: str) -> None:
    shared_node, node = node, mutable_node
    kind = "URI:SSK:" if node == shared_node else "URI:MDMF:"
    path, read_only_path = f"tahoe:in-place-{kind[4:-1]}", f"tahoe:read-only-{kind[4:-1]}"
    made = blackmatch("put", "-d", node, "--mutable", "-", path, stdin=b"first version")
    cap = made.stdout.decode().strip()
    assert cap.startswith(kind)
    assert put_bytes(node, b"second version", path) == cap
    assert blackmatch("get", "-d", node, path).stdout == b"second version"
    listed = json.loads(blackmatch("ls", "-d", node, "--json", path).stdout)
    assert listed[0] == "filenode" and listed[1]["mutable"] and listed[1]["rw_uri"] == cap
    assert put_bytes(node, b"third, by its cap", cap) == cap
    assert blackmatch("get", "-d", node, path).stdout == b"third, by its cap"
    read_cap = listed[1]["ro_uri"]
    line = one_line(blackmatch("put", "-d", node, "-", read_cap, stdin=b"refused", check=False))
    assert "read-only" in line and read_cap not in line
    blackmatch("ln", "-d", node, read_cap, read_only_path)
    line = one_line(blackmatch("put", "-d", node, "-", read_only_path, stdin=b"refused", check=False))
    assert "read-only" in line
    assert blackmatch("get", "-d", node, cap).stdout == b"third, by its cap"


def test_put_needs_a_name_for_the_new_file(node: str) -> None:
    line = one_line(blackmatch("put", "-d", node, "-", "tahoe:", stdin=b"data", check=False))
    assert line.endswith("tahoe: is a directory: name the new file inside it, as tahoe:NAME")
    cap = put_bytes(node, os.urandom(1000))
    line = one_line(blackmatch("put", "-d", node, "-", cap, stdin=b"data", check=False))
    assert line.endswith("URI:CHK:... is an immutable file: it cannot be overwritten")


def test_create_node_whose_servers_do_not_answer_yet(tmp_path: Path) -> None:
    server = tmp_path / "server"
    blackmatch("storage", "create", str(server))
    node = tmp_path / "node"
    made = blackmatch("create-node", str(node), "--servers", str(server / "servers.yaml"), check=False)
    assert made.returncode == 1 and made.stdout == b""
    warning, error = made.stderr.decode().splitlines()
    assert warning.startswith("blackmatch: warning: happiness is 7 but 1 storage server is configured")
    assert error.startswith(f"blackmatch: error: node directory {node} made, but not its root directory")
    assert error.endswith(f"'blackmatch create-alias -d {node} tahoe' makes it")
    assert "no storage server is reachable (" in error and "cannot connect" in error
    assert blackmatch("list-aliases", "-d", str(node)).stdout == b""
    storage = StorageProcess(server)
    storage.start()
    try:
        storage.wait_for("listening on")
        assert blackmatch("create-alias", "-d", str(node), "tahoe").stdout == b"Alias tahoe: created\n"
        assert blackmatch("ls", "-d", str(node), "tahoe:").stdout == b""
    finally:
        storage.stop()


def test_create_node_with_fewer_servers_than_happiness_warns(tmp_path: Path) -> None:
    made = blackmatch("create-node", str(tmp_path / "node"), "--local-grid", "3")
    assert made.stderr.decode().splitlines() == [
        "blackmatch: warning: happiness is 7 but 3 storage servers are configured: uploads will fail until 7 "
        f"answer (add servers, or lower shares.happy in {tmp_path / 'node' / 'tahoe.cfg'})"
    ]
    assert blackmatch("create-node", str(tmp_path / "happy"), "--local-grid", "3", "--happy", "3").stderr == b""


def test_create_add_and_list_aliases(node: str) -> None:
    assert blackmatch("create-alias", "-d", node, "made:").stdout == b"Alias made: created\n"
    put_bytes(node, b"in made", "made:file")
    cap = json.loads(blackmatch("ls", "-d", node, "--json", "made:").stdout)[1]["rw_uri"]
    assert blackmatch("add-alias", "-d", node, "again", cap).stdout == b"Alias again: added\n"
    assert blackmatch("get", "-d", node, "again:file").stdout == b"in made"
    lines = blackmatch("list-aliases", "-d", node).stdout.decode().splitlines()
    listed = {name.strip(): cap for name, cap in (line.split(": ") for line in lines)}
    assert listed["made"] == listed["again"] == cap and "tahoe" in listed
    details = json.loads(blackmatch("list-aliases", "-d", node, "--json").stdout)
    assert details["again"]["readonly"].startswith("URI:DIR2-RO:")
    assert blackmatch("list-aliases", "-d", node, "--readonly-uri").stdout.count(b"URI:DIR2-RO:") == len(listed)
    assert one_line(blackmatch("create-alias", "-d", node, "made", check=False)).endswith("alias made: already exists")
    assert one_line(blackmatch("add-alias", "-d", node, "again", cap, check=False)).endswith("already exists")
    file_cap = put_bytes(node, os.urandom(1000))
    assert one_line(blackmatch("add-alias", "-d", node, "file", file_cap, check=False)).endswith("not a directory")
    assert "cannot be an alias name" in one_line(blackmatch("add-alias", "-d", node, "a:b", cap, check=False))
    assert blackmatch("get", "-d", node, "made:file").stdout == b"in made"


def test_a_truncated_cap_is_named_by_its_kind(node: str) -> None:
    root = Path(node, "private", "aliases").read_text().split()[1]
    line = one_line(blackmatch("ls", "-d", node, root[:-5], check=False))
    assert line == "blackmatch: error: not a valid cap: URI:DIR2:... is truncated or malformed"


def test_put_of_a_missing_local_file(node: str, tmp_path: Path) -> None:
    line = one_line(blackmatch("put", "-d", node, str(tmp_path / "missing"), "tahoe:never/made", check=False))
    assert line == f"blackmatch: error: {tmp_path / 'missing'}: No such file or directory"
    assert one_line(blackmatch("put", "-d", node, str(tmp_path), check=False)).endswith("is a directory")
    assert b"never" not in blackmatch("ls", "-d", node).stdout


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[client\nshares.needed = 3\n", "line 1: expected a [section] header, found '[client'"),
        ("[client]\nshares.needed = 3\n  \nnonsense\n", "line 4: cannot parse 'nonsense'"),
        ("[client]\nshares.needed = 3\nshares.needed = 4\n", "line 3: [client] shares.needed is set twice"),
        ("[client]\n[node]\n[client]\n", "line 3: section [client] appears twice"),
    ],
)
def test_a_corrupt_tahoe_cfg_is_one_line(tmp_path: Path, config: str, message: str) -> None:
    (tmp_path / "private").mkdir()
    for secret in ("convergence", "secret"):
        (tmp_path / "private" / secret).write_text(sample_convergence())
    (tmp_path / "tahoe.cfg").write_text(config)
    line = one_line(blackmatch("ls", "-d", str(tmp_path), check=False))
    assert line == f"blackmatch: error: {tmp_path / 'tahoe.cfg'} {message}"


def test_a_mistyped_cap_is_not_reported_as_corruption(node: str) -> None:
    cap = put_bytes(node, os.urandom(100_000))
    line = one_line(blackmatch("get", "-d", node, mistyped(cap), check=False))
    assert line == (
        "blackmatch: error: no file on the grid matches this cap (its shares' keys do not match: "
        "the cap may be mistyped)"
    )
    assert not list(Path(node, "local-grid").glob("*/corruption-advisories/*"))


def test_a_grid_that_does_not_answer_is_named(tmp_path: Path) -> None:
    servers = [StorageProcess(tmp_path / f"server-{i}") for i in range(2)]
    for server in servers:
        blackmatch("storage", "create", str(server.directory))
        server.start()
    try:
        for server in servers:
            server.wait_for("listening on")
        node = str(tmp_path / "node")
        yamls = [arg for server in servers for arg in ("--servers", str(server.directory / "servers.yaml"))]
        blackmatch("create-node", node, *yamls, "--needed", "1", "--happy", "2", "--total", "2")
        cap = put_bytes(node, os.urandom(10_000), "tahoe:file")
    finally:
        for server in servers:
            server.stop()
    for command in (["ls", "-d", node], ["get", "-d", node, cap]):
        line = one_line(blackmatch(*command, check=False))
        assert line.startswith("blackmatch: error: no storage server answered (") and line.count("cannot connect") == 2
