"""The Great Black Swamp storage server: Tahoe-LAFS 1.20's HTTPS storage protocol over a ShareStore.

One trio task per TLS connection, HTTP/1.1 parsed by h11, keep-alive between requests. Status codes, header
rules and their precedence follow Tahoe's `storage/http_server.py` (route → 404/405, Authorization → 401,
X-Tahoe-Authorization → 400, then the endpoint's own checks), so a Tahoe client cannot tell the difference.
Where Tahoe answers 500 because an exception escapes (a write beyond the allocated size, a PATCH body shorter
than its Content-Range), this server answers a 4xx instead; see the comments at those places.

Memory is bounded per connection: request heads are capped by h11, CBOR bodies by the endpoint's limit, share
data streams through in `io_chunk` pieces both ways, and large read-test-write requests take turns. Nothing a
client sends can crash the server or disturb other connections: every problem ends that request or that
connection with one log line, which never contains a secret or the swissnum.

The ShareStore is synchronous and not thread-safe: every call goes through `_StoreRunner`, which holds one lock
per store; calls that move at least `THREADED_BYTES` of share data run in a worker thread
(`ServerLimits.threaded_store`, the default), so TLS and HTTP work on other connections goes on meanwhile.
Measured on loopback: 1 MiB reads and writes are as fast this way as on the trio thread, while for small ones
(a 4 KiB file's shares, allocations, leases, directory updates) the thread hop cost more than the call and its
fsync together (300 small files through 5 servers: 13% less server CPU, 9% less time with them inline).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import logging
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import h11
import trio

from .. import base32
from . import share_store as store_errors
from .gbs_wire import (
    ALLOCATE_BODY_LIMIT,
    API_PREFIX,
    CBOR_MIME_TYPE,
    CORRUPT_BODY_LIMIT,
    DEFAULT_BODY_LIMIT,
    OCTET_STREAM,
    VERSION_KEY,
    Secret,
    WireError,
    accept_prefers_cbor,
    authorization_value,
    coalesce,
    decode_cbor,
    encode_cbor,
    format_content_range,
    media_type,
    parse_allocate_request,
    parse_content_range,
    parse_corrupt_request,
    parse_range,
    parse_read_test_write_request,
    parse_secrets,
    server_ssl_context,
)
from .share_store import ShareStore

log = logging.getLogger("blackmatch.gbs_server")

T = TypeVar("T")
APPLICATION_VERSION = b"blackmatch/0.1.0 (Tahoe-LAFS GBS storage server)"
_RECEIVE_SIZE = 256 * 1024
_DRAIN_LIMIT = 64 * 1024  # an unread request body up to this size is read and dropped to keep the connection
_LINGER_SECONDS = 1.0  # after refusing a large body, keep reading a little so the client can see the answer
_LINGER_BYTES = 8 * 1024 * 1024
THREADED_BYTES = 64 * 1024  # store calls moving at least this much share data run in a worker thread

# How ShareStore refusals become HTTP statuses (Tahoe's codes). Tahoe has no code for a write beyond the
# allocated size (its DataTooLargeError escapes as a 500): 416 says the Content-Range does not fit the share.
_STORE_STATUS: dict[type[store_errors.StoreError], int] = {
    store_errors.UnknownUploadError: 404,
    store_errors.NoSuchShareError: 404,
    store_errors.WrongSecretError: 401,
    store_errors.BadWriteEnablerError: 401,
    store_errors.ConflictingWriteError: 409,
    store_errors.AlreadyCompleteError: 405,
    store_errors.OutOfBoundsError: 416,
    store_errors.TooLargeError: 413,
}


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits; the defaults suit a public server, tests shrink the timeouts."""

    max_connections: int = 512
    handshake_timeout: float = 10.0
    request_timeout: float = 60.0  # idle keep-alive plus receiving a whole request head (slowloris)
    body_timeout: float = 60.0  # longest silence while a request body arrives
    send_timeout: float = 60.0  # longest a response may stall on a client that does not read
    max_header_bytes: int = 16 * 1024
    max_read_test_write_body: int = 256 * 1024 * 1024  # Tahoe allows 2^48; the store holds a share in memory
    max_mutable_share_size: int = 256 * 1024 * 1024  # advertised in the version; larger writes get 413
    max_read_vector_bytes: int = 32 * 1024 * 1024  # a read-test-write answer may not be larger than this
    io_chunk: int = 1024 * 1024  # share data moves between socket and store in pieces of this size
    threaded_store: bool = True  # bulk store calls in a worker thread (one at a time), not on the trio thread


@dataclass
class ServerStats:
    """Counters tests and operators can look at."""

    connections: int = 0
    requests: int = 0
    problems: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class HttpError(Exception):
    """Ends a request with `status`; `reason` goes to the log and the body, so it must never hold a secret."""

    def __init__(self, status: int, reason: str = "", *, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class _ConnectionDone(Exception):
    """The connection cannot go on (peer gone, timed out, protocol broken); close it."""


class _StoreRunner:
    """Runs ShareStore calls one at a time: the store is not thread-safe, and one lock per store serializes
    the callers, whether the call then runs in a worker thread or on the trio thread.

    Only calls that move `THREADED_BYTES` or more go to a thread when `threaded`; a thread hop costs more than
    a stat, a listing or a small write with its fsync."""

    def __init__(self, store: ShareStore, threaded: bool) -> None:
        self.store = store
        self._threaded = threaded
        self._lock = trio.Lock()

    async def __call__(self, fn: Callable[[ShareStore], T], *, moves: int = 0) -> T:
        async with self._lock:
            try:
                if moves >= THREADED_BYTES and self._threaded:
                    return await trio.to_thread.run_sync(fn, self.store)
                return fn(self.store)
            except store_errors.StoreError as exc:
                raise HttpError(_STORE_STATUS.get(type(exc), 400), str(exc)) from None


class _RangeRead(Protocol):
    """read(store, offset=..., size=...): bytes of a share, short at its end."""

    def __call__(self, store: ShareStore, offset: int, size: int) -> bytes: ...


# --- one connection and one request on it ----------------------------------------------------------------------
class _Connection:
    def __init__(self, stream: trio.SSLStream[trio.SocketStream], peer: str, limits: ServerLimits) -> None:
        self.stream = stream
        self.peer = peer
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def next_event(self, timeout: float | None) -> Any:
        """The next h11 event, waiting at most `timeout` for all of it (None: the caller's scope times it)."""
        try:
            with trio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
                while True:
                    event = self.h11.next_event()
                    if event is not h11.NEED_DATA:
                        return event
                    # h11 appends what it receives to a bytearray: any bytes-like will do (its annotation says bytes)
                    self.h11.receive_data(await self.stream.receive_some(_RECEIVE_SIZE))  # type: ignore[arg-type]
        except trio.TooSlowError:
            raise _ConnectionDone("timed out waiting for the client") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ConnectionDone("connection lost") from None

    async def send(self, *events: Any) -> None:
        """Send h11 events; small pieces go out together (one TLS record), large data without a copy."""
        try:
            for piece in coalesce(self.h11, events):
                with trio.fail_after(self.limits.send_timeout):
                    await self.stream.send_all(piece)
        except trio.TooSlowError:
            raise _ConnectionDone("timed out sending to the client") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ConnectionDone("connection lost while sending") from None

    async def linger(self) -> None:
        """Read and drop what the client still sends for a moment, so that closing does not reset the
        connection before the client has read our answer."""
        received = 0
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                while received < _LINGER_BYTES:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        break
                    received += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


class _Exchange:
    """One request and its response."""

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self.conn = conn
        self.method = request.method.decode("ascii", "replace")
        self.target = request.target
        self.headers: dict[bytes, list[bytes]] = {}
        self.head_size = len(request.target)
        for name, value in request.headers:
            self.headers.setdefault(name, []).append(value)
            self.head_size += len(name) + len(value) + 4
        length = self.header(b"content-length")
        self.content_length = int(length) if length is not None and b"transfer-encoding" not in self.headers else None
        self.body_done = False
        self.responded = False
        self.status = 0
        # For log lines: the path as sent (h11 has ruled out spaces and control characters), without the query.
        self.path = request.target.split(b"?", 1)[0][:200].decode("ascii", "backslashreplace")

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None

    # --- request body --------------------------------------------------------------------------------------
    async def _body_event(self, timed: bool = True) -> bytes | None:
        """The next piece of the body, or None at its end; `timed=False` leaves the timeout to the caller."""
        if self.body_done:
            return None
        if self.conn.h11.they_are_waiting_for_100_continue:
            await self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        event = await self.conn.next_event(self.conn.limits.body_timeout if timed else None)
        if isinstance(event, h11.Data):
            return event.data
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return None
        raise _ConnectionDone("connection closed in the middle of a request body")

    async def read_body(self, limit: int) -> bytes:
        """The whole body, refused with 413 beyond `limit` bytes."""
        if self.content_length is not None and self.content_length > limit:
            raise HttpError(413, f"body of {self.content_length} bytes exceeds {limit}")
        parts, total = [], 0
        while (data := await self._body_event()) is not None:
            total += len(data)
            if total > limit:
                raise HttpError(413, f"body exceeds {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    async def read_chunk(self, size: int) -> bytes:
        """At least `size` bytes of the body (fewer only at its end; b"" once it is over).

        Share data comes one TLS record (16 KiB) per event, and a timeout scope per event cost about as much as
        the rest of its handling: one scope covers the chunk instead, its deadline moved on as data comes once
        it is an eighth of `body_timeout` stale, so the read ends after body_timeout to 9/8 of it of silence.
        """
        timeout = self.conn.limits.body_timeout
        parts, total = [], 0
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            while total < size and (data := await self._body_event(timed=False)) is not None:
                parts.append(data)
                total += len(data)
                now = trio.current_time()
                if scope.deadline - now < timeout:
                    scope.deadline = now + timeout * 9 / 8
        if scope.cancelled_caught:
            raise _ConnectionDone("timed out waiting for the client")
        return b"".join(parts)

    async def read_cbor(self, limit: int) -> Any:
        """The body as a CBOR message: 415 for another Content-Type, 413 above `limit`, 400 if malformed."""
        kind = media_type(self.header(b"content-type"))
        if kind is not None and kind != CBOR_MIME_TYPE:
            raise HttpError(415, f"request body must be {CBOR_MIME_TYPE}")
        body = await self.read_body(limit)
        try:
            return decode_cbor(body)
        except WireError as exc:
            raise HttpError(400, str(exc)) from None

    # --- response ------------------------------------------------------------------------------------------
    def _keeps_connection(self) -> bool:
        """Whether the unread rest of the body is small enough to read and drop after answering."""
        if self.body_done:
            return True
        return self.content_length is not None and self.content_length <= _DRAIN_LIMIT

    async def start_response(
        self, status: int, length: int, content_type: bytes | None = None, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        await self.conn.send(self._head(status, length, content_type, headers))

    def _head(
        self, status: int, length: int, content_type: bytes | None, headers: Sequence[tuple[bytes, bytes]]
    ) -> h11.Response:
        all_headers = list(headers)
        if status not in (204, 304):
            all_headers.append((b"content-length", b"%d" % length))
        if content_type is not None:
            all_headers.append((b"content-type", content_type))
        if not self._keeps_connection():
            all_headers.append((b"connection", b"close"))
        self.responded = True
        self.status = status
        return h11.Response(status_code=status, headers=all_headers)

    async def send_body(self, data: bytes) -> None:
        if data and self.method != "HEAD":
            await self.conn.send(h11.Data(data=data))

    async def end_response(self) -> None:
        await self.conn.send(h11.EndOfMessage())

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        head = self._head(status, len(body), content_type, headers)
        data = [h11.Data(data=body)] if body and self.method != "HEAD" else []
        await self.conn.send(head, *data, h11.EndOfMessage())

    async def respond_cbor(self, status: int, message: Any) -> None:
        await self.respond(status, encode_cbor(message), CBOR_MIME_TYPE.encode("ascii"))

    async def finish(self) -> bool:
        """After the response: read and drop a small unread body; True if the connection can serve again."""
        if not self._keeps_connection():
            await self.conn.linger()
            return False
        try:
            while await self._body_event() is not None:
                pass
        except h11.RemoteProtocolError:
            return False  # a malformed rest of a body we did not need: just close
        return self.conn.h11.our_state is h11.DONE and self.conn.h11.their_state is h11.DONE


# --- routing ---------------------------------------------------------------------------------------------------
_SI = "<si>"
_SHNUM = "<shnum>"
_SI_RE = re.compile(r"[a-z2-7]{26}")
_SHNUM_RE = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class _Route:
    pattern: tuple[str, ...]
    method: str
    secrets: frozenset[Secret]
    handler: str  # name of the GbsServer method


_LEASE = frozenset({Secret.LEASE_RENEW, Secret.LEASE_CANCEL})
_ROUTES = (
    _Route(("version",), "GET", frozenset(), "_version"),
    _Route(("immutable", _SI), "POST", _LEASE | {Secret.UPLOAD}, "_allocate"),
    _Route(("immutable", _SI, _SHNUM), "PATCH", frozenset({Secret.UPLOAD}), "_write"),
    _Route(("immutable", _SI, _SHNUM, "abort"), "PUT", frozenset({Secret.UPLOAD}), "_abort"),
    _Route(("immutable", _SI, "shares"), "GET", frozenset(), "_list_immutable"),
    _Route(("immutable", _SI, _SHNUM), "GET", frozenset(), "_read_immutable"),
    _Route(("immutable", _SI, _SHNUM, "corrupt"), "POST", frozenset(), "_corrupt_immutable"),
    _Route(("lease", _SI), "PUT", _LEASE, "_lease"),
    _Route(("mutable", _SI, "read-test-write"), "POST", _LEASE | {Secret.WRITE_ENABLER}, "_read_test_write"),
    _Route(("mutable", _SI, "shares"), "GET", frozenset(), "_list_mutable"),
    _Route(("mutable", _SI, _SHNUM), "GET", frozenset(), "_read_mutable"),
    _Route(("mutable", _SI, _SHNUM, "corrupt"), "POST", frozenset(), "_corrupt_mutable"),
)


def _match_segment(kind: str, segment: str) -> Any:
    """The value a path segment stands for, or None if it does not fit (the route then does not match)."""
    if kind == _SI:
        # Tahoe's converter: 26 base32 characters that decode canonically.
        return base32.decode(segment) if _SI_RE.fullmatch(segment) and base32.is_canonical(segment) else None
    if kind == _SHNUM:
        return int(segment) if _SHNUM_RE.fullmatch(segment) else None
    return kind if segment == kind else None


def route(method: str, target: bytes) -> tuple[_Route, list[Any]]:
    """The route and its path arguments for a request; 404 if no route has this path, 405
    if routes have it but not for this method. Like werkzeug, the query is ignored, %-escapes are decoded
    and HEAD goes where GET does."""
    raw_path = target.split(b"?", 1)[0]
    try:
        path = urllib.parse.unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(404, "no such resource") from None
    if not path.startswith(API_PREFIX + "/"):
        raise HttpError(404, "no such resource")
    segments = path[len(API_PREFIX) + 1 :].split("/")
    allowed: list[str] = []
    for candidate in _ROUTES:
        if len(candidate.pattern) != len(segments):
            continue
        values = [_match_segment(kind, segment) for kind, segment in zip(candidate.pattern, segments, strict=True)]
        if any(value is None for value in values):
            continue
        if candidate.method == method or (method == "HEAD" and candidate.method == "GET"):
            arguments = [v for kind, v in zip(candidate.pattern, values, strict=True) if kind in (_SI, _SHNUM)]
            return candidate, arguments
        allowed.append(candidate.method)
    if allowed:
        methods = sorted({*allowed, *(["HEAD"] if "GET" in allowed else [])})
        raise HttpError(405, "method not allowed", headers=[(b"allow", ", ".join(methods).encode("ascii"))])
    raise HttpError(404, "no such resource")


# --- the server ------------------------------------------------------------------------------------------------
class GbsServer:
    """Serves one ShareStore over GBS to any number of connections."""

    def __init__(self, store: ShareStore, swissnum: bytes, *, limits: ServerLimits | None = None) -> None:
        self.limits = limits or ServerLimits()
        self.stats = ServerStats()
        self._store = _StoreRunner(store, self.limits.threaded_store)
        self._authorization = authorization_value(swissnum)
        self._large_requests = trio.Semaphore(1)  # big read-test-write bodies are held in memory: one at a time

    async def call_store(self, fn: Callable[[ShareStore], T]) -> T:
        """Run `fn` on the store in its turn with the requests' store calls (the store is not thread-safe), on
        the trio thread: for brief work of the server's own, such as the lease checker's look at one bucket."""
        return await self._store(fn)

    async def serve(
        self,
        cert_pem: bytes,
        key_pem: bytes,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 picks a free port) and serve until cancelled; reports the bound port."""
        ssl_context = server_ssl_context(cert_pem, key_pem)
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0:  # each address family would get its own random port: keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound = listeners[0].socket.getsockname()[1]
        slots = trio.Semaphore(self.limits.max_connections)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, ssl_context, slots, nursery)
            task_status.started(bound)

    async def _accept_loop(
        self, listener: trio.SocketListener, ssl_context: Any, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        """Accept connections while fewer than max_connections are open; the rest wait in the kernel backlog."""
        async with listener:
            while True:
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    slots.release()
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("cannot accept connections: %s; pausing", exc.strerror)
                        await trio.sleep(0.1)
                        continue
                    raise
                nursery.start_soon(self._connection, stream, ssl_context, slots)

    async def _connection(self, tcp: trio.SocketStream, ssl_context: Any, slots: trio.Semaphore) -> None:
        self.stats.connections += 1
        try:
            host, port = tcp.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        stream = trio.SSLStream(tcp, ssl_context, server_side=True, https_compatible=True)
        try:
            try:
                with trio.fail_after(self.limits.handshake_timeout):
                    await stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                what = "timed out" if isinstance(exc, trio.TooSlowError) else "failed (not TLS, or no common cipher)"
                self._problem(peer, f"TLS handshake {what}")
                return
            conn = _Connection(stream, peer, self.limits)
            try:
                while await self._serve_one(conn):
                    conn.h11.start_next_cycle()
            except _ConnectionDone as exc:
                self._problem(peer, str(exc))
        except Exception as exc:  # one connection's failure must not stop the others
            # h11's messages may quote request bytes (and so secrets): only its own errors' types are logged.
            detail = "" if isinstance(exc, h11.ProtocolError) else f": {exc}"
            log.error("%s: connection failed: %s%s", peer, type(exc).__name__, detail)
        finally:
            slots.release()
            await trio.aclose_forcefully(stream)

    def _problem(self, peer: str, message: str) -> None:
        self.stats.problems += 1
        log.info("%s: %s", peer, message)

    async def _serve_one(self, conn: _Connection) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            event = await conn.next_event(self.limits.request_timeout)
        except _ConnectionDone:
            # Silence between requests is an ordinary end; a half-received request head is a problem.
            if conn.h11.their_state is h11.IDLE and not conn.h11.trailing_data[0]:
                return False
            raise
        except h11.RemoteProtocolError as exc:
            # Never log the message: h11 quotes the offending header line, which may hold a secret.
            self._problem(conn.peer, f"malformed HTTP request (answered {exc.error_status_hint})")
            await self._answer_protocol_error(conn, exc.error_status_hint)
            return False
        if isinstance(event, h11.ConnectionClosed):
            return False
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 yields a Request first on a server
            raise _ConnectionDone("unexpected HTTP event")
        self.stats.requests += 1
        exchange = _Exchange(conn, event)
        try:
            await self._dispatch(exchange)
        except HttpError as exc:
            if exchange.responded:
                raise _ConnectionDone(f"{exchange.method} {exchange.path}: {exc.reason}") from None
            # A missing share is an everyday answer (clients probe servers); other refusals are problems.
            level = logging.DEBUG if exc.status == 404 else logging.INFO
            log.log(level, "%s: %s %s -> %d %s", conn.peer, exchange.method, exchange.path, exc.status, exc.reason)
            await exchange.respond(exc.status, exc.reason.encode("utf-8"), b"text/plain; charset=utf-8", exc.headers)
        except h11.RemoteProtocolError as exc:
            self._problem(conn.peer, f"{exchange.method} {exchange.path}: malformed request body")
            if not exchange.responded:
                await self._answer_protocol_error(conn, exc.error_status_hint)
            return False
        except _ConnectionDone:
            raise
        except Exception as exc:  # a bug or a disk error must not take the server down
            log.error(
                "%s: %s %s: internal error %s: %s", conn.peer, exchange.method, exchange.path, type(exc).__name__, exc
            )
            log.debug("the internal error's traceback", exc_info=True)
            if exchange.responded:
                raise _ConnectionDone("internal error during a response") from None
            await exchange.respond(500, b"internal server error", b"text/plain; charset=utf-8")
        self.stats.statuses[exchange.status] = self.stats.statuses.get(exchange.status, 0) + 1
        log.debug("%s: %s %s -> %d", conn.peer, exchange.method, exchange.path, exchange.status)
        return await exchange.finish()

    async def _answer_protocol_error(self, conn: _Connection, status: int) -> None:
        try:
            body = b"malformed request"
            headers = [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
            await conn.send(h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage())
        except (h11.LocalProtocolError, _ConnectionDone):
            return
        await conn.linger()

    async def _dispatch(self, ex: _Exchange) -> None:
        # h11 bounds only heads that arrive in pieces; one that came whole is measured here.
        if ex.head_size > self.limits.max_header_bytes:
            raise HttpError(431, "request head too large")
        found, arguments = route(ex.method, ex.target)
        authorization = ex.header(b"authorization")
        if authorization is None or not hmac.compare_digest(authorization, self._authorization):
            raise HttpError(401, "missing or wrong Authorization")
        try:
            secrets = parse_secrets(ex.headers.get(b"x-tahoe-authorization", []), found.secrets)
        except WireError as exc:
            raise HttpError(400, str(exc)) from None
        await getattr(self, found.handler)(ex, secrets, *arguments)

    @staticmethod
    def _require_cbor_answer(ex: _Exchange) -> None:
        """406 unless the client accepts CBOR. Tahoe checks this only when it sends the answer, after the
        operation took effect; checking before the operation gives the same status without the side effect."""
        if not accept_prefers_cbor(ex.header(b"accept")):
            raise HttpError(406, f"responses are {CBOR_MIME_TYPE}")

    async def _drop_body(self, ex: _Exchange) -> None:
        """Endpoints without a body ignore one, as Tahoe does, within the default body limit."""
        await ex.read_body(DEFAULT_BODY_LIMIT)

    # --- endpoints -----------------------------------------------------------------------------------------
    async def _version(self, ex: _Exchange, secrets: dict[Secret, bytes]) -> None:
        await self._drop_body(ex)
        self._require_cbor_answer(ex)
        space = await self._store(lambda store: store.available_space())
        await ex.respond_cbor(
            200,
            {
                VERSION_KEY: {
                    b"maximum-immutable-share-size": space,
                    b"maximum-mutable-share-size": self.limits.max_mutable_share_size,
                    b"available-space": space,
                },
                b"application-version": APPLICATION_VERSION,
            },
        )

    async def _allocate(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        try:
            shnums, size = parse_allocate_request(await ex.read_cbor(ALLOCATE_BODY_LIMIT))
        except WireError as exc:
            raise HttpError(400, str(exc)) from None
        self._require_cbor_answer(ex)

        def allocate(store: ShareStore) -> store_errors.Allocation:
            # A mutable share of the same number must not be replaced by an immutable upload: such numbers
            # are neither already had nor allocated (Tahoe would try to read the mutable share as immutable).
            wanted = set(shnums) - store.mutable_shares(si)
            return store.allocate(
                si, secrets[Secret.LEASE_RENEW], secrets[Secret.LEASE_CANCEL], secrets[Secret.UPLOAD], wanted, size
            )

        result = await self._store(allocate)
        await ex.respond_cbor(200, {"already-have": set(result.already_have), "allocated": set(result.allocated)})

    async def _write(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        content_range = ex.header(b"content-range")
        span = parse_content_range(content_range) if content_range is not None else None
        if span is None:
            raise HttpError(416, "a bytes Content-Range is required")
        start, end = span
        secret = secrets[Secret.UPLOAD]
        # Before any body is read: the upload exists (404), the secret is right (401), the range fits (416).
        await self._store(lambda store: store.check_write(si, shnum, secret, start, end))
        if ex.content_length is not None and ex.content_length != end - start:
            # Tahoe reads exactly the range: a shorter body trips an assertion (500), a longer one is cut.
            raise HttpError(400, "body length differs from the Content-Range")
        self._require_cbor_answer(ex)
        offset, missing = start, None
        while offset < end:
            chunk = await ex.read_chunk(min(self.limits.io_chunk, end - offset))
            if not chunk:
                raise HttpError(400, "body shorter than the Content-Range")
            if offset + len(chunk) > end:
                raise HttpError(400, "body longer than the Content-Range")
            missing = await self._store(
                functools.partial(_write_chunk, si, shnum, secret, offset, chunk), moves=len(chunk)
            )
            offset += len(chunk)
        if await ex.read_chunk(1):
            raise HttpError(400, "body longer than the Content-Range")
        required = [{"begin": a, "end": b} for a, b in missing or ()]
        await ex.respond_cbor(200 if required else 201, {"required": required})

    async def _abort(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        await self._drop_body(ex)
        await self._store(lambda store: store.abort(si, shnum, secrets[Secret.UPLOAD]))
        await ex.respond(200)

    async def _list_immutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        await self._drop_body(ex)
        self._require_cbor_answer(ex)
        await ex.respond_cbor(200, await self._store(lambda store: store.immutable_shares(si)))

    async def _list_mutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        await self._drop_body(ex)
        self._require_cbor_answer(ex)
        await ex.respond_cbor(200, await self._store(lambda store: store.mutable_shares(si)))

    async def _read_immutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        await self._drop_body(ex)
        length = await self._store(lambda store: store.immutable_data_length(si, shnum))
        await self._send_range(ex, length, lambda store, offset, size: store.read_immutable(si, shnum, offset, size))

    async def _read_mutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        await self._drop_body(ex)
        length = await self._store(lambda store: store.mutable_data_length(si, shnum))
        await self._send_range(ex, length, lambda store, offset, size: store.read_mutable(si, shnum, offset, size))

    async def _send_range(self, ex: _Exchange, share_length: int, read: _RangeRead) -> None:
        """Tahoe's `read_range`: no Range → 200 and the whole share; one closed bytes range → 206 with
        `Content-Range: bytes S-E/*`, cut at the share's end; a range starting at or past the end → 204; any
        other Range → 416. The data streams in `io_chunk` pieces."""
        octets = OCTET_STREAM.encode("ascii")
        range_header = ex.header(b"range")
        if range_header is None:
            start, end, status, headers = 0, share_length, 200, []
        else:
            span = parse_range(range_header)
            if span is None:
                raise HttpError(416, "Range must be one closed bytes range")
            start, end = span[0], min(span[1], share_length)
            if start >= end:
                await ex.respond(204, content_type=octets)
                return
            status, headers = 206, [(b"content-range", format_content_range(start, end))]
        await ex.start_response(status, end - start, octets, headers)
        if ex.method != "HEAD":
            for offset in range(start, end, self.limits.io_chunk):
                size = min(self.limits.io_chunk, end - offset)
                data = await self._store(functools.partial(read, offset=offset, size=size), moves=size)
                if len(data) != size:  # a mutable share shrank while we were sending it
                    raise HttpError(500, "share changed during the read")
                await ex.send_body(data)
        await ex.end_response()

    async def _corrupt(self, ex: _Exchange, si: bytes, shnum: int, mutable: bool) -> None:
        shares = await self._store(lambda store: store.mutable_shares(si) if mutable else store.immutable_shares(si))
        if shnum not in shares:
            raise HttpError(404, "no such share")
        try:
            reason = parse_corrupt_request(await ex.read_cbor(CORRUPT_BODY_LIMIT))
        except WireError as exc:
            raise HttpError(400, str(exc)) from None
        await self._store(lambda store: store.advise_corrupt(si, shnum, reason, mutable=mutable))
        log.info(
            "%s: corruption advisory for %s share %s/%d",
            ex.conn.peer,
            "mutable" if mutable else "immutable",
            base32.encode(si),
            shnum,
        )
        await ex.respond(200)

    async def _corrupt_immutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        await self._corrupt(ex, si, shnum, mutable=False)

    async def _corrupt_mutable(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes, shnum: int) -> None:
        await self._corrupt(ex, si, shnum, mutable=True)

    async def _lease(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        await self._drop_body(ex)
        renew, cancel = secrets[Secret.LEASE_RENEW], secrets[Secret.LEASE_CANCEL]
        if not await self._store(lambda store: store.add_or_renew_lease(si, renew, cancel)):
            raise HttpError(404, "no shares to lease")
        await ex.respond(204)

    async def _read_test_write(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        large = ex.content_length is None or ex.content_length > DEFAULT_BODY_LIMIT
        if large:
            await self._large_requests.acquire()
        try:
            await self._read_test_write_locked(ex, secrets, si)
        finally:
            if large:
                self._large_requests.release()

    async def _read_test_write_locked(self, ex: _Exchange, secrets: dict[Secret, bytes], si: bytes) -> None:
        try:
            vectors, reads = parse_read_test_write_request(await ex.read_cbor(self.limits.max_read_test_write_body))
        except WireError as exc:
            raise HttpError(400, str(exc)) from None
        largest = max((w.offset + len(w.data) for v in vectors.values() for w in v.writes), default=0)
        if largest > self.limits.max_mutable_share_size:
            raise HttpError(413, f"mutable shares are limited to {self.limits.max_mutable_share_size} bytes")
        self._require_cbor_answer(ex)
        limit = self.limits.max_read_vector_bytes

        def read_test_write(store: ShareStore) -> store_errors.ReadTestWriteOutcome:
            answer = 0
            for shnum in store.mutable_shares(si):
                length = store.mutable_data_length(si, shnum)
                answer += sum(max(0, min(size, length - offset)) for offset, size in reads)
            if answer > limit:
                raise store_errors.TooLargeError(f"the read vectors would return more than {limit} bytes")
            return store.read_test_write(
                si,
                secrets[Secret.WRITE_ENABLER],
                secrets[Secret.LEASE_RENEW],
                secrets[Secret.LEASE_CANCEL],
                vectors,
                reads,
            )

        outcome = await self._store(read_test_write, moves=ex.content_length or 0)
        await ex.respond_cbor(200, {"success": outcome.success, "data": outcome.data})


def _write_chunk(
    si: bytes, shnum: int, secret: bytes, offset: int, chunk: bytes, store: ShareStore
) -> list[tuple[int, int]]:
    return store.write(si, shnum, secret, offset, chunk)


async def serve_gbs(
    store: ShareStore,
    cert_pem: bytes,
    key_pem: bytes,
    swissnum: bytes,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `store` over GBS on host:port until cancelled; `task_status.started(port)` gives the bound port."""
    await GbsServer(store, swissnum).serve(cert_pem, key_pem, host, port, task_status=task_status)
