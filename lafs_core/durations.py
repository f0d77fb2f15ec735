"""Durations as Tahoe's configuration writes them (`src/allmydata/util/time_format.py`, `parse_duration`).

A whole number and a unit, case-insensitive, spaces allowed around and between: "7 days", "31day", "2mo",
"1 year", "90s". A month is 31 days and a year 365 days, as Tahoe counts them. There is no bare number and no
week: Tahoe accepts neither, and a setting read by both must mean the same to both.
"""

from __future__ import annotations

import re

SECOND = 1
DAY = 24 * 60 * 60
MONTH = 31 * DAY
YEAR = 365 * DAY

UNITS = {
    "s": SECOND,
    "second": SECOND,
    "seconds": SECOND,
    "day": DAY,
    "days": DAY,
    "mo": MONTH,
    "month": MONTH,
    "months": MONTH,
    "year": YEAR,
    "years": YEAR,
}

_DURATION = re.compile(r"\s*([0-9]+)\s*(" + "|".join(sorted(UNITS, key=len, reverse=True)) + r")\s*", re.IGNORECASE)


def parse_duration(text: str) -> int:
    """Seconds in `text`; ValueError, naming the units there are, when it is not a duration."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text.strip()!r} is not a duration: a number and one of {', '.join(UNITS)}")
    return int(match.group(1)) * UNITS[match.group(2).lower()]
