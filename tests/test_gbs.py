"""The GBS storage protocol, both sides: every client method against the server, the server's answers to bad and
hostile requests on raw TLS sockets, the client's answers to a hostile server, and the `storage` command line.

Servers run in-process: under `trio.run` inside each client test (a nursery cancelled at the end), or in a
background thread with its own trio run for the raw-socket tests, which talk plain blocking sockets + h11.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import cbor2
import h11
import pytest
import trio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lafs_core import base32
from lafs_core.errors import FormatError
from lafs_core.grid import gbs_client
from lafs_core.grid.gbs_client import GbsStorageServer
from lafs_core.grid.server_api import (
    LeaseSecrets,
    RequestRefusedError,
    ServerIdentityError,
    ServerUnavailableError,
    ShareNotFoundError,
    StorageServerError,
    WriteConflictError,
)
from lafs_core.mutable.slot import TestAndWrite, TestVector, WriteVector, new_share_test
from lafs_core.nurl import format_nurl, parse_furl, parse_nurl, spki_hash
from lafs_core.storage import gbs_wire
from lafs_core.storage.containers import IMMUTABLE_DATA_OFFSET, parse_immutable_container
from lafs_core.storage.gbs_server import GbsServer, ServerLimits
from lafs_core.storage.server_dir import ServerDir, ServerDirError, create_server_dir, load_server_dir
from lafs_core.storage.share_store import ShareStore

from .shared_data import SAMPLE_GRID
from .storage_cluster import StorageProcess, blackmatch

MiB = 1024 * 1024


# --- identities and servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> ServerDir:
    """A server identity (certificate, key, swissnum) shared by the module's servers; RSA keys are slow to make."""
    return create_server_dir(tmp_path_factory.mktemp("identity") / "server")


@pytest.fixture(scope="module")
def other_identity(tmp_path_factory) -> ServerDir:
    return create_server_dir(tmp_path_factory.mktemp("identity") / "other")


def nurl_for(identity: ServerDir, port: int, *, pin_of: ServerDir | None = None) -> str:
    return format_nurl(spki_hash((pin_of or identity).cert_der), "127.0.0.1", port, identity.swissnum)


def make_client(identity: ServerDir, port: int, **kwargs) -> GbsStorageServer:
    pin_of = kwargs.pop("pin_of", None)
    return GbsStorageServer(
        nurl_for(identity, port, pin_of=pin_of),
        server_id=identity.server_id,
        nickname="test-server",
        tubid=identity.tubid,
        permutation_seed=b"seed",
        **kwargs,
    )


Body = Callable[[GbsStorageServer, GbsServer, ShareStore], Awaitable[None]]


def with_server(root: Path, identity: ServerDir, body: Body, *, limits=None, client_options=None) -> GbsServer:
    """Run `body(client, server, store)` against a fresh in-process server; everything stops afterwards."""
    server_box = []

    async def main() -> None:
        store = ShareStore(root, nodeid=identity.tubid)
        server = GbsServer(store, identity.swissnum.encode(), limits=limits)
        server_box.append(server)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, identity.cert_pem, identity.key_pem, "127.0.0.1", 0)
            client = make_client(identity, port, **(client_options or {}))
            try:
                with trio.fail_after(120):
                    await body(client, server, store)
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return server_box[0]


class ThreadedServer:
    """A server in a background thread with its own trio run, for blocking raw-socket clients."""

    def __init__(self, root: Path, identity: ServerDir, limits: ServerLimits | None = None) -> None:
        self.root, self.identity, self.limits = root, identity, limits
        self.port = 0
        self.server: GbsServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            store = ShareStore(self.root, nodeid=self.identity.tubid)
            self.server = GbsServer(store, self.identity.swissnum.encode(), limits=self.limits)
            async with trio.open_nursery() as nursery:
                args = (self.identity.cert_pem, self.identity.key_pem, "127.0.0.1", 0)
                self.port = await nursery.start(self.server.serve, *args)
                self._ready.set()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive()


RAW_LIMITS = ServerLimits(request_timeout=1.0, body_timeout=1.0, handshake_timeout=1.0, max_mutable_share_size=MiB)


@pytest.fixture(scope="module")
def raw_server(tmp_path_factory, identity):
    with ThreadedServer(tmp_path_factory.mktemp("raw") / "store", identity, RAW_LIMITS) as server:
        yield server


# --- a blocking raw client ---------------------------------------------------------------------------------------
def tls_socket(port: int) -> ssl.SSLSocket:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock)


@dataclass
class Raw:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def cbor(self):
        assert self.headers[b"content-type"] == b"application/cbor"
        return cbor2.loads(self.body)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret(kind: str, value: bytes) -> tuple[str, str]:
    return ("X-Tahoe-Authorization", f"{kind} {b64(value)}")


def raw_request(
    port: int,
    method: str,
    path: str,
    headers=(),
    body: bytes = b"",
    *,
    swissnum: bytes | str | None = "default",
    content_length: bool = True,
    sock: ssl.SSLSocket | None = None,
) -> Raw:
    """One request on a new TLS connection (or `sock`); tolerates the server closing while we send."""
    if swissnum == "default":
        swissnum = RAW_SWISSNUM[0]
    conn = h11.Connection(h11.CLIENT)
    all_headers = [("Host", "127.0.0.1")]
    if swissnum is not None:
        all_headers.append(("Authorization", f"Tahoe-LAFS {b64(swissnum)}"))
    all_headers += list(headers)
    if content_length and not any(name.lower() == "transfer-encoding" for name, _ in headers):
        all_headers.append(("Content-Length", str(len(body))))
    own = sock is None
    sock = sock or tls_socket(port)
    try:
        data = conn.send(h11.Request(method=method, target=path, headers=all_headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        with contextlib.suppress(OSError):  # the server may answer early and close
            sock.sendall(data)
        response, parts = None, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        return Raw(response.status_code, dict(response.headers), b"".join(parts))
    finally:
        if own:
            sock.close()


RAW_SWISSNUM: list[bytes] = []  # filled by the autouse fixture below: the module identity's swissnum


@pytest.fixture(autouse=True)
def _raw_swissnum(identity):
    RAW_SWISSNUM[:] = [identity.swissnum.encode()]


def random_si() -> bytes:
    return os.urandom(16)


def si32(si: bytes) -> str:
    return base32.encode(si)


LEASE = LeaseSecrets(b"r" * 32, b"c" * 32)
LEASE_HEADERS = [secret("lease-renew-secret", b"r" * 32), secret("lease-cancel-secret", b"c" * 32)]


def allocate_raw(port: int, si: bytes, shnums, size: int, upload: bytes = b"u" * 20) -> Raw:
    body = cbor2.dumps({"share-numbers": set(shnums), "allocated-size": size})
    headers = [*LEASE_HEADERS, secret("upload-secret", upload), ("Content-Type", "application/cbor")]
    return raw_request(port, "POST", f"/storage/v1/immutable/{si32(si)}", headers, body)


def patch_raw(port: int, si: bytes, shnum: int, offset: int, data: bytes, upload: bytes = b"u" * 20, **kw) -> Raw:
    headers = [secret("upload-secret", upload), ("Content-Range", f"bytes {offset}-{offset + len(data) - 1}/*")]
    return raw_request(port, "PATCH", f"/storage/v1/immutable/{si32(si)}/{shnum}", headers, data, **kw)


def complete_share(port: int, si: bytes, data: bytes, shnum: int = 0) -> None:
    assert allocate_raw(port, si, {shnum}, len(data)).status == 200
    assert patch_raw(port, si, shnum, 0, data).status == 201


# ==============================================================================================================
# The client against the server
# ==============================================================================================================
def test_version(tmp_path, identity):
    async def body(client, server, store):
        version = await client.get_version()
        assert version.available_space > 0
        assert version.maximum_immutable_share_size == version.available_space
        assert version.maximum_mutable_share_size == ServerLimits().max_mutable_share_size
        assert version.application_version.startswith(b"blackmatch/")

    with_server(tmp_path, identity, body)


def test_immutable_upload_lifecycle(tmp_path, identity):
    si, upload, other_upload = random_si(), os.urandom(20), os.urandom(20)
    data = os.urandom(3000)

    async def body(client, server, store):
        result = await client.allocate_buckets(si, LEASE, upload, {0, 1, 2}, len(data))
        assert result.allocated == {0, 1, 2} and result.already_have == set()
        # Writes in any order; 200 (False) until the last byte, then 201 (True).
        assert not await client.write_share_chunk(si, 0, upload, 1000, data[1000:])
        assert not await client.write_share_chunk(si, 0, upload, 500, data[500:1500])  # same bytes again: fine
        assert await client.write_share_chunk(si, 0, upload, 0, data[:1000])
        assert await client.list_immutable_shares(si) == {0}
        # A repeated allocate: finished shares are already had, in-progress ones are in neither set.
        again = await client.allocate_buckets(si, LEASE, other_upload, {0, 1, 3}, len(data))
        assert again.already_have == {0} and again.allocated == {3}
        # Range reads: inside, across the end (short), at or past the end (empty).
        assert await client.read_immutable_share(si, 0, 0, len(data)) == data
        assert await client.read_immutable_share(si, 0, 2990, 100) == data[2990:]
        assert await client.read_immutable_share(si, 0, 3000, 10) == b""
        assert await client.read_immutable_share(si, 0, 10**12, 10) == b""
        assert await client.read_immutable_share(si, 0, 5, 0) == b""
        with pytest.raises(ShareNotFoundError):
            await client.read_immutable_share(si, 1, 0, 10)  # still uploading
        # Conflicts and secrets.
        assert not await client.write_share_chunk(si, 1, upload, 0, b"x" * 10)
        with pytest.raises(WriteConflictError) as conflict:
            await client.write_share_chunk(si, 1, upload, 5, b"y" * 10)
        assert conflict.value.status == 409
        with pytest.raises(RequestRefusedError) as wrong:
            await client.write_share_chunk(si, 1, other_upload, 100, b"z")
        assert wrong.value.status == 401
        with pytest.raises(RequestRefusedError) as beyond:
            await client.write_share_chunk(si, 1, upload, len(data) - 1, b"zz")
        assert beyond.value.status == 416
        # Abort: in progress → gone (writes then 404); complete → 405; unknown → 404.
        await client.abort_upload(si, 1, upload)
        with pytest.raises(ShareNotFoundError):
            await client.write_share_chunk(si, 1, upload, 0, b"x")
        with pytest.raises(RequestRefusedError) as complete:
            await client.abort_upload(si, 0, upload)
        assert complete.value.status == 405
        with pytest.raises(ShareNotFoundError):
            await client.abort_upload(si, 9, upload)
        # Leases and corruption advisories.
        await client.add_or_renew_lease(si, LeaseSecrets(b"R" * 32, b"C" * 32))
        with pytest.raises(ShareNotFoundError):
            await client.add_or_renew_lease(random_si(), LEASE)
        await client.advise_corrupt_immutable(si, 0, "block hash mismatch ✗")
        with pytest.raises(ShareNotFoundError):
            await client.advise_corrupt_immutable(si, 2, "not finished")
        assert await client.list_immutable_shares(random_si()) == set()

    with_server(tmp_path, identity, body)
    share = next(tmp_path.glob(f"shares/*/{si32(si)}/0")).read_bytes()
    info = parse_immutable_container(share[:IMMUTABLE_DATA_OFFSET], len(share))
    assert info.data_length == len(data) and share[IMMUTABLE_DATA_OFFSET:][: len(data)] == data
    (advisory,) = (tmp_path / "corruption-advisories").iterdir()
    assert "block hash mismatch ✗" in advisory.read_text()


def test_mutable_read_test_write(tmp_path, identity):
    si, enabler = random_si(), os.urandom(32)
    first, second = b"seq1" + os.urandom(100), b"seq2" + os.urandom(200)

    async def body(client, server, store):
        create = {n: TestAndWrite((new_share_test(),), (WriteVector(0, first),)) for n in (0, 1)}
        result = await client.read_test_write(si, enabler, LEASE, create, [(0, 4)])
        assert result.success and result.data == {}
        assert await client.list_mutable_shares(si) == {0, 1}
        assert await client.list_immutable_shares(si) == set()
        assert await client.read_mutable_share(si, 0, 0, 1000) == first
        assert await client.read_mutable_share(si, 1, 100, 1000) == first[100:]
        assert await client.read_mutable_share(si, 1, len(first), 10) == b""
        # Update guarded by a checkstring test: passes once, then the old checkstring fails.
        update = {0: TestAndWrite((TestVector(0, 4, b"seq1"),), (WriteVector(0, second),))}
        result = await client.read_test_write(si, enabler, LEASE, update, [(0, 4)])
        assert result.success and result.data == {0: [b"seq1"], 1: [b"seq1"]}
        result = await client.read_test_write(si, enabler, LEASE, update, [(0, 4), (1000, 5)])
        assert not result.success and result.data == {0: [b"seq2", b""], 1: [b"seq1", b""]}
        assert await client.read_mutable_share(si, 0, 0, 1000) == second
        # The write enabler is checked against every existing share.
        with pytest.raises(RequestRefusedError) as bad:
            await client.read_test_write(si, os.urandom(32), LEASE, update, [])
        assert bad.value.status == 401
        # Truncation and deletion by new-length.
        truncate = {1: TestAndWrite((), (), new_length=10), 0: TestAndWrite((), (), new_length=0)}
        assert (await client.read_test_write(si, enabler, LEASE, truncate, [])).success
        assert await client.list_mutable_shares(si) == {1}
        assert await client.read_mutable_share(si, 1, 0, 100) == first[:10]
        with pytest.raises(ShareNotFoundError):
            await client.read_mutable_share(si, 0, 0, 10)
        await client.advise_corrupt_mutable(si, 1, "bad signature")
        with pytest.raises(ShareNotFoundError):
            await client.advise_corrupt_mutable(si, 0, "gone")
        await client.add_or_renew_lease(si, LEASE)
        # An immutable share and a mutable share never share a storage index on this server.
        imm = random_si()
        await client.allocate_buckets(imm, LEASE, b"u" * 20, {0}, 5)
        await client.write_share_chunk(imm, 0, b"u" * 20, 0, b"12345")
        with pytest.raises(RequestRefusedError) as mixed:
            await client.read_test_write(imm, enabler, LEASE, create, [])
        assert mixed.value.status == 401
        assert (await client.allocate_buckets(si, LEASE, b"u" * 20, {1, 2}, 5)).allocated == {2}
        with pytest.raises(ShareNotFoundError):
            await client.read_immutable_share(si, 1, 0, 1)

    with_server(tmp_path, identity, body)


def test_a_large_upload_refused_early_gets_the_refusal(tmp_path, identity):
    si, data = random_si(), os.urandom(16 * MiB)

    async def body(client, server, store):
        await client.allocate_buckets(si, LEASE, b"u" * 20, {0}, 8 * MiB)
        for _ in range(2):  # the server answers before the body is in, then closes: the answer still arrives
            with pytest.raises(RequestRefusedError) as wrong:
                await client.write_share_chunk(si, 0, b"wrong", 0, data[: 8 * MiB])
            assert wrong.value.status == 401
            with pytest.raises(RequestRefusedError) as beyond:
                await client.write_share_chunk(si, 0, b"u" * 20, 0, data)
            assert beyond.value.status == 416
        assert await client.write_share_chunk(si, 0, b"u" * 20, 0, data[: 8 * MiB])

    with_server(tmp_path, identity, body)


def test_keep_alive_and_connection_limit(tmp_path, identity):
    si = random_si()

    async def body(client, server, store):
        await client.allocate_buckets(si, LEASE, b"u" * 20, {0}, 100)
        await client.write_share_chunk(si, 0, b"u" * 20, 0, bytes(range(100)))
        results = {}

        async def read(i: int) -> None:
            results[i] = await client.read_immutable_share(si, 0, i, 10)

        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(read, i)
        assert all(results[i] == bytes(range(i, min(i + 10, 100))) for i in range(60))
        assert server.stats.connections <= 3
        assert server.stats.requests == 62

    with_server(tmp_path, identity, body, client_options={"max_connections": 3})


def test_idle_connections_closed_by_the_server(tmp_path, identity, monkeypatch):
    si = random_si()

    async def body(client, server, store):
        await client.allocate_buckets(si, LEASE, b"u" * 20, {0}, 10)
        await trio.sleep(0.8)  # the server closes the idle connection; it is noticed before reuse
        await client.write_share_chunk(si, 0, b"u" * 20, 0, b"0123456789")
        await trio.sleep(0.8)
        # Pretend the closed connection still looked alive: a GET is retried on a fresh connection...
        monkeypatch.setattr(gbs_client._Connection, "looks_alive", lambda self: True)
        assert await client.read_immutable_share(si, 0, 0, 10) == b"0123456789"
        await trio.sleep(0.8)
        # ...anything else fails, since it might have taken effect.
        with pytest.raises(ServerUnavailableError):
            await client.add_or_renew_lease(si, LEASE)
        assert await client.list_immutable_shares(si) == {0}

    with_server(tmp_path, identity, body, limits=ServerLimits(request_timeout=0.3))


def test_wrong_tls_key_is_refused_before_any_http(tmp_path, identity, other_identity, caplog):
    caplog.set_level(logging.DEBUG, logger="blackmatch")

    async def body(client, server, store):
        with pytest.raises(ServerIdentityError):
            await client.get_version()
        with pytest.raises(ServerIdentityError):
            await client.read_immutable_share(random_si(), 0, 0, 10)
        await trio.sleep(0.2)  # let the server notice the closed connections
        assert server.stats.connections == 2
        assert server.stats.requests == 0

    server = with_server(tmp_path, identity, body, client_options={"pin_of": other_identity})
    assert server.stats.requests == 0
    assert "/storage/v1" not in caplog.text  # no request line was ever logged
    assert identity.swissnum not in caplog.text


def test_timeouts_and_unreachable_servers(identity):
    async def main():
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def silent(listeners):
                async with listeners[0]:
                    streams = []
                    try:
                        while True:
                            streams.append(await listeners[0].accept())  # accept, then never answer
                    finally:
                        for stream in streams:
                            await trio.aclose_forcefully(stream)

            nursery.start_soon(silent, listeners)
            client = make_client(identity, port, timeout=0.3)
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match="timed out"):
                await client.get_version()
            assert time.monotonic() - start < 3
            nursery.cancel_scope.cancel()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        with pytest.raises(ServerUnavailableError):
            await make_client(identity, closed_port, timeout=2).get_version()

    trio.run(main)


def test_large_shares_stream_in_chunks(tmp_path, identity, monkeypatch):
    si, data = random_si(), os.urandom(5 * MiB + 123)
    sizes = []
    real_read = ShareStore.read_immutable
    real_write = ShareStore.write

    def read(self, *args):
        sizes.append(("read", args[3]))
        return real_read(self, *args)

    def write(self, si_, shnum, secret_, offset, data_):
        sizes.append(("write", len(data_)))
        return real_write(self, si_, shnum, secret_, offset, data_)

    monkeypatch.setattr(ShareStore, "read_immutable", read)
    monkeypatch.setattr(ShareStore, "write", write)

    async def body(client, server, store):
        await client.allocate_buckets(si, LEASE, b"u" * 20, {0}, len(data))
        assert await client.write_share_chunk(si, 0, b"u" * 20, 0, data)
        assert await client.read_immutable_share(si, 0, 0, len(data)) == data
        assert await client.read_immutable_share(si, 0, 100_000, 2 * MiB) == data[100_000 : 100_000 + 2 * MiB]

    with_server(tmp_path, identity, body, limits=ServerLimits(io_chunk=256 * 1024))
    assert sizes and all(size <= 256 * 1024 + 64 * 1024 for _, size in sizes)
    assert sum(size for kind, size in sizes if kind == "write") == len(data)


def test_from_announcement_of_a_real_tahoe_grid():
    with (SAMPLE_GRID / "announcements.yaml").open() as f:
        entries = yaml.safe_load(f)
    for entry in entries:
        ann = entry["ann"]
        server = GbsStorageServer.from_announcement(entry["key_s"], ann)
        assert server.tubid == parse_furl(ann["anonymous-storage-FURL"]).tubid
        assert server.permutation_seed == base32.decode(ann["permutation-seed-base32"])
        assert server.permutation_seed == entry["key_s"][3:].encode()  # Tahoe's seed: the key's base32 text
        assert server.nickname == ann["nickname"]
        assert server.nurl == parse_nurl(ann["anonymous-storage-NURLs"][0])
    ann = dict(entries[0]["ann"])
    del ann["permutation-seed-base32"]
    v0 = GbsStorageServer.from_announcement(entries[0]["key_s"], ann)
    assert v0.permutation_seed == base32.decode(entries[0]["key_s"][3:])
    other = GbsStorageServer.from_announcement("some-server", ann)
    assert other.permutation_seed == hashlib.sha256(b"some-server").digest()
    for broken in ({**ann, "anonymous-storage-NURLs": []}, {**ann, "anonymous-storage-FURL": None}):
        with pytest.raises(FormatError):
            GbsStorageServer.from_announcement("x", broken)


def test_a_real_tahoe_grid_served_over_gbs(tmp_path, identity):
    """The five share trees a real Tahoe 1.20 grid wrote, each behind a GBS server, read and written by the grid
    code through GbsStorageServer with the real servers' TubIDs and seeds: every file reads back, and the SDMF
    file can be overwritten (its write enablers were made by Tahoe from those TubIDs)."""
    from lafs_core.caps import ChkCap, DirectoryCap, LiteralCap, MutableWriteCap, parse_cap
    from lafs_core.grid.directory import read_directory
    from lafs_core.grid.download import read_immutable
    from lafs_core.grid.grid import Grid
    from lafs_core.grid.mutable_io import overwrite, retrieve
    from lafs_core.grid.nodedir import EncodingConfig
    from lafs_core.grid.upload import bytes_chunks, upload_immutable

    from .shared_data import sample_caps, sample_convergence, sample_plaintext

    with (SAMPLE_GRID / "announcements.yaml").open() as f:
        announcements = {entry["ann"]["nickname"]: entry for entry in yaml.safe_load(f)}
    for name in announcements:
        shutil.copytree(SAMPLE_GRID / "servers" / name, tmp_path / name)
    caps = {name: parse_cap(text) for name, text in sample_caps().items()}
    lease_secret = base32.decode((SAMPLE_GRID / "lease-secret").read_text().strip())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            servers = []
            for name, entry in announcements.items():
                store = ShareStore(tmp_path / name, nodeid=parse_furl(entry["ann"]["anonymous-storage-FURL"]).tubid)
                gbs = GbsServer(store, identity.swissnum.encode())
                port = await nursery.start(gbs.serve, identity.cert_pem, identity.key_pem, "127.0.0.1", 0)
                ann = {**entry["ann"], "anonymous-storage-NURLs": [nurl_for(identity, port)]}
                servers.append(GbsStorageServer.from_announcement(entry["key_s"], ann))
            grid = Grid(servers, base32.decode(sample_convergence()), lease_secret, EncodingConfig(3, 5, 10))
            for name, cap in caps.items():
                if isinstance(cap, LiteralCap | ChkCap):
                    assert await read_immutable(grid, cap) == sample_plaintext(name), name
                elif isinstance(cap, MutableWriteCap):
                    assert (await retrieve(grid, cap))[0] == sample_plaintext(name), name
                else:
                    assert isinstance(cap, DirectoryCap) and await read_directory(grid, cap), name
            await overwrite(grid, caps["mut-sdmf-text"], b"rewritten through GBS")
            assert (await retrieve(grid, caps["mut-sdmf-text"]))[0] == b"rewritten through GBS"
            data = os.urandom(2 * MiB + 5)
            assert await read_immutable(grid, await upload_immutable(grid, len(data), bytes_chunks(data))) == data
            for server in servers:
                await server.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


# ==============================================================================================================
# A hostile server: the client refuses what it should not accept
# ==============================================================================================================
async def _hostile_server(identity: ServerDir, answer: bytes, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer every request with the same raw bytes."""
    context = gbs_wire.server_ssl_context(identity.cert_pem, identity.key_pem)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(tcp):
        stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
        try:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.EndOfMessage):
                    break
            await stream.send_all(answer)
            await trio.sleep(0.2)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


def _http(status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CBOR = ("Content-Type", "application/cbor")
OCTETS = ("Content-Type", "application/octet-stream")
SI = bytes(16)


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        ("read", _http(206, [OCTETS, ("Content-Range", "bytes 0-19/*")], b"x" * 20)),  # more than asked
        ("read", _http(206, [OCTETS, ("Content-Range", "bytes 1-10/*")], b"x" * 10)),  # another range
        ("read", _http(206, [OCTETS, ("Content-Range", "bytes 0-9/*")], b"x" * 5)),  # body shorter than range
        ("read", _http(206, [OCTETS], b"x" * 10)),  # no Content-Range
        ("read", _http(206, [OCTETS, ("Content-Range", "bytes 0-9/*")], b"x" * 10, length=10**9)),
        ("read", _http(206, [CBOR, ("Content-Range", "bytes 0-9/*")], b"x" * 10)),  # not share data
        ("read", _http(200, [OCTETS], b"x" * 10)),  # a whole share is not an answer to a Range
        (
            "read",
            b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-9/*\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n"
            + b"x" * 256
            + b"\r\n0\r\n\r\n",
        ),
        ("list", _http(200, [CBOR], cbor2.dumps([1, 2]))),  # an untagged array where a set is required
        ("list", _http(200, [CBOR], cbor2.dumps({1, -2}))),
        ("list", _http(200, [("Content-Type", "text/plain")], cbor2.dumps({1}))),
        ("list", _http(200, [CBOR], b"\xd9\x01\x02\x9f\x01\xff")),  # indefinite-length array
        ("list", _http(200, [CBOR], cbor2.dumps(cbor2.CBORTag(35, "regex")))),
        ("list", _http(200, [CBOR], b"\xff\xff")),
        ("version", _http(200, [CBOR], cbor2.dumps({"application-version": b"x"}))),
        ("version", _http(200, [CBOR], cbor2.dumps([]))),
        ("allocate", _http(200, [CBOR], cbor2.dumps({"already-have": set(), "allocated": {7}}))),  # not asked
        ("allocate", _http(200, [CBOR], cbor2.dumps({"already-have": set()}))),
        ("write", _http(200, [CBOR], cbor2.dumps({"required": [{"begin": -1, "end": 3}]}))),
        ("rtw", _http(200, [CBOR], cbor2.dumps({"success": 1, "data": {}}))),
        ("rtw", _http(200, [CBOR], cbor2.dumps({"success": True, "data": {0: [b"a", b"b"]}}))),  # 2 reads for 1
        ("rtw", _http(200, [CBOR], cbor2.dumps({"success": True, "data": {0: ["text"]}}))),
        ("rtw", _http(200, [CBOR], cbor2.dumps({"success": True, "data": {0: [b"a"]}}) + b"\x00")),
        ("lease", _http(200, [], b"")),  # the lease endpoint answers 204
        ("lease", b"this is not HTTP at all\r\n\r\n"),
    ],
)
def test_client_refuses_hostile_answers(identity, call, answer):
    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_hostile_server, identity, answer)
            client = make_client(identity, port, timeout=5)
            calls = {
                "read": lambda: client.read_immutable_share(SI, 0, 0, 10),
                "list": lambda: client.list_mutable_shares(SI),
                "version": lambda: client.get_version(),
                "allocate": lambda: client.allocate_buckets(SI, LEASE, b"u", {0, 1}, 10),
                "write": lambda: client.write_share_chunk(SI, 0, b"u", 0, b"x"),
                "rtw": lambda: client.read_test_write(SI, b"w" * 32, LEASE, {}, [(0, 1)]),
                "lease": lambda: client.add_or_renew_lease(SI, LEASE),
            }
            with pytest.raises(StorageServerError):
                await calls[call]()
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_bytes_after_an_answer_are_not_taken_for_the_next_one(identity):
    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_hostile_server, identity, _http(204, [], b"") + b"HTTP/1.1 206 X\r\n\r\n")
            client = make_client(identity, port)
            assert await client.read_immutable_share(SI, 0, 0, 10) == b""
            assert await client.read_immutable_share(SI, 0, 0, 10) == b""  # on a new connection
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_client_status_mapping(identity):
    async def check(status: int, expected: type[Exception]) -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_hostile_server, identity, _http(status, [], b"no"))
            client = make_client(identity, port)
            with pytest.raises(expected) as raised:
                await client.list_immutable_shares(SI)
            assert raised.value.status == status and f"HTTP {status} (no)" in str(raised.value)
            await client.aclose()
            nursery.cancel_scope.cancel()

    async def main():
        await check(404, ShareNotFoundError)
        await check(409, WriteConflictError)
        await check(401, RequestRefusedError)
        await check(500, RequestRefusedError)

    trio.run(main)


# ==============================================================================================================
# The server against raw requests
# ==============================================================================================================
def test_version_exact_shape(raw_server):
    answer = raw_request(raw_server.port, "GET", "/storage/v1/version")
    assert answer.status == 200
    version = answer.cbor()
    assert set(version) == {b"http://allmydata.org/tahoe/protocols/storage/v1", b"application-version"}
    v1 = version[b"http://allmydata.org/tahoe/protocols/storage/v1"]
    assert set(v1) == {b"maximum-immutable-share-size", b"maximum-mutable-share-size", b"available-space"}
    assert all(type(v) is int for v in v1.values()) and type(version[b"application-version"]) is bytes
    head = raw_request(raw_server.port, "HEAD", "/storage/v1/version")
    assert head.status == 200 and head.body == b"" and int(head.headers[b"content-length"]) == len(answer.body)


@pytest.mark.parametrize(
    ("swissnum", "authorization"),
    [
        (b"wrong-swissnum", None),
        (None, None),
        (None, "Tahoe-LAFS"),
        (None, "tahoe-lafs {good}"),
        (None, "Tahoe-LAFS  {good}"),
        (None, "Bearer {good}"),
    ],
)
def test_authorization_is_exact(raw_server, identity, swissnum, authorization):
    headers = []
    if authorization:
        headers.append(("Authorization", authorization.format(good=b64(identity.swissnum.encode()))))
    answer = raw_request(raw_server.port, "GET", "/storage/v1/version", headers, swissnum=swissnum)
    assert answer.status == 401


def test_routing_comes_before_authorization(raw_server):
    si = si32(random_si())
    for path in [
        f"/storage/v1/immutable/{si[:25]}/shares",  # 25 characters
        f"/storage/v1/immutable/{si}a/shares",  # 27
        f"/storage/v1/immutable/{si.upper()}/shares",
        f"/storage/v1/immutable/{si[:25]}b/shares",  # not canonical base32
        f"/storage/v1/immutable/{si}/x1",
        f"/storage/v1/immutable/{si}/-1",
        "/storage/v1/versions",
        "/storage/v2/version",
        "/",
    ]:
        assert raw_request(raw_server.port, "GET", path, swissnum=None).status == 404, path
    answer = raw_request(raw_server.port, "DELETE", f"/storage/v1/immutable/{si}/3", swissnum=None)
    assert answer.status == 405 and answer.headers[b"allow"] == b"GET, HEAD, PATCH"
    assert raw_request(raw_server.port, "GET", f"/storage/v1/immutable/{si}", swissnum=None).status == 405
    # Query strings are ignored and %-escapes decoded, as werkzeug does; share numbers are decimal.
    assert raw_request(raw_server.port, "GET", f"/storage/v1/immutable/{si}/shares?x=1").status == 200
    assert raw_request(raw_server.port, "GET", f"/storage/v1/immutable/{si}/%73hares").status == 200
    assert raw_request(raw_server.port, "GET", f"/storage/v1/immutable/{si}/007").status == 404


def test_accept_and_content_type(raw_server):
    port, si = raw_server.port, random_si()
    assert raw_request(port, "GET", "/storage/v1/version", [("Accept", "*/*")]).status == 406
    assert raw_request(port, "GET", "/storage/v1/version", [("Accept", "application/json")]).status == 406
    assert raw_request(port, "GET", "/storage/v1/version", [("Accept", "application/cbor")]).status == 200
    accept = [("Accept", "application/json;q=0.5, application/cbor")]
    assert raw_request(port, "GET", "/storage/v1/version", accept).status == 200
    body = cbor2.dumps({"share-numbers": {1}, "allocated-size": 10})
    headers = [*LEASE_HEADERS, secret("upload-secret", b"u" * 20)]
    path = f"/storage/v1/immutable/{si32(si)}"
    assert raw_request(port, "POST", path, [*headers, ("Content-Type", "application/json")], body).status == 415
    answer = raw_request(port, "POST", path, [*headers, ("Accept", "*/*"), ("Content-Type", "application/cbor")], body)
    assert answer.status == 406
    assert raw_request(port, "POST", path, headers, body).status == 200  # no Content-Type means CBOR
    assert raw_request(port, "GET", f"{path}/shares", [("Accept", "*/*")]).status == 406


def test_allocate_requires_tagged_sets_and_exact_schema(raw_server):
    port = raw_server.port
    headers = [*LEASE_HEADERS, secret("upload-secret", b"u" * 20), ("Content-Type", "application/cbor")]

    def allocate(message) -> int:
        body = message if isinstance(message, bytes) else cbor2.dumps(message)
        return raw_request(port, "POST", f"/storage/v1/immutable/{si32(random_si())}", headers, body).status

    assert allocate({"share-numbers": [1, 2], "allocated-size": 10}) == 400  # untagged array
    assert allocate({"share-numbers": {1, 2}, "allocated-size": 10}) == 200
    assert allocate({"share-numbers": {1, 2}, "allocated-size": -1}) == 400
    assert allocate({"share-numbers": {1, 2}, "allocated-size": 10, "extra": 1}) == 400
    assert allocate({b"share-numbers": {1}, b"allocated-size": 10}) == 400
    assert allocate({"share-numbers": set(range(257)), "allocated-size": 10}) == 400
    assert allocate({"share-numbers": {True}, "allocated-size": 10}) == 400
    assert allocate(b"") == 400 and allocate(b"\xa2") == 400 and allocate(b"\x00\x00") == 400
    answer = raw_request(
        port,
        "POST",
        f"/storage/v1/immutable/{si32(random_si())}",
        headers,
        cbor2.dumps({"share-numbers": {0, 3}, "allocated-size": 10}),
    )
    assert answer.body.startswith(b"\xa2") and b"\xd9\x01\x02" in answer.body  # answers are tag-258 sets too


def test_secrets_must_be_exactly_the_required_ones(raw_server, identity, caplog):
    caplog.set_level(logging.DEBUG, logger="blackmatch")
    port, si = raw_server.port, random_si()
    complete_share(port, si, b"leased data")
    path = f"/storage/v1/lease/{si32(si)}"
    renew, cancel = secret("lease-renew-secret", b"r" * 32), secret("lease-cancel-secret", b"c" * 32)
    assert raw_request(port, "PUT", path, [renew, cancel]).status == 204
    assert raw_request(port, "PUT", f"/storage/v1/lease/{si32(random_si())}", [renew, cancel]).status == 404
    short = secret("lease-renew-secret", b"s" * 31)
    for headers in [
        [short, cancel],  # 31 bytes
        [secret("lease-renew-secret", b"s" * 33), cancel],
        [cancel],  # missing
        [renew, cancel, secret("upload-secret", b"u")],  # extra
        [renew, cancel, secret("write-enabler", b"w" * 32)],
        [renew, ("X-Tahoe-Authorization", "lease-cancel-secret")],  # no value
        [renew, ("X-Tahoe-Authorization", "lease-cancel-secret !!!!")],  # decodes to nothing
        [renew, ("X-Tahoe-Authorization", "lease-cancel-secret Y")],  # undecodable
        [renew, ("X-Tahoe-Authorization", f"lease-cancel-secrets {b64(b'c' * 32)}")],  # unknown kind
    ]:
        assert raw_request(port, "PUT", path, headers).status == 400, headers
    assert raw_request(port, "GET", "/storage/v1/version", [renew]).status == 400  # none wanted here
    upload = f"/storage/v1/immutable/{si32(si)}/0/abort"
    assert raw_request(port, "PUT", upload, [("X-Tahoe-Authorization", "upload-secret ====")]).status == 400
    # Secrets and the swissnum never reach the logs.
    assert b64(b"s" * 31) not in caplog.text and b64(b"r" * 32) not in caplog.text
    assert identity.swissnum not in caplog.text and b64(identity.swissnum.encode()) not in caplog.text


def test_reads_and_ranges(raw_server):
    port, si, data = raw_server.port, random_si(), bytes(range(256)) * 4
    complete_share(port, si, data)
    path = f"/storage/v1/immutable/{si32(si)}/0"

    def read(range_value: str | None) -> Raw:
        return raw_request(port, "GET", path, [("Range", range_value)] if range_value else [])

    answer = read("bytes=10-19")
    assert answer.status == 206 and answer.body == data[10:20]
    assert answer.headers[b"content-range"] == b"bytes 10-19/*"
    assert answer.headers[b"content-type"] == b"application/octet-stream"
    answer = read("bytes=1000-2000")
    assert (
        answer.status == 206 and answer.body == data[1000:] and answer.headers[b"content-range"] == b"bytes 1000-1023/*"
    )
    assert read("bytes=1024-2000").status == 204 and read("bytes=5000-6000").body == b""
    full = read(None)
    assert full.status == 200 and full.body == data
    for bad in ["bytes=10-", "bytes=-10", "bytes=0-1,3-4", "bytes=5-3", "items=0-1", "bytes=x-y", "bytes 0-1"]:
        assert read(bad).status == 416, bad
    assert raw_request(port, "GET", path, [("Range", "bytes=0-0"), ("Accept", "*/*")]).status == 206
    assert raw_request(port, "GET", f"/storage/v1/immutable/{si32(si)}/1", [("Range", "bytes=0-0")]).status == 404
    assert raw_request(port, "GET", f"/storage/v1/mutable/{si32(si)}/0", [("Range", "bytes=0-0")]).status == 404


def test_writes(raw_server):
    port, si, data = raw_server.port, random_si(), os.urandom(100)
    assert allocate_raw(port, si, {0, 1}, len(data)).cbor() == {"already-have": set(), "allocated": {0, 1}}
    path = f"/storage/v1/immutable/{si32(si)}/0"
    upload = secret("upload-secret", b"u" * 20)
    assert raw_request(port, "PATCH", path, [upload], data[:10]).status == 416  # no Content-Range
    for bad in ["bytes 0-9", "bytes 9-0/*", "items 0-9/*", "bytes */*", "bytes 10-19/5", "bytes x-9/*"]:
        assert raw_request(port, "PATCH", path, [upload, ("Content-Range", bad)], data[:10]).status == 416, bad
    first = patch_raw(port, si, 0, 0, data[:10])
    assert first.status == 200 and first.cbor() == {"required": [{"begin": 10, "end": 100}]}
    assert patch_raw(port, si, 0, 5, b"X" * 10).status == 409  # overlaps different bytes
    assert patch_raw(port, si, 0, 5, data[5:15]).status == 200  # overlaps the same bytes
    assert patch_raw(port, si, 0, 50, data[50:60], upload=b"v" * 20).status == 401
    assert patch_raw(port, si, 0, 95, data[95:] + b"!").status == 416  # beyond the allocated size
    assert patch_raw(port, si, 7, 0, data[:10]).status == 404
    headers = [upload, ("Content-Range", "bytes 10-19/100")]  # a total instead of "*" is accepted
    assert raw_request(port, "PATCH", path, headers, data[10:20]).status == 200
    headers = [upload, ("Content-Range", "bytes 20-29/*")]
    assert raw_request(port, "PATCH", path, headers, data[20:25]).status == 400  # body shorter than the range
    last = patch_raw(port, si, 0, 20, data[20:])
    assert last.status == 201 and last.cbor() == {"required": []}
    assert patch_raw(port, si, 0, 0, data[:10]).status == 404  # finished: no upload any more
    abort = f"/storage/v1/immutable/{si32(si)}/0/abort"
    assert raw_request(port, "PUT", abort, [upload]).status == 405
    assert (
        raw_request(port, "PUT", f"/storage/v1/immutable/{si32(si)}/1/abort", [secret("upload-secret", b"x")]).status
        == 401
    )
    assert raw_request(port, "PUT", f"/storage/v1/immutable/{si32(si)}/1/abort", [upload]).status == 200
    assert raw_request(port, "PUT", f"/storage/v1/immutable/{si32(si)}/1/abort", [upload]).status == 404


def test_chunked_upload_and_expect_continue(raw_server):
    port, si, data = raw_server.port, random_si(), os.urandom(3000)
    allocate_raw(port, si, {0}, len(data))
    headers = [
        secret("upload-secret", b"u" * 20),
        ("Content-Range", f"bytes 0-{len(data) - 1}/*"),
        ("Transfer-Encoding", "chunked"),
        ("Expect", "100-continue"),
    ]
    assert raw_request(port, "PATCH", f"/storage/v1/immutable/{si32(si)}/0", headers, data).status == 201
    assert raw_request(port, "GET", f"/storage/v1/immutable/{si32(si)}/0").body == data


def test_corruption_advisories(raw_server):
    port, si = raw_server.port, random_si()
    complete_share(port, si, b"some data")
    path = f"/storage/v1/immutable/{si32(si)}/0/corrupt"
    cbor = ("Content-Type", "application/cbor")
    assert raw_request(port, "POST", path, [cbor], cbor2.dumps({"reason": "bad hash"})).status == 200
    assert raw_request(port, "POST", path, [cbor], cbor2.dumps({"reason": ""})).status == 400
    assert raw_request(port, "POST", path, [cbor], cbor2.dumps({"reason": "x" * 32700})).status == 200
    assert raw_request(port, "POST", path, [cbor], cbor2.dumps({"reason": b"bytes"})).status == 400
    assert raw_request(port, "POST", path, [cbor], cbor2.dumps({"reason": "x" * 40000})).status == 413
    assert raw_request(port, "POST", path, [("Content-Type", "text/plain")], b"bad").status == 415
    missing = f"/storage/v1/immutable/{si32(si)}/1/corrupt"
    assert raw_request(port, "POST", missing, [("Content-Type", "text/plain")], b"x").status == 404  # 404 first
    mutable = f"/storage/v1/mutable/{si32(si)}/0/corrupt"
    assert raw_request(port, "POST", mutable, [cbor], cbor2.dumps({"reason": "x"})).status == 404


def test_oversized_bodies(raw_server):
    port = raw_server.port
    headers = [*LEASE_HEADERS, secret("upload-secret", b"u" * 20), ("Content-Type", "application/cbor")]
    path = f"/storage/v1/immutable/{si32(random_si())}"
    assert raw_request(port, "POST", path, headers, b"\x00" * 8193).status == 413
    # A huge declared length is refused at once, before any body is sent.
    sock = tls_socket(port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Tahoe-LAFS {b64(RAW_SWISSNUM[0])}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers)
        + f"Content-Length: {10**15}\r\n\r\n"
    )
    sock.sendall(request.encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
    # Chunked bodies are counted as they arrive.
    chunked = [*headers, ("Transfer-Encoding", "chunked")]
    assert raw_request(port, "POST", path, chunked, b"\x00" * 20000).status == 413
    # Endpoints without a body tolerate a small one and refuse a large one.
    assert raw_request(port, "GET", "/storage/v1/version", [], b"ignored").status == 200
    assert raw_request(port, "GET", "/storage/v1/version", [], b"x" * (MiB + 1)).status == 413
    # A too-long request head.
    assert raw_request(port, "GET", "/storage/v1/version", [("X-Padding", "p" * 20000)]).status == 431


def test_read_test_write_limits(raw_server):
    port, si = raw_server.port, random_si()
    path = f"/storage/v1/mutable/{si32(si)}/read-test-write"
    headers = [secret("write-enabler", b"w" * 32), *LEASE_HEADERS, ("Content-Type", "application/cbor")]

    def rtw(message) -> Raw:
        return raw_request(port, "POST", path, headers, cbor2.dumps(message))

    def vectors(writes, tests=(), new_length=None):
        return {"test": list(tests), "write": writes, "new-length": new_length}

    ok = rtw({"test-write-vectors": {0: vectors([{"offset": 0, "data": b"hello"}])}, "read-vector": []})
    assert ok.status == 200 and ok.cbor() == {"success": True, "data": {}}
    far = {"test-write-vectors": {0: vectors([{"offset": 2**63, "data": b"x"}])}, "read-vector": []}
    assert rtw(far).status == 413  # would make a share larger than the server holds
    too_many = [{"offset": 0, "size": 1}] * 31
    assert rtw({"test-write-vectors": {}, "read-vector": too_many}).status == 400
    wrong = vectors([], tests=[{"offset": 0, "size": 1, "specimen": "text"}])
    assert rtw({"test-write-vectors": {0: wrong}, "read-vector": []}).status == 400
    assert rtw({"test-write-vectors": {"0": vectors([])}, "read-vector": []}).status == 400
    assert rtw({"test-write-vectors": {}, "read-vector": [], "extra": 0}).status == 400
    answer = rtw({"test-write-vectors": {}, "read-vector": [{"offset": 0, "size": 10**9}]})
    assert answer.status == 200 and answer.cbor() == {"success": True, "data": {0: [b"hello"]}}
    bad_enabler = [secret("write-enabler", b"v" * 32), *LEASE_HEADERS, ("Content-Type", "application/cbor")]
    assert (
        raw_request(port, "POST", path, bad_enabler, cbor2.dumps({"test-write-vectors": {}, "read-vector": []})).status
        == 401
    )


def test_garbage_does_not_disturb_other_clients(raw_server):
    port = raw_server.port
    # Not TLS at all.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET /storage/v1/version HTTP/1.1\r\n\r\n" + os.urandom(2000))
        try:
            reply = plain.recv(65536)
        except ConnectionResetError:
            reply = b""
        assert not reply.startswith(b"HTTP")  # the TLS handshake failed: no HTTP was served
    # Garbage inside TLS: a 400 and a closed connection.
    sock = tls_socket(port)
    sock.sendall(b"\x00\x01\x02 garbage \xff\r\n\r\n")
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 400")
    # Bad HTTP after a good request on the same connection.
    sock = tls_socket(port)
    assert raw_request(port, "GET", "/storage/v1/version", sock=sock).status == 200
    sock.sendall(b"GET /storage/v1/version HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    sock.close()
    # A TLS connection that goes away in the middle of a request body.
    sock = tls_socket(port)
    sock.sendall(
        b"POST /storage/v1/immutable/aaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab"
    )
    sock.close()
    assert raw_request(port, "GET", "/storage/v1/version").status == 200


def test_slowloris_is_cut_off(raw_server):
    port = raw_server.port
    slow = tls_socket(port)
    slow.sendall(b"GET /storage/v1/version HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    for _ in range(4):  # keep trickling header bytes, never finishing the head
        assert raw_request(port, "GET", "/storage/v1/version").status == 200
        try:
            slow.sendall(b"X-A: b\r\n")
        except OSError:
            break
        time.sleep(0.4)
    slow.settimeout(5)
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert slow.recv(65536) == b""
    assert time.monotonic() - start < 5
    slow.close()


# --- hypothesis: random bodies never make the server fail ---------------------------------------------------------
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=12)
    | st.floats(allow_nan=True)
    | st.sampled_from(
        [
            "share-numbers",
            "allocated-size",
            "test-write-vectors",
            "read-vector",
            "test",
            "write",
            "new-length",
            "offset",
            "size",
            "specimen",
            "data",
        ]
    )
)
_cbor_values = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(_leaves.filter(lambda v: not isinstance(v, float)), children, max_size=5)
        | st.builds(lambda items: cbor2.CBORTag(258, items), st.lists(children, max_size=5))
        | st.builds(cbor2.CBORTag, st.integers(min_value=0, max_value=300), children)
    ),
    max_leaves=25,
)
_uints = st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=2000)
_allocate_like = st.fixed_dictionaries(
    {
        "share-numbers": st.builds(lambda items: cbor2.CBORTag(258, items), st.lists(_uints | _leaves, max_size=6)),
        "allocated-size": _uints | _leaves,
    }
)
_vector = st.fixed_dictionaries({"offset": _uints, "size": _uints, "specimen": st.binary(max_size=8)})
_write = st.fixed_dictionaries({"offset": _uints, "data": st.binary(max_size=64)})
_rtw_like = st.fixed_dictionaries(
    {
        "test-write-vectors": st.dictionaries(
            _uints,
            st.fixed_dictionaries(
                {
                    "test": st.lists(_vector, max_size=3),
                    "write": st.lists(_write, max_size=3),
                    "new-length": st.none() | _uints,
                }
            ),
            max_size=3,
        ),
        "read-vector": st.lists(st.fixed_dictionaries({"offset": _uints, "size": _uints}), max_size=3),
    }
)
_bodies = (
    st.binary(max_size=200)
    | _cbor_values.map(cbor2.dumps)
    | _allocate_like.map(cbor2.dumps)
    | _rtw_like.map(cbor2.dumps)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_random_allocate_bodies(raw_server, body):
    headers = [*LEASE_HEADERS, secret("upload-secret", b"u" * 20), ("Content-Type", "application/cbor")]
    answer = raw_request(raw_server.port, "POST", f"/storage/v1/immutable/{si32(random_si())}", headers, body)
    assert answer.status in (200, 400, 413), answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies)
def test_random_read_test_write_bodies(raw_server, body):
    headers = [secret("write-enabler", b"w" * 32), *LEASE_HEADERS, ("Content-Type", "application/cbor")]
    answer = raw_request(
        raw_server.port, "POST", f"/storage/v1/mutable/{si32(random_si())}/read-test-write", headers, body
    )
    assert answer.status in (200, 400, 413), answer


def test_server_survived_everything(raw_server):
    assert raw_request(raw_server.port, "GET", "/storage/v1/version").status == 200
    assert 500 not in raw_server.server.stats.statuses


# ==============================================================================================================
# Server directories and the command line
# ==============================================================================================================
def test_server_directory(tmp_path):
    server = create_server_dir(tmp_path / "alpha", "127.0.0.1", 0)
    assert stat.S_IMODE((tmp_path / "alpha").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "alpha" / "private" / "node.pem").stat().st_mode) == 0o600
    assert server.listen_port > 0 and server.hostname == "127.0.0.1"
    loaded = load_server_dir(tmp_path / "alpha")
    assert loaded == server and loaded.nurl == server.nurl
    document = yaml.safe_load((tmp_path / "alpha" / "servers.yaml").read_text())
    ((server_id, entry),) = document["storage"].items()
    assert server_id == server.server_id and server_id.startswith("v0-") and len(server_id) == 55
    ann = entry["ann"]
    assert ann["nickname"] == "alpha"
    nurl = parse_nurl(ann["anonymous-storage-NURLs"][0])
    assert (nurl.host, nurl.port, nurl.swissnum) == ("127.0.0.1", server.listen_port, server.swissnum)
    assert nurl.spki_hash == spki_hash(server.cert_der)
    assert len(server.swissnum) == 32 and base32.is_canonical(server.swissnum)
    assert parse_furl(ann["anonymous-storage-FURL"]).tubid == hashlib.sha1(server.cert_der).digest()
    assert base32.decode(ann["permutation-seed-base32"]) == server_id[3:].encode()
    client = GbsStorageServer.from_announcement(server_id, ann)
    assert client.tubid == server.tubid
    with pytest.raises(ServerDirError):
        create_server_dir(tmp_path / "alpha")
    with pytest.raises(ServerDirError):
        load_server_dir(tmp_path / "nothing-here")
    named = create_server_dir(tmp_path / "beta", "0.0.0.0", 4567, hostname="storage.example")
    assert parse_nurl(named.nurl).host == "storage.example" and parse_nurl(named.nurl).port == 4567


def test_storage_create_and_run(tmp_path):
    directory = tmp_path / "node1"
    created = blackmatch("storage", "create", str(directory))
    server = load_server_dir(directory)
    assert created.stdout.decode().strip() == server.nurl
    document = yaml.safe_load((directory / "servers.yaml").read_text())
    (server_id,) = document["storage"]
    running = StorageProcess(directory)
    running.start()
    try:
        line = running.wait_for("listening on")
        assert f"listening on https://127.0.0.1:{server.listen_port}" in line

        async def use() -> None:
            client = GbsStorageServer.from_announcement(server_id, document["storage"][server_id]["ann"])
            si = random_si()
            await client.allocate_buckets(si, LEASE, b"u" * 20, {3}, 5)
            assert await client.write_share_chunk(si, 3, b"u" * 20, 0, b"hello")
            assert await client.read_immutable_share(si, 3, 0, 5) == b"hello"
            await client.aclose()

        trio.run(use)
        start = time.monotonic()
        assert running.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 5
    finally:
        running.stop()
    assert blackmatch("storage", "create", str(directory), check=False).returncode != 0


def test_kill_during_upload_leaves_only_complete_shares(tmp_path):
    directory = tmp_path / "node2"
    server = create_server_dir(directory)
    ann = yaml.safe_load((directory / "servers.yaml").read_text())["storage"][server.server_id]["ann"]
    si, complete, big = random_si(), os.urandom(1000), os.urandom(64 * MiB)
    running = StorageProcess(directory)
    running.start()
    try:
        running.wait_for("listening on")

        async def upload_and_kill() -> None:
            client = GbsStorageServer.from_announcement(server.server_id, ann)
            await client.allocate_buckets(si, LEASE, b"u" * 20, {0}, len(complete))
            await client.allocate_buckets(si, LEASE, b"v" * 20, {1, 2}, len(big))
            assert await client.write_share_chunk(si, 0, b"u" * 20, 0, complete)
            await client.write_share_chunk(si, 1, b"v" * 20, 0, big[: 10 * MiB])  # share 1: a prefix only

            async def stream_share_2() -> None:
                with pytest.raises(ServerUnavailableError):
                    for offset in range(0, len(big), MiB):
                        await client.write_share_chunk(si, 2, b"v" * 20, offset, big[offset : offset + MiB])
                        await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_share_2)
                await trio.sleep(0.5)  # share 2 is mid-upload
                os.kill(running.process.pid, signal.SIGKILL)
            await client.aclose()

        trio.run(upload_and_kill)
        running.process.wait(10)
    finally:
        running.stop()
    shares = directory / "storage" / "shares"
    final = sorted(p for p in shares.rglob("*") if p.is_file() and "incoming" not in p.relative_to(shares).parts)
    assert [p.name for p in final] == ["0"]
    raw = final[0].read_bytes()
    info = parse_immutable_container(raw[:IMMUTABLE_DATA_OFFSET], len(raw))
    assert info.data_length == len(complete) and raw[IMMUTABLE_DATA_OFFSET : IMMUTABLE_DATA_OFFSET + 1000] == complete
    # The next start wipes the partial uploads and serves the complete share.
    running = StorageProcess(directory)
    running.start()
    try:
        running.wait_for("listening on")
        assert not (shares / "incoming").exists()

        async def check() -> None:
            client = GbsStorageServer.from_announcement(server.server_id, ann)
            assert await client.list_immutable_shares(si) == {0}
            assert await client.read_immutable_share(si, 0, 0, 2000) == complete
            await client.aclose()

        trio.run(check)
        assert running.stop(signal.SIGTERM) == 0
    finally:
        running.stop()
