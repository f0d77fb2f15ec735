"""Lease expiry as Tahoe-LAFS's storage server does it (`storage/expirer.py`, docs/garbage-collection.rst).

Pure policy: the `[storage] expire.*` settings parsed from their text, and the decision whether a share has
expired at a given time, from its kind and the expiration times of its leases. The lease checker (the crawler
in `lease_checker.py`) reads shares and deletes them; nothing here touches a file.

Tahoe stores only a lease's expiration time; its grant (or last renewal) time is that less 31 days. A lease
has expired
- in `age` mode: when its age (now less its grant time) exceeds `expire.override_lease_duration`, or, without
  that setting, when its own expiration time has passed;
- in `cutoff-date` mode: when it was granted or last renewed before midnight UTC starting `expire.cutoff_date`.

A share expires once every one of its leases has. A share with no lease at all is kept: Tahoe deletes a share
only when it cancels the share's last expired lease, so one that never had a lease is never deleted.
"""

from __future__ import annotations

import calendar
import configparser
import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..durations import parse_duration
from ..errors import LafsError
from .containers import LEASE_DURATION

ExpiryMode = Literal["age", "cutoff-date"]
DEFAULT_CYCLE_TIME = 12 * 3600  # Tahoe's lease checker starts a new pass at most twice a day

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_SETTINGS = (
    "expire.enabled",
    "expire.mode",
    "expire.override_lease_duration",
    "expire.cutoff_date",
    "expire.immutable",
    "expire.mutable",
    "expire.cycle_time",
)


class ExpirySettingError(LafsError):
    """An `expire.*` setting whose value cannot be used; the message names the setting."""


@dataclass(frozen=True)
class ExpirySettings:
    """What the lease checker deletes, and how often it passes over all shares."""

    enabled: bool = False
    mode: ExpiryMode = "age"
    override_lease_duration: int | None = None  # seconds; age mode only
    cutoff_date: int | None = None  # seconds since the epoch, midnight UTC; cutoff-date mode only
    immutable: bool = True
    mutable: bool = True
    cycle_time: int = DEFAULT_CYCLE_TIME  # at least this long between the end of a pass and the next one

    def describe(self) -> str:
        """The settings in one line for the log."""
        if not self.enabled:
            return "expiry disabled, nothing is deleted"
        if self.mode == "cutoff-date":
            assert self.cutoff_date is not None
            day = datetime.datetime.fromtimestamp(self.cutoff_date, datetime.UTC).date().isoformat()
            rule = f"was last renewed before {day}"
        elif self.override_lease_duration is None:
            rule = "is past its expiration time"
        else:
            rule = f"was last renewed more than {self.override_lease_duration} s ago"
        kinds = " and ".join(kind for kind, on in (("immutable", self.immutable), ("mutable", self.mutable)) if on)
        return f"expiry enabled: {kinds or 'no'} shares are deleted once every lease on them {rule}"


def parse_cutoff_date(text: str) -> int:
    """Seconds since the epoch at midnight UTC beginning the day `YYYY-MM-DD`."""
    match = _DATE.match(text.strip())
    try:
        if not match:
            raise ValueError
        day = datetime.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        raise ValueError(f"{text!r} is not a date written YYYY-MM-DD") from None
    return calendar.timegm(day.timetuple())


def _boolean(section: Mapping[str, str], key: str, default: bool) -> bool:
    text = section.get(key)
    if text is None:
        return default
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.strip().lower())
    if value is None:
        raise ExpirySettingError(f"[storage] {key} must be true or false, not {text!r}")
    return value


def expiry_settings(section: Mapping[str, str]) -> ExpirySettings:
    """The settings in a `[storage]` section, refusing values Tahoe would refuse or that cannot mean anything.

    As in Tahoe, `expire.mode` has no default once expiry is enabled, and (as Tahoe's documentation says)
    `override_lease_duration` belongs to age mode and `cutoff_date` to cutoff-date mode only. An unknown
    `expire.` key is refused too, as Tahoe refuses unknown keys: a misspelt setting must not pass unnoticed."""
    unknown = sorted(key for key in section if key.startswith("expire.") and key not in _SETTINGS)
    if unknown:
        raise ExpirySettingError(f"[storage] {unknown[0]} is not a setting (known: {', '.join(_SETTINGS)})")
    enabled = _boolean(section, "expire.enabled", False)
    mode_text = section.get("expire.mode")
    if mode_text is None and enabled:
        raise ExpirySettingError("[storage] expire.mode must be set to 'age' or 'cutoff-date' when expiry is enabled")
    mode: ExpiryMode
    match (mode_text or "age").strip():
        case "age":
            mode = "age"
        case "cutoff-date":
            mode = "cutoff-date"
        case _:
            raise ExpirySettingError(f"[storage] expire.mode must be 'age' or 'cutoff-date', not {mode_text!r}")
    override = cutoff = None
    duration_text = section.get("expire.override_lease_duration")
    if duration_text is not None:
        if mode != "age":
            raise ExpirySettingError("[storage] expire.override_lease_duration applies only to expire.mode = age")
        override = _parse(parse_duration, "expire.override_lease_duration", duration_text)
    date_text = section.get("expire.cutoff_date")
    if mode == "cutoff-date":
        if date_text is None:
            raise ExpirySettingError("[storage] expire.cutoff_date (YYYY-MM-DD) is needed by expire.mode = cutoff-date")
        cutoff = _parse(parse_cutoff_date, "expire.cutoff_date", date_text)
    elif date_text is not None:
        raise ExpirySettingError("[storage] expire.cutoff_date applies only to expire.mode = cutoff-date")
    cycle_text = section.get("expire.cycle_time")
    cycle_time = DEFAULT_CYCLE_TIME if cycle_text is None else _parse(parse_duration, "expire.cycle_time", cycle_text)
    if cycle_time < 1:  # no rest at all would spin over a small store
        raise ExpirySettingError("[storage] expire.cycle_time: at least 1 second")
    return ExpirySettings(
        enabled=enabled,
        mode=mode,
        override_lease_duration=override,
        cutoff_date=cutoff,
        immutable=_boolean(section, "expire.immutable", True),
        mutable=_boolean(section, "expire.mutable", True),
        cycle_time=cycle_time,
    )


def _parse(parser: Callable[[str], int], key: str, text: str) -> int:
    try:
        return parser(text)
    except ValueError as exc:
        raise ExpirySettingError(f"[storage] {key}: {exc}") from None


def lease_expired(expiration: int, settings: ExpirySettings, now: float) -> bool:
    """Whether one lease, expiring at `expiration` as stored in its share, has expired at `now`."""
    granted = expiration - LEASE_DURATION
    if settings.mode == "cutoff-date":
        assert settings.cutoff_date is not None
        return granted < settings.cutoff_date
    if settings.override_lease_duration is None:
        return now > expiration
    return now - granted > settings.override_lease_duration


def share_expired(mutable: bool, expirations: Iterable[int], settings: ExpirySettings, now: float) -> bool:
    """Whether a share with leases expiring at `expirations` has expired at `now` (whether or not expiry is
    enabled: a server without it still reports what it would delete)."""
    if not (settings.mutable if mutable else settings.immutable):
        return False
    leases = list(expirations)
    return bool(leases) and all(lease_expired(expiration, settings, now) for expiration in leases)
