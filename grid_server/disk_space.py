"""Linux fallocate(2) for the node directory's files: give disk blocks back, or claim them ahead of need.

Python's os module has only posix_fallocate, which grows the file; both uses here must leave its size alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _load_libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_libc_fallocate()


def _call(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk blocks of [offset, offset+length) without changing the file's size."""
    _call(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the blocks of [offset, offset+length) without changing the file's size, so later writes there
    need no free space: OSError (ENOSPC) if the disk has not that much left."""
    _call(fd, _FALLOC_FL_KEEP_SIZE, offset, length)
