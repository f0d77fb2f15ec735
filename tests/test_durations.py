"""Tahoe's duration syntax, and the lease-renewal and background-repair settings of tahoe.cfg."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grid_server.lease_renewal import repair_pause
from lafs_core.durations import DAY, MONTH, UNITS, YEAR, parse_duration
from lafs_core.grid.nodedir import (
    DEFAULT_RENEWAL_INTERVAL,
    DEFAULT_REPAIR_BANDWIDTH,
    NodeDirectory,
    NodeDirectoryError,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        (" 333 second ", 333),
        ("60 SECONDS", 60),
        ("7days", 7 * DAY),
        ("31day", 31 * DAY),
        ("4 mo", 4 * MONTH),
        ("3 Months", 3 * MONTH),
        ("8 year", 8 * YEAR),
        ("11YEARS", 11 * YEAR),
    ],
)
def test_tahoe_examples(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["123", "2kumquats", "1 week", "-1 day", "1.5 days", "days", "1 d ays", ""])
def test_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration: a number and one of s, second"):
        parse_duration(text)


@given(
    st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(UNITS)), st.booleans(), st.text(" ", max_size=2)
)
def test_any_number_and_unit(number: int, unit: str, upper: bool, space: str) -> None:
    text = f"{space}{number}{space}{unit.upper() if upper else unit}{space}"
    assert parse_duration(text) == number * UNITS[unit]


def node_with(tmp_path: Path, blackmatch_section: str) -> NodeDirectory:
    (tmp_path / "tahoe.cfg").write_text(f"[client]\nshares.total = 10\n\n[blackmatch]\n{blackmatch_section}")
    return NodeDirectory(tmp_path)


@pytest.mark.parametrize(
    ("section", "interval", "rate"),
    [
        ("", DEFAULT_RENEWAL_INTERVAL, 1.0),
        ("lease.renewal_interval = 2 days\n", 2 * DAY, 1.0),
        ("lease.renewal_interval = off\n", None, 1.0),
        ("lease.renewal_interval = 0\nlease.renewal_rate = 250\n", None, 250.0),
        ("lease.renewal_interval = 0 s\nlease.renewal_rate = 0.5\n", None, 0.5),
    ],
)
def test_renewal_settings(tmp_path: Path, section: str, interval: int | None, rate: float) -> None:
    settings = node_with(tmp_path, section).lease_renewal()
    assert (settings.interval, settings.rate) == (interval, rate)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "lease.renewal_interval = weekly\n",
            "tahoe.cfg: [blackmatch] lease.renewal_interval: 'weekly' is not a duration: a number and one of s, "
            "second, seconds, day, days, mo, month, months, year, years, or off",
        ),
        ("lease.renewal_rate = 0\n", "tahoe.cfg: [blackmatch] lease.renewal_rate = '0': use objects a second, above 0"),
        ("lease.renewal_rate = fast\n", "tahoe.cfg: [blackmatch] lease.renewal_rate = 'fast': use objects a second"),
        ("lease.renewal_rate = nan\n", "tahoe.cfg: [blackmatch] lease.renewal_rate = 'nan': use objects a second"),
    ],
)
def test_bad_renewal_settings_are_one_line_naming_the_setting(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(NodeDirectoryError) as raised:
        node_with(tmp_path, section).lease_renewal()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("section", "repair", "bandwidth"),
    [
        ("", False, DEFAULT_REPAIR_BANDWIDTH),
        ("repair.background = true\n", True, DEFAULT_REPAIR_BANDWIDTH),
        ("repair.background = yes\nrepair.bandwidth = 512K\n", True, 512 << 10),
        ("repair.background = off\nrepair.bandwidth = 100000\n", False, 100_000),
    ],
)
def test_background_repair_settings(tmp_path: Path, section: str, repair: bool, bandwidth: int) -> None:
    settings = node_with(tmp_path, section).lease_renewal()
    assert (settings.repair, settings.repair_bandwidth) == (repair, bandwidth)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("repair.background = sometimes\n", "tahoe.cfg: [blackmatch] repair.background = 'sometimes': use true or"),
        ("repair.bandwidth = 0\n", "tahoe.cfg: [blackmatch] repair.bandwidth = '0': use bytes a second, above 0"),
        ("repair.bandwidth = fast\n", "tahoe.cfg: [blackmatch] repair.bandwidth = 'fast': use bytes a second"),
        (
            "repair.background = true\nlease.renewal_interval = off\n",
            "tahoe.cfg: [blackmatch] repair.background needs lease renewal",
        ),
    ],
)
def test_bad_repair_settings_are_one_line_naming_the_setting(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(NodeDirectoryError) as raised:
        node_with(tmp_path, section).lease_renewal()
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.parametrize(("size", "took", "pause"), [(3 << 20, 1.0, 2.0), (1 << 20, 5.0, 0.0), (0, 0.0, 0.0)])
def test_a_repair_is_followed_by_a_pause_that_keeps_to_the_bandwidth(size: int, took: float, pause: float) -> None:
    assert repair_pause(size, 1 << 20, took) == pause
