"""Real `blackmatch storage run` processes on loopback, for integration tests and benchmarks.

A StorageCluster makes N server directories, starts one process per directory, can stop, kill and restart them
one by one and add new ones; leaving the `with` block kills whatever still runs, even when the test failed.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lafs_core.storage.server_dir import ServerDir, create_server_dir

REPO = Path(__file__).resolve().parent.parent
BLACKMATCH = [sys.executable, "-m", "fuse_client.cli"]


def blackmatch(*args: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the command line as a user would; `check` asserts exit 0 and shows stderr when it fails."""
    done = subprocess.run([*BLACKMATCH, *args], input=stdin, capture_output=True, cwd=REPO, check=False)
    if check:
        assert done.returncode == 0, f"blackmatch {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done


class StorageProcess:
    """`blackmatch storage run DIR` as a subprocess, with its stderr lines collected by a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stderr: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running
        self.process = subprocess.Popen(
            [*BLACKMATCH, "storage", "run", str(self.directory)], stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process, self._lines), daemon=True).start()

    @staticmethod
    def _read(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first stderr line containing `text`; fails if the process exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                assert self.running, f"storage server exited: {''.join(self.stderr)}"
                continue
            self.stderr.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from the storage server in {timeout} s: {''.join(self.stderr)}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Signal the process and reap it; returns its exit status (None if it was not running)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(15)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        return status


class StorageCluster:
    """N storage server directories under `root`, each served by its own process."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.servers: list[ServerDir] = [create_server_dir(root / f"storage-{i}") for i in range(count)]
        self.processes = [StorageProcess(server.path) for server in self.servers]

    def __enter__(self) -> StorageCluster:
        try:
            for process in self.processes:
                process.start()
            for process in self.processes:
                process.wait_for("listening on")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for process in self.processes:
            process.stop(signal.SIGKILL)

    @property
    def servers_files(self) -> list[Path]:
        """Each server's `servers.yaml`, as `create-node --servers` takes them."""
        return [server.path / "servers.yaml" for server in self.servers]

    def share_files(self, index: int) -> list[Path]:
        """Server `index`'s final share files."""
        shares = self.servers[index].path / "storage" / "shares"
        return [p for p in shares.glob("*/*/*") if p.is_file() and "incoming" not in p.relative_to(shares).parts]

    def stop(self, index: int) -> None:
        self.processes[index].stop()

    def restart(self, index: int) -> None:
        self.processes[index].start()
        self.processes[index].wait_for("listening on")

    def add(self) -> int:
        """Start one more server (a new machine joining the grid); returns its index."""
        index = len(self.servers)
        self.servers.append(create_server_dir(self.root / f"storage-{index}"))
        self.processes.append(StorageProcess(self.servers[index].path))
        self.restart(index)
        return index

    def create_node(self, node_dir: Path, needed: int = 3, happy: int = 5, total: int = 10) -> Path:
        """A client node directory using every server of the cluster, made with `blackmatch create-node`."""
        servers = [arg for path in self.servers_files for arg in ("--servers", str(path))]
        encoding = ["--needed", str(needed), "--happy", str(happy), "--total", str(total)]
        blackmatch("create-node", str(node_dir), *servers, *encoding)
        return node_dir
