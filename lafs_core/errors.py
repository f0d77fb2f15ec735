"""Exceptions shared by the format modules, so callers can tell bad input from bad shares; and `sole_exception`,
which takes the one exception out of the groups trio's nurseries wrap around it."""

from collections.abc import Hashable


class LafsError(Exception):
    """Base class of every error lafs_core raises on purpose."""


def sole_exception(exc: BaseException) -> BaseException:
    """`exc` without the exception groups of one member that nurseries wrap around it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class FormatError(LafsError, ValueError):
    """Bytes or text that do not parse as the format they claim to be."""


class CapError(FormatError):
    """A capability string that is malformed (wrong length, bad base32, bad numbers)."""


class BadShareError(LafsError):
    """A share failed verification: its bytes do not match the hashes the cap commits to.

    ``share`` names the share (its number, or whatever key the reader was given) so the caller can drop it and
    use another one.
    """

    def __init__(self, share: Hashable, reason: str) -> None:
        super().__init__(f"share {share}: {reason}")
        self.share = share
        self.reason = reason


class NotEnoughSharesError(LafsError):
    """Fewer than k good shares are available, so the data cannot be recovered."""
