"""The FUSE shim without a kernel: what it forwards, and the one answer it gives itself."""

from __future__ import annotations

import errno

import pyfuse3
import pytest
import trio

from fuse_client.shim import FuseShim
from grid_server.operations import FsError


class Recorder:
    """Operations that record each call and answer getxattr with the name's bytes (or ENODATA for "user.none")."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def getxattr(self, inode: int, name: str) -> bytes:
        self.calls.append(("getxattr", (inode, name)))
        if name == "user.none":
            raise FsError(errno.ENODATA, "no such attribute")
        return name.encode()


def getxattr(shim: FuseShim, name: bytes) -> bytes:
    async def call() -> bytes:
        return await shim.getxattr(5, name, None)

    return trio.run(call)


def test_user_xattrs_are_forwarded_and_others_answered_without_a_call():
    operations = Recorder()
    shim = FuseShim(operations)  # type: ignore[arg-type]
    assert getxattr(shim, b"user.tahoe.cap") == b"user.tahoe.cap"
    with pytest.raises(pyfuse3.FUSEError) as failure:
        getxattr(shim, b"user.none")
    assert failure.value.errno == errno.ENODATA
    assert operations.calls == [("getxattr", (5, "user.tahoe.cap")), ("getxattr", (5, "user.none"))]
    for name in (b"security.selinux", b"system.posix_acl_access", b"trusted.x", b"user"):
        with pytest.raises(pyfuse3.FUSEError) as failure:
            getxattr(shim, name)
        assert failure.value.errno == errno.ENODATA
    assert len(operations.calls) == 2, "a name outside user.* reached the operations"
    with pytest.raises(pyfuse3.FUSEError) as failure:
        getxattr(shim, b"user.\xff")
    assert failure.value.errno == errno.EINVAL
