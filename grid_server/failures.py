"""How a long-running process (the grid server, a mount) reports the exception that ended it (the one exception
inside trio's exception groups: `lafs_core.errors.sole_exception`): as one line when it is an expected kind of
failure, with a traceback when not."""

from __future__ import annotations

import logging

from lafs_core.errors import LafsError


def log_failure(log: logging.Logger, what: str, exc: BaseException) -> None:
    if isinstance(exc, LafsError | OSError):
        log.error("%s: %s", what, exc)
    else:
        log.error("%s", what, exc_info=exc)
