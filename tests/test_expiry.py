"""Lease-expiry policy: Tahoe's `expire.*` settings and the decision whether a share has expired."""

import calendar
import datetime
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lafs_core.storage.containers import LEASE_DURATION
from lafs_core.storage.expiry import (
    DEFAULT_CYCLE_TIME,
    ExpirySettingError,
    ExpirySettings,
    expiry_settings,
    lease_expired,
    parse_cutoff_date,
    share_expired,
)

DAY = 24 * 3600
NOW = 1_800_000_000
times = st.integers(min_value=0, max_value=2**32 - 1)
durations = st.integers(min_value=0, max_value=10 * 365 * DAY)
age_settings = st.builds(
    ExpirySettings, enabled=st.just(True), mode=st.just("age"), override_lease_duration=st.none() | durations
)
cutoff_settings = st.builds(ExpirySettings, enabled=st.just(True), mode=st.just("cutoff-date"), cutoff_date=times)
any_settings = age_settings | cutoff_settings


@given(st.dates(min_value=datetime.date(1970, 1, 1)))
def test_cutoff_date_is_midnight_utc_starting_the_day(day):
    seconds = parse_cutoff_date(day.isoformat())
    assert seconds == calendar.timegm(day.timetuple())
    assert datetime.datetime.fromtimestamp(seconds, datetime.UTC) == datetime.datetime(
        day.year, day.month, day.day, tzinfo=datetime.UTC
    )


@pytest.mark.parametrize("text", ["2009-1-16", "2009-02-30", "16-01-2009", "yesterday", "2009-01-16T00:00:00"])
def test_cutoff_date_refuses_other_forms(text):
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_cutoff_date(text)


def test_settings_default_to_no_expiry():
    assert expiry_settings({}) == ExpirySettings()
    assert not ExpirySettings().enabled and ExpirySettings().cycle_time == DEFAULT_CYCLE_TIME


def test_settings_are_read_as_tahoe_names_them():
    settings = expiry_settings(
        {
            "expire.enabled": "True",
            "expire.mode": "cutoff-date",
            "expire.cutoff_date": "2009-01-16",
            "expire.immutable": "false",
            "expire.mutable": "yes",
            "expire.cycle_time": "30 seconds",
        }
    )
    assert settings == ExpirySettings(True, "cutoff-date", None, 1232064000, False, True, 30)
    age = expiry_settings({"expire.enabled": "on", "expire.mode": "age", "expire.override_lease_duration": "60 days"})
    assert age.mode == "age" and age.override_lease_duration == 60 * DAY and age.immutable and age.mutable


@pytest.mark.parametrize(
    ("section", "setting"),
    [
        ({"expire.enabled": "sometimes"}, "expire.enabled"),
        ({"expire.enabled": "true"}, "expire.mode"),  # Tahoe has no default mode once expiry is on
        ({"expire.mode": "lru"}, "expire.mode"),
        ({"expire.mode": "age", "expire.override_lease_duration": "soon"}, "expire.override_lease_duration"),
        ({"expire.mode": "cutoff-date"}, "expire.cutoff_date"),
        ({"expire.mode": "cutoff-date", "expire.cutoff_date": "2009-13-01"}, "expire.cutoff_date"),
        ({"expire.mode": "age", "expire.cutoff_date": "2009-01-01"}, "expire.cutoff_date"),
        (
            {"expire.mode": "cutoff-date", "expire.cutoff_date": "2009-01-01", "expire.override_lease_duration": "1s"},
            "expire.override_lease_duration",
        ),
        ({"expire.mutable": "2"}, "expire.mutable"),
        ({"expire.immutable": ""}, "expire.immutable"),
        ({"expire.cycle_time": "often"}, "expire.cycle_time"),
        ({"expire.cycle_time": "0 seconds"}, "expire.cycle_time"),
        ({"expire.enable": "true"}, "expire.enable"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_setting(section, setting):
    with pytest.raises(ExpirySettingError) as raised:
        expiry_settings(section)
    message = str(raised.value)
    assert re.match(rf"\[storage\] {re.escape(setting)}[ :]", message) and "\n" not in message


@given(expiration=times, override=durations, now=times)
def test_age_mode_with_override_counts_from_the_grant_time(expiration, override, now):
    settings = ExpirySettings(True, "age", override)
    granted = expiration - LEASE_DURATION
    assert lease_expired(expiration, settings, now) == (granted + override < now)


@given(expiration=times, now=times)
def test_age_mode_without_override_uses_the_leases_own_expiration(expiration, now):
    assert lease_expired(expiration, ExpirySettings(True, "age"), now) == (now > expiration)


@given(expiration=times, cutoff=times, now=times)
def test_cutoff_mode_expires_leases_not_renewed_since_the_cutoff(expiration, cutoff, now):
    settings = ExpirySettings(True, "cutoff-date", cutoff_date=cutoff)
    assert lease_expired(expiration, settings, now) == (expiration - LEASE_DURATION < cutoff)


@given(settings=any_settings, expirations=st.lists(times, min_size=1, max_size=6), mutable=st.booleans(), now=times)
def test_a_share_expires_once_every_lease_has(settings, expirations, mutable, now):
    expected = all(lease_expired(e, settings, now) for e in expirations)
    assert share_expired(mutable, expirations, settings, now) == expected


@given(settings=any_settings, mutable=st.booleans(), now=times)
def test_a_share_without_leases_is_kept_as_tahoe_keeps_it(settings, mutable, now):
    assert not share_expired(mutable, [], settings, now)


@given(settings=any_settings, expirations=st.lists(times, max_size=6), mutable=st.booleans(), now=times)
def test_a_kind_left_out_of_expiry_is_never_expired(settings, expirations, mutable, now):
    kept = ExpirySettings(
        settings.enabled, settings.mode, settings.override_lease_duration, settings.cutoff_date, mutable, not mutable
    )
    assert not share_expired(mutable, expirations, kept, now)


@given(settings=age_settings, expirations=st.lists(times, min_size=1, max_size=6), now=times, later=durations)
def test_in_age_mode_an_expired_share_stays_expired(settings, expirations, now, later):
    if share_expired(False, expirations, settings, now):
        assert share_expired(False, expirations, settings, now + later)


@given(settings=age_settings, expirations=st.lists(times, max_size=6), now=times)
def test_a_lease_renewed_now_keeps_a_share_in_age_mode(settings, expirations, now):
    renewed = now + LEASE_DURATION  # what renewing at `now` stores
    assert not share_expired(True, [*expirations, renewed], settings, now)


def test_examples_at_a_fixed_time():
    sixty_days = ExpirySettings(True, "age", 60 * DAY)
    renewed_40_days_ago = NOW - 40 * DAY + LEASE_DURATION
    renewed_70_days_ago = NOW - 70 * DAY + LEASE_DURATION
    assert not share_expired(False, [renewed_40_days_ago], sixty_days, NOW)  # past its 31 days, within 60
    assert share_expired(False, [renewed_70_days_ago], sixty_days, NOW)
    assert not share_expired(False, [renewed_70_days_ago, renewed_40_days_ago], sixty_days, NOW)
    assert share_expired(False, [renewed_40_days_ago], ExpirySettings(True, "age"), NOW)
