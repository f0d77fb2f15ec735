"""A storage server reached over Great Black Swamp: Tahoe-LAFS 1.20's storage protocol, HTTPS + CBOR.

The NURL pins the server's TLS public key, so certificates are not checked against any authority; instead, right
after the handshake and before a single byte of HTTP is sent, the SPKI hash of the certificate the server
presented is compared with the NURL's. A mismatch closes the connection and raises ServerIdentityError.

Requests share a small keep-alive pool per server (at most `max_connections` at once). An idle connection the
server has meanwhile closed is noticed before reuse when possible; if a reused connection still turns out
closed before any answer came, a GET is retried once on a fresh connection, anything else fails with
ServerUnavailableError (it may or may not have taken effect).

Everything the server sends is checked: status codes, Content-Type, Content-Range against the range asked for,
body lengths against what was announced and asked for, and the shape of every CBOR answer. A hostile or broken
server yields StorageServerError (or a subclass), never a TypeError or KeyError, and never more bytes than asked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import select
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h11
import trio

from .. import base32
from ..errors import FormatError
from ..mutable.slot import TestAndWrite
from ..nurl import Nurl, parse_furl, parse_nurl, spki_hash
from ..storage.gbs_wire import (
    API_PREFIX,
    CBOR_MIME_TYPE,
    MAX_REASON_BYTES,
    OCTET_STREAM,
    VERSION_KEY,
    Secret,
    WireError,
    allocate_request,
    authorization_value,
    client_ssl_context,
    coalesce,
    decode_cbor,
    encode_cbor,
    expect_bytes,
    expect_list,
    expect_map,
    expect_share_set,
    expect_uint,
    format_content_range,
    format_range,
    media_type,
    parse_content_range,
    read_test_write_request,
    secret_header_value,
)
from .server_api import (
    AllocationResult,
    LeaseSecrets,
    ReadTestWriteResult,
    RequestRefusedError,
    ServerIdentityError,
    ServerUnavailableError,
    ServerVersion,
    ShareNotFoundError,
    StorageServer,
    StorageServerError,
    WriteConflictError,
)

STORAGE_INDEX_LENGTH = 16
MAX_CBOR_RESPONSE = 30 * 1024 * 1024  # what Tahoe's client accepts (`http_client.limited_content`)
MAX_ERROR_BODY = 10_000  # error bodies are only for the log
_SEND_PIECE = 256 * 1024  # request bodies go out as memoryview slices: no copy, bounded TLS buffers
_RECEIVE_SIZE = 256 * 1024
_V0_SERVER_ID = re.compile(r"v0-[0-9a-zA-Z]{52}")

_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class _Response:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    truncated: bool = False  # an error text cut at MAX_ERROR_BODY: the rest was not read

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None


class _StaleConnection(Exception):
    """A reused connection was found closed before the server answered anything."""


class _Connection:
    """One TLS connection with its HTTP state; belongs to the trio run it was opened in."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], token: trio.lowlevel.TrioToken) -> None:
        self.stream = stream
        self.token = token
        self.http = h11.Connection(h11.CLIENT)
        self.reused = False

    def looks_alive(self) -> bool:
        """An idle connection has nothing to read: if the socket is readable, the server closed it (or sent
        something unasked), so it must not carry another request."""
        try:
            readable, _, _ = select.select([self.stream.transport_stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close_now(self) -> None:
        """Close without awaiting: for connections left over from an earlier trio run."""
        self.stream.transport_stream.socket.close()


class _Pool:
    """Keep-alive connections to one server, at most `max_connections` in use at once."""

    def __init__(self, nurl: Nurl, name: str, timeout: float, max_connections: int) -> None:
        self.nurl = nurl
        self.name = name
        self.timeout = timeout
        self.max_connections = max_connections
        self._ssl_context = client_ssl_context()
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(max_connections)
        self._token: trio.lowlevel.TrioToken | None = None
        host = f"[{nurl.host}]" if ":" in nurl.host else nurl.host
        self.host_header = f"{host}:{nurl.port}".encode("ascii")

    def _enter_run(self) -> None:
        """Connections and semaphores cannot cross trio runs: start afresh when called from a new run."""
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:
            for conn in self._idle:
                conn.close_now()
            self._idle.clear()
            self._slots = trio.Semaphore(self.max_connections)
            self._token = token

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            if conn.token is self._token:
                await trio.aclose_forcefully(conn.stream)
            else:
                conn.close_now()

    async def _connect(self) -> _Connection:
        tcp: trio.SocketStream | None = None
        try:
            with trio.fail_after(self.timeout):
                tcp = await trio.open_tcp_stream(self.nurl.host, self.nurl.port)
                stream = trio.SSLStream(tcp, self._ssl_context, server_hostname=self.nurl.host, https_compatible=True)
                await stream.do_handshake()
        except (trio.TooSlowError, *_CONNECTION_ERRORS, ValueError) as exc:
            if tcp is not None:
                await trio.aclose_forcefully(tcp)
            if isinstance(exc, trio.TooSlowError):
                raise ServerUnavailableError(f"{self.name}: timed out connecting") from None
            raise ServerUnavailableError(f"{self.name}: cannot connect: {exc}") from None
        # The pin is checked before any HTTP byte leaves: a wrong key learns nothing, not even the swissnum.
        certificate = stream.getpeercert(binary_form=True)
        try:
            presented = spki_hash(certificate) if certificate else ""
        except FormatError:
            presented = ""
        if not hmac.compare_digest(presented.encode("ascii"), self.nurl.spki_hash.encode("ascii")):
            await trio.aclose_forcefully(stream)
            raise ServerIdentityError(
                f"{self.name}: TLS key does not match the NURL (pinned {self.nurl.spki_hash}, got {presented or '-'})"
            )
        return _Connection(stream, trio.lowlevel.current_trio_token())

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.looks_alive():
                conn.reused = True
                return conn
            conn.close_now()
        return None

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | memoryview = b"",
        *,
        max_body: int,
    ) -> _Response:
        """Send one request and read its whole answer (at most `max_body` bytes of a 2xx body)."""
        self._enter_run()
        async with self._slots:
            for attempt in range(2):
                conn = self._take_idle() or await self._connect()
                try:
                    response, reusable = await self._exchange(conn, method, target, headers, body, max_body)
                except _StaleConnection:
                    await trio.aclose_forcefully(conn.stream)
                    if method == b"GET" and attempt == 0:
                        continue
                    raise ServerUnavailableError(f"{self.name}: connection closed before the server answered") from None
                except BaseException:
                    await trio.aclose_forcefully(conn.stream)
                    raise
                if reusable:
                    self._idle.append(conn)
                else:
                    await trio.aclose_forcefully(conn.stream)
                return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self,
        conn: _Connection,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | memoryview,
        max_body: int,
    ) -> tuple[_Response, bool]:
        """Send the request while reading the answer: a server may answer before the body is complete (401,
        409 or 413 on a large PATCH) and then close; read only after sending, that answer would be lost with
        the connection. Once the answer is in, an unfinished upload is abandoned (and the connection with it).
        """
        state = _ExchangeState(self.timeout)
        all_headers = [(b"host", self.host_header), *headers, (b"content-length", b"%d" % len(body))]
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._send_request, conn, state, h11.Request(method=method, target=target, headers=all_headers), body
            )
            try:
                with state.answer_scope:
                    response = await self._read_response(conn, state, max_body)
                if state.answer_scope.cancelled_caught:
                    raise trio.TooSlowError
            except Exception as exc:  # handled below, outside the nursery, so it does not come wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise self._connection_failure(conn, state, failure) from None
        # Bytes after the answer were never asked for: they must not pass for the next request's answer.
        reusable = conn.http.our_state is h11.DONE and conn.http.their_state is h11.DONE
        reusable = reusable and not response.truncated and not conn.http.trailing_data[0]
        if reusable:
            conn.http.start_next_cycle()
        return response, reusable

    async def _send_request(
        self, conn: _Connection, state: _ExchangeState, head: h11.Request, body: bytes | memoryview
    ) -> None:
        """Send head and body; a failure is only noted, since the answer (read meanwhile) may explain it."""
        view = memoryview(body).cast("B")
        # h11 takes any bytes-like object as Data (its documentation says so; its annotation says bytes): views
        # spare copying the share data.
        pieces: list[h11.Event] = [
            h11.Data(data=view[start : start + _SEND_PIECE])  # type: ignore[arg-type]
            for start in range(0, len(view), _SEND_PIECE)
        ]
        batches: list[list[h11.Event]] = [[head, *pieces[:1]], *([piece] for piece in pieces[1:]), [h11.EndOfMessage()]]
        try:
            for batch in batches:
                for data in coalesce(conn.http, batch):
                    with trio.fail_after(self.timeout):
                        await conn.stream.send_all(data)
        except (trio.TooSlowError, h11.LocalProtocolError, *_CONNECTION_ERRORS):
            pass
        finally:
            state.sending_done()

    async def _read_response(self, conn: _Connection, state: _ExchangeState, max_body: int) -> _Response:
        async def next_event() -> Any:
            while True:
                event = conn.http.next_event()
                if event is not h11.NEED_DATA:
                    return event
                # h11 appends what it receives to a bytearray: any bytes-like will do (its annotation says bytes)
                conn.http.receive_data(await state.receive(conn.stream))  # type: ignore[arg-type]

        event = await next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await next_event()
        if not isinstance(event, h11.Response):
            raise trio.BrokenResourceError("connection closed before an answer")
        status = event.status_code
        headers: dict[bytes, list[bytes]] = {}
        for name, value in event.headers:
            headers.setdefault(name, []).append(value)
        success = 200 <= status < 300
        limit = max_body if success else MAX_ERROR_BODY
        declared = int(headers.get(b"content-length", [b"0"])[0])
        if success and declared > limit:
            raise StorageServerError(f"{self.name}: answer of {declared} bytes, expected at most {limit}")
        parts: list[bytes] = []
        total = 0
        while not isinstance(event := await next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise trio.BrokenResourceError("connection closed in the middle of an answer")
            total += len(event.data)
            if total > limit:
                if success:
                    raise StorageServerError(f"{self.name}: answer longer than the {limit} bytes expected")
                return _Response(status, headers, b"".join(parts), truncated=True)  # error text is for logs only
            parts.append(event.data)
        return _Response(status, headers, b"".join(parts))

    def _connection_failure(self, conn: _Connection, state: _ExchangeState, exc: Exception) -> Exception:
        """The exception for an exchange that broke off: a reused connection that died before answering
        anything is stale (a GET may be retried); otherwise the server is unavailable or misbehaving."""
        stale = conn.reused and not state.received
        if isinstance(exc, (StorageServerError, _StaleConnection)):
            return exc
        if isinstance(exc, trio.TooSlowError):
            return ServerUnavailableError(f"{self.name}: timed out")
        if isinstance(exc, _CONNECTION_ERRORS):
            return _StaleConnection() if stale else ServerUnavailableError(f"{self.name}: connection lost: {exc}")
        if isinstance(exc, h11.RemoteProtocolError):
            return _StaleConnection() if stale else StorageServerError(f"{self.name}: malformed HTTP answer")
        return exc


class _ExchangeState:
    """What the sending and the reading half of one exchange share. The answer's timeout starts only once the
    request is sent: a large upload over a slow link may take longer than the timeout, and is itself guarded
    by a timeout on each piece sent. From then on, `timeout` seconds without a byte from the server end the
    wait.

    One cancel scope covers the whole answer and its deadline moves on as data comes: a scope per receive (one
    per TLS record, 16 KiB) cost more than the record's decryption. The deadline is moved only once it is
    `timeout / 8` stale, so the wait ends after `timeout` to `timeout * 9/8` seconds of silence.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sending = True
        self.received = False
        self.answer_scope = trio.CancelScope()

    def sending_done(self) -> None:
        self.sending = False
        self.answer_scope.deadline = trio.current_time() + self.timeout

    async def receive(self, stream: trio.SSLStream[trio.SocketStream]) -> bytes | bytearray:
        data = await stream.receive_some(_RECEIVE_SIZE)
        if not self.sending:
            now = trio.current_time()
            if self.answer_scope.deadline - now < self.timeout:
                self.answer_scope.deadline = now + self.timeout * 9 / 8
        self.received = self.received or bool(data)
        return data


def _check_storage_index(storage_index: bytes) -> str:
    if len(storage_index) != STORAGE_INDEX_LENGTH:
        raise ValueError(f"storage index must be {STORAGE_INDEX_LENGTH} bytes, got {len(storage_index)}")
    return base32.encode(storage_index)


def _check_shnum(shnum: int) -> int:
    if not isinstance(shnum, int) or shnum < 0:
        raise ValueError(f"bad share number {shnum!r}")
    return shnum


def _fit_reason(reason: str) -> str:
    """A corruption reason the server accepts: 1 to 32765 bytes of UTF-8, cut at a character boundary."""
    encoded = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return encoded.decode("utf-8", "ignore") or "(no reason given)"


class GbsStorageServer(StorageServer):
    """A Tahoe-LAFS (or blackmatch) storage server spoken to over GBS."""

    def __init__(
        self,
        nurl: str,
        *,
        server_id: str,
        nickname: str,
        tubid: bytes,
        permutation_seed: bytes,
        timeout: float = 30.0,
        max_connections: int = 8,
    ) -> None:
        parsed = parse_nurl(nurl)
        if parsed.scheme != "pb":
            raise FormatError(f"{nickname}: only pb:// NURLs are supported, not {parsed.scheme}://")
        if len(tubid) != 20:
            raise FormatError(f"{nickname}: TubID must be 20 bytes")
        if max_connections < 1 or timeout <= 0:
            raise ValueError("max_connections must be at least 1 and timeout positive")
        self.server_id = server_id
        self.nickname = nickname
        self.tubid = tubid
        self.permutation_seed = permutation_seed
        self.nurl = parsed
        self._authorization = authorization_value(parsed.swissnum.encode("ascii"))
        self._pool = _Pool(parsed, nickname, timeout, max_connections)

    @classmethod
    def from_announcement(cls, server_id: str, ann: Mapping[str, Any]) -> GbsStorageServer:
        """The server of a storage announcement (`ann` of servers.yaml or an introducer cache).

        As Tahoe's storage client does: the first `pb://` NURL of `anonymous-storage-NURLs`; the TubID from
        `anonymous-storage-FURL`; the permutation seed from `permutation-seed-base32`, else the key of a
        `v0-` server id, else SHA-256 of the server id.
        """
        nurls = ann.get("anonymous-storage-NURLs") or []
        if isinstance(nurls, str) or not all(isinstance(n, str) for n in nurls):
            raise FormatError(f"{server_id}: anonymous-storage-NURLs must be a list of NURLs")
        http_nurls = [n for n in nurls if n.startswith("pb://")]
        if not http_nurls:
            raise FormatError(f"{server_id}: no pb:// NURL in the announcement")
        furl = ann.get("anonymous-storage-FURL")
        if not isinstance(furl, str):
            raise FormatError(f"{server_id}: the announcement has no anonymous-storage-FURL (needed for the TubID)")
        seed_text = ann.get("permutation-seed-base32")
        if seed_text:
            if not isinstance(seed_text, str):
                raise FormatError(f"{server_id}: permutation-seed-base32 must be text")
            seed = base32.decode(seed_text)
        elif _V0_SERVER_ID.fullmatch(server_id) and base32.is_canonical(server_id[3:]):
            seed = base32.decode(server_id[3:])
        else:
            seed = hashlib.sha256(server_id.encode("utf-8")).digest()
        nickname = ann.get("nickname")
        return cls(
            http_nurls[0],
            server_id=server_id,
            nickname=nickname if isinstance(nickname, str) and nickname else server_id,
            tubid=parse_furl(furl).tubid,
            permutation_seed=seed,
        )

    def __repr__(self) -> str:
        return f"<GbsStorageServer {self.nickname} {self.nurl.base_url}>"

    async def aclose(self) -> None:
        await self._pool.aclose()

    # --- plumbing --------------------------------------------------------------------------------------------
    async def _request(
        self,
        method: bytes,
        path: str,
        *,
        secrets: Sequence[tuple[Secret, bytes]] = (),
        message: Any = None,
        body: bytes | memoryview = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        max_body: int = MAX_CBOR_RESPONSE,
    ) -> _Response:
        all_headers = [
            (b"authorization", self._authorization),
            (b"accept", CBOR_MIME_TYPE.encode("ascii")),
            *((b"x-tahoe-authorization", secret_header_value(kind, value)) for kind, value in secrets),
            *headers,
        ]
        if message is not None:
            body = encode_cbor(message)
            all_headers.append((b"content-type", CBOR_MIME_TYPE.encode("ascii")))
        target = (API_PREFIX + path).encode("ascii")
        return await self._pool.request(method, target, all_headers, body, max_body=max_body)

    def _refused(self, what: str, response: _Response) -> StorageServerError:
        """The exception for an answer that is not the success expected."""
        status = response.status
        detail = response.body[:200].decode("utf-8", "replace")
        detail = "".join(c if c.isprintable() else " " for c in detail).strip()
        message = f"{self.nickname}: {what}: HTTP {status}" + (f" ({detail})" if detail else "")
        if 200 <= status < 300:
            return StorageServerError(message + " is not an answer this request can get")
        if status == 404:
            return ShareNotFoundError(message, status)
        if status == 409:
            return WriteConflictError(message, status)
        return RequestRefusedError(message, status)

    def _cbor(self, what: str, response: _Response) -> Any:
        if media_type(response.header(b"content-type")) != CBOR_MIME_TYPE:
            raise StorageServerError(f"{self.nickname}: {what}: the answer is not CBOR")
        try:
            return decode_cbor(response.body)
        except WireError as exc:
            raise StorageServerError(f"{self.nickname}: {what}: malformed answer: {exc}") from None

    def _malformed(self, what: str, exc: WireError) -> StorageServerError:
        return StorageServerError(f"{self.nickname}: {what}: malformed answer: {exc}")

    @staticmethod
    def _lease_secrets(lease: LeaseSecrets) -> list[tuple[Secret, bytes]]:
        return [(Secret.LEASE_RENEW, lease.renew), (Secret.LEASE_CANCEL, lease.cancel)]

    # --- the StorageServer interface -------------------------------------------------------------------------
    async def get_version(self) -> ServerVersion:
        response = await self._request(b"GET", "/version")
        if response.status != 200:
            raise self._refused("version", response)
        answer = self._cbor("version", response)
        try:
            if not isinstance(answer, dict) or not isinstance(answer.get(VERSION_KEY), dict):
                raise WireError("no v1 protocol section")
            v1 = answer[VERSION_KEY]
            return ServerVersion(
                maximum_immutable_share_size=expect_uint(v1.get(b"maximum-immutable-share-size"), "maximum size"),
                maximum_mutable_share_size=expect_uint(v1.get(b"maximum-mutable-share-size"), "maximum size"),
                available_space=expect_uint(v1.get(b"available-space"), "available-space"),
                application_version=expect_bytes(answer.get(b"application-version"), "application-version"),
            )
        except WireError as exc:
            raise self._malformed("version", exc) from None

    async def allocate_buckets(
        self,
        storage_index: bytes,
        lease: LeaseSecrets,
        upload_secret: bytes,
        share_numbers: set[int],
        allocated_size: int,
    ) -> AllocationResult:
        si = _check_storage_index(storage_index)
        response = await self._request(
            b"POST",
            f"/immutable/{si}",
            secrets=[*self._lease_secrets(lease), (Secret.UPLOAD, upload_secret)],
            message=allocate_request({_check_shnum(n) for n in share_numbers}, allocated_size),
        )
        if response.status != 200:
            raise self._refused("allocate", response)
        try:
            answer = expect_map(self._cbor("allocate", response), frozenset({"already-have", "allocated"}), "answer")
            allocated = expect_share_set(answer["allocated"], "allocated")
            if not allocated <= set(share_numbers):
                raise WireError("allocated shares that were not asked for")
            return AllocationResult(expect_share_set(answer["already-have"], "already-have"), allocated)
        except WireError as exc:
            raise self._malformed("allocate", exc) from None

    async def write_share_chunk(
        self, storage_index: bytes, shnum: int, upload_secret: bytes, offset: int, data: bytes | memoryview
    ) -> bool:
        si = _check_storage_index(storage_index)
        length = memoryview(data).nbytes
        if offset < 0 or length == 0:
            raise ValueError("a share write needs a non-negative offset and at least one byte")
        response = await self._request(
            b"PATCH",
            f"/immutable/{si}/{_check_shnum(shnum)}",
            secrets=[(Secret.UPLOAD, upload_secret)],
            body=data,
            headers=[
                (b"content-range", format_content_range(offset, offset + length)),
                (b"content-type", OCTET_STREAM.encode("ascii")),
            ],
        )
        if response.status not in (200, 201):
            raise self._refused("write", response)
        try:
            answer = expect_map(self._cbor("write", response), frozenset({"required"}), "answer")
            for item in expect_list(answer["required"], "required"):
                item = expect_map(item, frozenset({"begin", "end"}), "required range")
                expect_uint(item["begin"], "begin")
                expect_uint(item["end"], "end")
        except WireError as exc:
            raise self._malformed("write", exc) from None
        return response.status == 201

    async def abort_upload(self, storage_index: bytes, shnum: int, upload_secret: bytes) -> None:
        si = _check_storage_index(storage_index)
        path = f"/immutable/{si}/{_check_shnum(shnum)}/abort"
        response = await self._request(b"PUT", path, secrets=[(Secret.UPLOAD, upload_secret)])
        if response.status != 200:
            raise self._refused("abort", response)

    async def _list(self, kind: str, storage_index: bytes) -> set[int]:
        response = await self._request(b"GET", f"/{kind}/{_check_storage_index(storage_index)}/shares")
        if response.status != 200:
            raise self._refused(f"list {kind} shares", response)
        try:
            return set(expect_share_set(self._cbor("list shares", response), "share list"))
        except WireError as exc:
            raise self._malformed(f"list {kind} shares", exc) from None

    async def _read(self, kind: str, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a share, by a Range request whose answer must be exactly a prefix
        of that range: 206 with a matching Content-Range and body, or 204 when the share ends before it."""
        si = _check_storage_index(storage_index)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return b""
        what = f"read {kind} share {shnum}"
        response = await self._request(
            b"GET",
            f"/{kind}/{si}/{_check_shnum(shnum)}",
            headers=[(b"range", format_range(offset, length))],
            max_body=length,
        )
        if response.status == 204:
            if response.body:
                raise StorageServerError(f"{self.nickname}: {what}: 204 with a body")
            return b""
        if response.status != 206:
            raise self._refused(what, response)
        if media_type(response.header(b"content-type")) != OCTET_STREAM:
            raise StorageServerError(f"{self.nickname}: {what}: share data is not {OCTET_STREAM}")
        content_range = response.header(b"content-range")
        span = parse_content_range(content_range) if content_range is not None else None
        if span is None or span[0] != offset or span[1] > offset + length:
            raise StorageServerError(f"{self.nickname}: {what}: Content-Range does not match the range asked for")
        if len(response.body) != span[1] - span[0]:
            raise StorageServerError(f"{self.nickname}: {what}: body length differs from its Content-Range")
        return response.body

    async def _advise_corrupt(self, kind: str, storage_index: bytes, shnum: int, reason: str) -> None:
        si = _check_storage_index(storage_index)
        path = f"/{kind}/{si}/{_check_shnum(shnum)}/corrupt"
        response = await self._request(b"POST", path, message={"reason": _fit_reason(reason)})
        if response.status != 200:
            raise self._refused(f"advise corrupt {kind} share", response)

    async def list_immutable_shares(self, storage_index: bytes) -> set[int]:
        return await self._list("immutable", storage_index)

    async def read_immutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        return await self._read("immutable", storage_index, shnum, offset, length)

    async def advise_corrupt_immutable(self, storage_index: bytes, shnum: int, reason: str) -> None:
        await self._advise_corrupt("immutable", storage_index, shnum, reason)

    async def add_or_renew_lease(self, storage_index: bytes, lease: LeaseSecrets) -> None:
        si = _check_storage_index(storage_index)
        response = await self._request(b"PUT", f"/lease/{si}", secrets=self._lease_secrets(lease))
        if response.status != 204:
            raise self._refused("lease", response)

    async def read_test_write(
        self,
        storage_index: bytes,
        write_enabler: bytes,
        lease: LeaseSecrets,
        vectors: dict[int, TestAndWrite],
        read_vector: Sequence[tuple[int, int]],
    ) -> ReadTestWriteResult:
        si = _check_storage_index(storage_index)
        response = await self._request(
            b"POST",
            f"/mutable/{si}/read-test-write",
            secrets=[(Secret.WRITE_ENABLER, write_enabler), *self._lease_secrets(lease)],
            message=read_test_write_request({_check_shnum(n): v for n, v in vectors.items()}, read_vector),
        )
        if response.status != 200:
            raise self._refused("read-test-write", response)
        try:
            answer = expect_map(self._cbor("read-test-write", response), frozenset({"success", "data"}), "answer")
            if type(answer["success"]) is not bool:
                raise WireError("success must be a boolean")
            if not isinstance(answer["data"], dict):
                raise WireError("data must be a map")
            data = {}
            for shnum, reads in answer["data"].items():
                reads = expect_list(reads, "reads")
                if len(reads) != len(read_vector):
                    raise WireError("a share's reads do not match the read vector")
                data[expect_uint(shnum, "share number")] = [expect_bytes(r, "read data") for r in reads]
            return ReadTestWriteResult(answer["success"], data)
        except WireError as exc:
            raise self._malformed("read-test-write", exc) from None

    async def list_mutable_shares(self, storage_index: bytes) -> set[int]:
        return await self._list("mutable", storage_index)

    async def read_mutable_share(self, storage_index: bytes, shnum: int, offset: int, length: int) -> bytes:
        return await self._read("mutable", storage_index, shnum, offset, length)

    async def advise_corrupt_mutable(self, storage_index: bytes, shnum: int, reason: str) -> None:
        await self._advise_corrupt("mutable", storage_index, shnum, reason)
