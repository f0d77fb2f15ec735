"""The methods the RPC socket carries, and how each one's parameters and result travel (sans-IO, shared by the
server and fuse_client's RPC client).

Parameters travel as the JSON object `params`, by name, except one bytes parameter per method at most (a write's
data, an xattr value), which is the frame's binary attachment. A bytes result (a read's data, an xattr value) is
the reply's attachment, with `"result": null`. Dataclasses (Attributes, DirectoryEntry, FsStats) travel as JSON
objects of their fields; `create` answers `[fh, attributes]`.

The server checks every parameter strictly before calling anything: a wrong type, a missing or unknown name, or
a number out of range is a BadParams error, which the server answers with EINVAL and goes on.

Besides the filesystem operations (grid_server/operations.py), two methods belong to the connection itself:

    attach(root_cap, settings) -> settings in effect   makes the connection a mount of that root: the server stays
                                                        while any attached connection lives (the keepalive)
    status() -> {...}                                   what the server holds: mounts, roots, queued changes,
                                                        each root's lease renewal
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .operations import AttrChanges, Attributes, Caller, DirectoryEntry, FsStats

MAX_IO = 16 * 1024 * 1024  # the largest read the server answers in one reply (FUSE asks for at most 1 MiB)
_INT_LIMIT = 1 << 63


class BadParams(Exception):
    """A request's parameters are not what its method takes."""


Decoder = Callable[[Any], Any]


def _int(value: Any) -> int:
    if type(value) is not int or not 0 <= value < _INT_LIMIT:
        raise BadParams("expected an integer from 0 to 2**63-1")
    return value


def _signed(value: Any) -> int:
    if type(value) is not int or not -_INT_LIMIT <= value < _INT_LIMIT:
        raise BadParams("expected a 64-bit integer")
    return value


def _io_size(value: Any) -> int:
    size = _int(value)
    if size > MAX_IO:
        raise BadParams(f"expected at most {MAX_IO} bytes")
    return size


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _str(value: Any) -> str:
    if type(value) is not str:
        raise BadParams("expected a string")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise BadParams("expected true or false")
    return value


def _bytes(value: Any) -> bytes:
    attachment: bytes = value  # bytes by construction
    return attachment


def _record(value: Any, decoders: Mapping[str, Decoder], required: set[str]) -> dict[str, Any]:
    if type(value) is not dict:
        raise BadParams("expected an object")
    unknown = set(value) - set(decoders)
    if unknown:
        raise BadParams(f"unknown fields {sorted(unknown)}")
    if required - set(value):
        raise BadParams(f"missing fields {sorted(required - set(value))}")
    return {name: decoders[name](item) for name, item in value.items()}


def _caller(value: Any) -> Caller:
    checks = {"uid": _int, "gid": _int, "umask": _int}
    return Caller(**_record(value, checks, {"uid", "gid"}))


def _changes(value: Any) -> AttrChanges:
    checks: dict[str, Decoder] = {field.name: _optional_int for field in fields(AttrChanges)}
    checks["atime_ns"] = checks["mtime_ns"] = lambda item: None if item is None else _signed(item)
    return AttrChanges(**_record(value, checks, set()))


def _counts(value: Any) -> list[tuple[int, int]]:
    if type(value) is not list:
        raise BadParams("expected a list of [inode, count] pairs")
    pairs = []
    for pair in value:
        if type(pair) is not list or len(pair) != 2:
            raise BadParams("expected a list of [inode, count] pairs")
        pairs.append((_int(pair[0]), _int(pair[1])))
    return pairs


def _number(value: Any) -> float:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise BadParams("expected a finite number >= 0")
    return float(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _settings(value: Any) -> dict[str, Any]:
    return _record(value, {"cache_timeout": _number, "cache_size": _int}, set())


# --- results, on the client's side ----------------------------------------------------------------------------
def _attributes(value: Any, data: bytes) -> Attributes:
    return Attributes(**value)


def _entries(value: Any, data: bytes) -> list[DirectoryEntry]:
    return [DirectoryEntry(e["name"], Attributes(**e["attributes"]), e["next_offset"]) for e in value]


def _handle_and_attributes(value: Any, data: bytes) -> tuple[int, Attributes]:
    return value[0], Attributes(**value[1])


def _stats(value: Any, data: bytes) -> FsStats:
    return FsStats(**value)


def _attachment(value: Any, data: bytes) -> bytes:
    return data


def _plain(value: Any, data: bytes) -> Any:
    return value


ResultDecoder = Callable[[Any, bytes], Any]


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[tuple[str, Decoder], ...]
    result: ResultDecoder = _plain
    attachment: str | None = None  # the bytes parameter carried as the frame's attachment
    connection: bool = False  # a method of the connection, not a filesystem operation

    def encode_params(self, args: tuple[Any, ...]) -> tuple[dict[str, Any], bytes]:
        """The client's side: positional arguments as `params` and the attachment."""
        params = dict(zip((name for name, _ in self.params), args, strict=True))
        data = params.pop(self.attachment) if self.attachment else b""
        return params, data

    def decode_params(self, params: dict[str, Any], data: bytes) -> list[Any]:
        """The server's side: the arguments, in order, checked; BadParams if they are not what the method takes."""
        expected = {name for name, _ in self.params if name != self.attachment}
        if set(params) != expected:
            raise BadParams(f"{self.name} takes {sorted(expected)}, got {sorted(params)}")
        if data and self.attachment is None:
            raise BadParams(f"{self.name} takes no attachment")
        arguments = []
        for name, decode in self.params:
            try:
                arguments.append(decode(data if name == self.attachment else params[name]))
            except BadParams as exc:
                raise BadParams(f"{self.name}: {name}: {exc}") from None
        return arguments


def _method(name: str, *params: tuple[str, Decoder], **options: Any) -> Method:
    return Method(name, params, **options)


_METHODS = [
    _method("attach", ("root_cap", _str), ("settings", _settings), connection=True),
    _method("status", connection=True),
    _method("lookup", ("parent", _int), ("name", _str), result=_attributes),
    _method("forget", ("counts", _counts)),
    _method("getattr", ("inode", _int), result=_attributes),
    _method("setattr", ("inode", _int), ("changes", _changes), ("fh", _optional_int), result=_attributes),
    _method("readlink", ("inode", _int)),
    _method("mkdir", ("parent", _int), ("name", _str), ("mode", _int), ("caller", _caller), result=_attributes),
    _method("symlink", ("parent", _int), ("name", _str), ("target", _str), ("caller", _caller), result=_attributes),
    _method(
        "mknod",
        ("parent", _int),
        ("name", _str),
        ("mode", _int),
        ("rdev", _int),
        ("caller", _caller),
        result=_attributes,
    ),
    _method("unlink", ("parent", _int), ("name", _str)),
    _method("rmdir", ("parent", _int), ("name", _str)),
    _method(
        "rename", ("parent_old", _int), ("name_old", _str), ("parent_new", _int), ("name_new", _str), ("flags", _int)
    ),
    _method("link", ("inode", _int), ("new_parent", _int), ("new_name", _str), result=_attributes),
    _method("open", ("inode", _int), ("flags", _int)),
    _method(
        "create",
        ("parent", _int),
        ("name", _str),
        ("mode", _int),
        ("flags", _int),
        ("caller", _caller),
        result=_handle_and_attributes,
    ),
    _method("read", ("fh", _int), ("offset", _int), ("size", _io_size), result=_attachment),
    _method("write", ("fh", _int), ("offset", _int), ("data", _bytes), attachment="data"),
    _method("flush", ("fh", _int)),
    _method("fsync", ("fh", _int), ("datasync", _bool)),
    _method("release", ("fh", _int)),
    _method("opendir", ("inode", _int)),
    _method("readdir", ("fh", _int), ("offset", _int), result=_entries),
    _method("releasedir", ("fh", _int)),
    _method("fsyncdir", ("fh", _int), ("datasync", _bool)),
    _method("statfs", result=_stats),
    _method("getxattr", ("inode", _int), ("name", _str), result=_attachment),
    _method("setxattr", ("inode", _int), ("name", _str), ("value", _bytes), ("flags", _int), attachment="value"),
    _method("listxattr", ("inode", _int)),
    _method("removexattr", ("inode", _int), ("name", _str)),
    _method("queue_state"),
    _method("finish_uploads", ("give_up_after", _optional_number)),
]
METHODS: dict[str, Method] = {method.name: method for method in _METHODS}


def encode_result(value: Any) -> tuple[Any, bytes]:
    """The server's side: a method's return value as the reply's JSON `result` and attachment."""
    if isinstance(value, bytes):
        return None, value
    return value, b""
