"""A real Tahoe-LAFS 1.20.0 grid on loopback, for interoperability tests.

`TahoeGrid` creates and runs an introducer, `num_storage` storage nodes and one client node, each a
`tahoe run --allow-stdin-close NODEDIR` process in its own process group with its output in `NODEDIR/run.log`.
Every listening port Tahoe lets us choose is on 127.0.0.1 (the one exception is Tahoe's own log-port Tub, which
1.20.0 always binds to an ephemeral port on all interfaces). Leaving the `with` block stops every process, also when
the body raised; on Linux the nodes also get SIGTERM if the test process itself dies.

How Tahoe 1.20.0 behaves here (read in `allmydata/storage_client.py`, `client.py`, `introducer/client.py` and
checked against running nodes):

* Storage nodes announce both `anonymous-storage-FURL` (Foolscap) and `anonymous-storage-NURLs` (Great Black Swamp
  over HTTPS, same port). The client talks HTTP to every server whose announcement has at least one NURL, unless
  `[client] force_foolscap = true` (default false; the harness writes `false` explicitly). On the welcome page
  (`GET /?t=json`) an HTTP server's `connection_status` is exactly `"connected"`; a Foolscap one is
  `"Connected to tcp:... via tcp"`. Readiness is: every expected server id listed there with a status starting
  with "connected" (case-insensitive).
* `private/introducer_default_cache.yaml` (client, rewritten on each announcement) is a YAML *list*, one item per
  (service, server) pair::

      - key_s: v0-<52 base32 chars>            # the server id (node.pubkey without its "pub-" prefix)
        ann:
          anonymous-storage-FURL: pb://<tubid>@tcp:127.0.0.1:<port>/<swissnum>
          anonymous-storage-NURLs:
          - pb://<spki-hash>@127.0.0.1:<port>/<swissnum>#v=1
          app-versions: []
          my-version: tahoe-lafs/1.20.0
          nickname: <nickname>
          nonce: <base32>
          oldest-supported: 1.0.0
          permutation-seed-base32: <base32>
          seqnum: 1
          service-name: storage
          version: 0

* `private/servers.yaml` (static servers, read only at client start) is a mapping::

      storage:
        <server id>:                 # any string; v0-<key> ideally, it names the server in the web UI
          ann: {<announcement keys as above>}
          connections: {...}         # optional Foolscap connection-handler overrides (unused over HTTP)

  A static server overrides an introducer announcement with the same id. Over HTTP the client needs
  `anonymous-storage-NURLs` *and* `anonymous-storage-FURL`: the FURL is never dialled, but its TubID is parsed
  (`_parse_announcement`) and becomes the lease-secret and write-enabler seed, so it must be a well-formed
  `pb://<32 base32 chars>@...` and the same for every client of that server. An entry without a FURL raises a
  KeyError inside `set_static_servers`, which Tahoe swallows: the server silently never appears.
  `permutation-seed-base32` is optional (derived from a `v0-` id, else SHA-256 of the id).
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

START_TIMEOUT = 90.0  # seconds; nodes on a loaded 2-core CI machine start slowly
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 300.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_used_ports: set[int] = set()


class TahoeError(RuntimeError):
    """A node did not start, stopped unexpectedly, or did not reach the expected state in time."""


class TahoeCommandError(subprocess.CalledProcessError):
    """A `tahoe` CLI command failed; unlike CalledProcessError, its message includes what tahoe printed."""

    def __str__(self) -> str:
        out = (self.stdout or b"")[-2000:].decode(errors="replace")
        err = (self.stderr or b"")[-2000:].decode(errors="replace")
        return f"{super().__str__()}\nstdout: {out}\nstderr: {err}"


def _free_port() -> int:
    """A loopback TCP port free now, below the kernel's ephemeral range.

    Below it, no port the kernel hands out itself (Tahoe's log Tubs, outgoing connections) can take a port between
    our choosing it and the node binding it.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(20000, max(low, 20001))
        if port in _used_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise TahoeError("no free TCP port found")


def _child_setup(parent_pid: int) -> None:
    """Runs in the forked node before exec: die with the test process (Linux), so a killed pytest leaves no nodes."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def _tahoe_env() -> dict[str, str]:
    """The environment for tahoe processes: ours, minus what would make its venv's Python load foreign code."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _edit_cfg(node_dir: Path, values: dict[str, dict[str, str]]) -> None:
    """Set options in a node's tahoe.cfg (case-preserving: Tahoe has keys like reveal-IP-address)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.optionxform = str  # type: ignore[assignment,method-assign]
    path = node_dir / "tahoe.cfg"
    cfg.read(path, encoding="utf-8")
    for section, options in values.items():
        if not cfg.has_section(section):
            cfg.add_section(section)
        for key, value in options.items():
            cfg.set(section, key, value)
    with path.open("w", encoding="utf-8") as f:
        cfg.write(f)


def _log_tail(node_dir: Path, lines: int = 30) -> str:
    try:
        text = (node_dir / "run.log").read_text(errors="replace").splitlines()
    except OSError:
        return f"({node_dir.name}: no run.log)"
    return f"--- {node_dir.name}/run.log ---\n" + "\n".join(text[-lines:])


def storage_announcement(node_dir: Path) -> dict[str, Any]:
    """`{"server_id", "ann"}` for a started Tahoe storage node, built from its files as the node itself would.

    For servers no introducer knows of (see `TahoeGrid.add_storage_node`): the result can go into servers.yaml.
    The NURL is `pb://<urlsafe-b64 SHA-256 of the cert's SubjectPublicKeyInfo>@<host:port>/<swissnum>#v=1`.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((node_dir / "private" / "node.pem").read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    spki_hash = base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()
    furl = (node_dir / "private" / "storage.furl").read_text().strip()
    match = re.fullmatch(r"pb://([a-z2-7]+)@([^/]+)/(.+)", furl)
    if match is None:
        raise TahoeError(f"unexpected storage fURL {furl!r}")
    nurls = []
    for hint in match.group(2).split(","):
        parts = hint.split(":")
        if parts[0] == "tcp":
            parts = parts[1:]
        nurls.append(f"pb://{spki_hash}@{parts[0]}:{parts[1]}/{match.group(3)}#v=1")
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(node_dir / "tahoe.cfg", encoding="utf-8")
    return {
        "server_id": _server_id(node_dir),
        "ann": {
            "anonymous-storage-FURL": furl,
            "anonymous-storage-NURLs": nurls,
            "nickname": cfg.get("node", "nickname", fallback=""),
            "permutation-seed-base32": (node_dir / "permutation-seed").read_text().strip(),
        },
    }


def _server_id(node_dir: Path) -> str:
    """The id Tahoe knows a storage node by: `node.pubkey` (`pub-v0-...`) without the `pub-` prefix."""
    return (node_dir / "node.pubkey").read_text().strip().removeprefix("pub-")


class TahoeGrid:
    """Introducer + `num_storage` storage nodes + one client node, all Tahoe-LAFS, on 127.0.0.1.

    Use as a context manager; `grid.tahoe(...)` runs the CLI against the client node.
    """

    def __init__(
        self,
        base_dir: Path,
        tahoe: Path,
        num_storage: int = 5,
        needed: int = 3,
        happy: int = 5,
        total: int = 10,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.tahoe_exe = Path(tahoe)
        self.num_storage = num_storage
        self.encoding = (needed, happy, total)
        self.start_timeout = start_timeout
        self.introducer_dir = self.base_dir / "introducer"
        self.storage_dirs: list[Path] = [self.base_dir / f"storage-{i}" for i in range(1, num_storage + 1)]
        self.client_dir = self.base_dir / "client"
        self.introducer_furl = ""
        self._extra_storage_dirs: list[Path] = []
        self._processes: dict[Path, subprocess.Popen[bytes]] = {}
        self._static_ids: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> TahoeGrid:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create and start every node, then wait until the client is connected to every storage server."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._create(self.introducer_dir, "create-introducer", *self._listen_args())
        self._start(self.introducer_dir)
        furl_file = self.introducer_dir / "private" / "introducer.furl"
        self._wait_for(
            lambda: furl_file.exists() and furl_file.read_text().strip(), "introducer fURL", furl_file.parent
        )
        self.introducer_furl = furl_file.read_text().strip()

        for node_dir in self.storage_dirs:
            self._create_storage(node_dir, introduced=True)
        self._create(
            self.client_dir,
            "create-client",
            "--nickname=client",
            f"--introducer={self.introducer_furl}",
            f"--webport=tcp:{_free_port()}:interface=127.0.0.1",
            f"--shares-needed={self.encoding[0]}",
            f"--shares-happy={self.encoding[1]}",
            f"--shares-total={self.encoding[2]}",
        )
        _edit_cfg(self.client_dir, {"client": {"force_foolscap": "false"}})
        for node_dir in self.storage_dirs:
            self._wait_storage_up(node_dir)
        self._start(self.client_dir)
        self._wait_connected()

    def stop(self) -> None:
        """Stop every node still running: SIGTERM to each process group, SIGKILL if one lingers."""
        processes = list(self._processes.items())
        for _, proc in processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for node_dir, proc in processes:
            self._stop_one(node_dir, proc, deadline)

    def _stop_one(self, node_dir: Path, proc: subprocess.Popen[bytes], deadline: float | None = None) -> None:
        if deadline is None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._processes.pop(node_dir, None)

    # -- node creation and processes -------------------------------------------------------------------------

    @staticmethod
    def _listen_args() -> list[str]:
        port = _free_port()
        return [f"--port=tcp:{port}:interface=127.0.0.1", f"--location=tcp:127.0.0.1:{port}"]

    def _create(self, node_dir: Path, command: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.tahoe_exe), command, *args, str(node_dir)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_tahoe_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise TahoeCommandError(result.returncode, result.args, result.stdout, result.stderr)

    def _create_storage(self, node_dir: Path, introduced: bool) -> None:
        """Create and start a storage node; `introduced=False` gives one that only static config can find."""
        intro = [f"--introducer={self.introducer_furl}"] if introduced else []
        self._create(
            node_dir, "create-node", f"--nickname={node_dir.name}", "--webport=none", *intro, *self._listen_args()
        )
        # tahoe reserves 1G by default; a CI disk nearly full must not turn every upload away
        _edit_cfg(node_dir, {"storage": {"reserved_space": "0"}})
        self._start(node_dir)

    def _start(self, node_dir: Path) -> None:
        log = (node_dir / "run.log").open("ab")
        try:
            preexec = None
            if _libc is not None and threading.current_thread() is threading.main_thread():
                # PDEATHSIG fires when the parent *thread* ends, so only the main thread may set it
                parent = os.getpid()

                def preexec() -> None:
                    _child_setup(parent)

            self._processes[node_dir] = subprocess.Popen(
                [str(self.tahoe_exe), "run", "--allow-stdin-close", str(node_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_tahoe_env(),
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            log.close()

    def _wait_for(self, condition: Any, what: str, node_dir: Path | None = None) -> None:
        """Poll `condition` until true; fail early, with the logs, if a node process has died."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            if condition():
                return
            for proc_dir, proc in self._processes.items():
                if proc.poll() is not None:
                    raise TahoeError(f"tahoe node {proc_dir.name} exited ({proc.returncode})\n{_log_tail(proc_dir)}")
            if time.monotonic() > deadline:
                logs = _log_tail(node_dir) if node_dir is not None else ""
                raise TahoeError(f"timed out after {self.start_timeout}s waiting for {what}\n{logs}")
            time.sleep(0.2)

    def _wait_storage_up(self, node_dir: Path) -> None:
        # storage.furl is written once the storage service is registered with the (listening) Tub
        self._wait_for(
            lambda: (node_dir / "private" / "storage.furl").exists() and (node_dir / "node.pubkey").exists(),
            f"storage node {node_dir.name}",
            node_dir,
        )

    # -- the client's view -----------------------------------------------------------------------------------

    @property
    def client_url(self) -> str:
        """The client's web API root, e.g. `http://127.0.0.1:23456/` (from `node.url`, written at start)."""
        return (self.client_dir / "node.url").read_text().strip()

    def server_statuses(self) -> dict[str, str]:
        """Server id -> connection status as the client's welcome page reports it (`"connected"` means HTTP)."""
        with urllib.request.urlopen(self.client_url + "?t=json", timeout=10) as response:
            welcome = json.load(response)
        return {s["nodeid"]: s["connection_status"] for s in welcome["servers"]}

    def expected_server_ids(self) -> set[str]:
        """Every storage server the client should be connected to: introduced nodes plus static entries."""
        return {_server_id(d) for d in self.storage_dirs} | self._static_ids

    def _wait_connected(self) -> None:
        expected = self.expected_server_ids()

        def ready() -> bool:
            if not (self.client_dir / "node.url").exists():
                return False
            try:
                statuses = self.server_statuses()
            except (OSError, ValueError):
                return False  # web server not up yet
            return all(statuses.get(sid, "").lower().startswith("connected") for sid in expected)

        self._wait_for(ready, f"the client to connect to {len(expected)} storage servers", self.client_dir)

    def tahoe(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run `tahoe -d <client_dir> ARGS`; stdout and stderr are bytes. Raises TahoeCommandError if check fails."""
        command = [str(self.tahoe_exe), "-d", str(self.client_dir), *args]
        result = subprocess.run(
            command,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            env=_tahoe_env(),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise TahoeCommandError(result.returncode, command, result.stdout, result.stderr)
        return result

    def announcements(self) -> list[dict[str, Any]]:
        """The introduced storage servers' announcements: `[{"server_id": key_s, "ann": {...}}]`, in node order.

        Read from the client's `private/introducer_default_cache.yaml` (structure in the module docstring); each
        `ann` can go unchanged into another client's servers.yaml.
        """
        cache = self.client_dir / "private" / "introducer_default_cache.yaml"
        wanted = [_server_id(d) for d in self.storage_dirs]
        found: dict[str, dict[str, Any]] = {}

        def complete() -> bool:
            found.clear()
            try:
                entries = yaml.safe_load(cache.read_text()) or []
            except (OSError, yaml.YAMLError):
                return False
            for entry in entries:
                if entry.get("ann", {}).get("service-name") == "storage":
                    found[entry["key_s"]] = entry["ann"]
            return all(sid in found for sid in wanted)

        self._wait_for(complete, "every announcement in introducer_default_cache.yaml", self.client_dir)
        return [{"server_id": sid, "ann": found[sid]} for sid in wanted]

    # -- static servers --------------------------------------------------------------------------------------

    def add_static_servers(self, entries: dict[str, dict[str, Any]]) -> None:
        """Merge `entries` (server id -> {"ann": {...}}) into the client's servers.yaml and restart the client.

        Returns once the client is connected to these servers as well as to the introduced ones. Over HTTP each
        `ann` needs `anonymous-storage-NURLs` and a well-formed `anonymous-storage-FURL` (its TubID seeds the
        lease and write-enabler secrets; it is never dialled): without the FURL Tahoe would drop the entry silently.
        """
        for server_id, entry in entries.items():
            ann = entry.get("ann", {})
            if not re.match(r"pb://[a-z2-7]+@", str(ann.get("anonymous-storage-FURL", ""))):
                raise ValueError(f"{server_id}: Tahoe 1.20 ignores a static server without a pb://TUBID@ FURL")
        self._stop_one(self.client_dir, self._processes[self.client_dir])
        path = self.client_dir / "private" / "servers.yaml"
        config: dict[str, Any] = {}
        if path.exists():
            config = yaml.safe_load(path.read_text()) or {}
        config.setdefault("storage", {}).update(entries)
        path.write_text(yaml.safe_dump(config, sort_keys=True))
        self._static_ids.update(entries)
        self._start(self.client_dir)
        self._wait_connected()

    def remove_storage_node(self, node_dir: Path) -> None:
        """Stop one of `storage_dirs` for good, as a server that leaves the grid; its directory stays on disk.

        The client keeps it in its list, disconnected, and so does its introducer cache; it is no longer expected
        to be connected.
        """
        self._stop_one(node_dir, self._processes[node_dir])
        self.storage_dirs.remove(node_dir)

    def add_storage_node(self, introduced: bool = False) -> Path:
        """Start one more Tahoe storage node; not introduced, only `add_static_servers` makes it known.

        Returns its node directory; `storage_announcement(dir)` gives the entry for servers.yaml.
        """
        node_dir = self.base_dir / f"storage-extra-{len(self._extra_storage_dirs) + 1}"
        self._extra_storage_dirs.append(node_dir)
        self._create_storage(node_dir, introduced=introduced)
        self._wait_storage_up(node_dir)
        if introduced:  # then it is one of the grid's servers like the others, and the client must see it
            self.storage_dirs.append(node_dir)
            self._wait_connected()
        return node_dir
