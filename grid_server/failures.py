"""How a long-running process (the grid server, a mount) reports the exception that ended it: the one exception
inside trio's exception groups, as one line when it is an expected kind of failure, with a traceback when not."""

from __future__ import annotations

import logging

from lafs_core.errors import LafsError


def sole_exception(exc: BaseException) -> BaseException:
    """`exc` without the exception groups of one member that nurseries wrap around it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def log_failure(log: logging.Logger, what: str, exc: BaseException) -> None:
    if isinstance(exc, LafsError | OSError):
        log.error("%s: %s", what, exc)
    else:
        log.error("%s", what, exc_info=exc)
