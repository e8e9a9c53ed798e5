"""Calendar windows in an account's time zone: which day, week and month an instant falls in.

This is calendar arithmetic, not limit logic: Python names the windows (Lua has no time-zone database) and
the scripts decide with them. Window ids are short, sortable strings that also appear in the ledger.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import zoneinfo

from spendgate.domain import InvalidArgumentError, Window

TOTAL_WINDOW_ID = "all"
MINUTE_MS = 60_000


@dataclasses.dataclass(frozen=True, slots=True)
class WindowIds:
    """The ids and closing times of the windows open at one instant."""

    day: str
    week: str
    month: str
    minute: str
    day_ends_at_ms: int
    week_ends_at_ms: int
    month_ends_at_ms: int

    def id_of(self, window: Window) -> str:
        """Return the id of one window."""
        return {
            Window.DAY: self.day,
            Window.WEEK: self.week,
            Window.MONTH: self.month,
            Window.TOTAL: TOTAL_WINDOW_ID,
            Window.MINUTE: self.minute,
        }[window]

    def ends_at_ms(self, window: Window) -> int:
        """Return when one window closes (0 for the total window, which never does)."""
        return {
            Window.DAY: self.day_ends_at_ms,
            Window.WEEK: self.week_ends_at_ms,
            Window.MONTH: self.month_ends_at_ms,
        }.get(window, 0)


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> zoneinfo.ZoneInfo:
    """Return the time zone called ``name`` or raise :class:`InvalidArgumentError`."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise InvalidArgumentError(
            f"unknown time zone {name!r}: use an IANA name such as UTC or Europe/Paris"
        ) from error


def _ms(moment: datetime.datetime) -> int:
    return int(moment.timestamp() * 1000)


def windows_at(now_ms: int, time_zone: str) -> WindowIds:
    """Return the windows open at ``now_ms`` in ``time_zone``."""
    # Every time zone's offset is a whole number of minutes, so day, week and month change only on a minute
    # boundary: the windows of a minute are computed once (it saves the calendar arithmetic per decision).
    return _windows_of_minute(now_ms // MINUTE_MS, time_zone)


@functools.lru_cache(maxsize=4096)
def _windows_of_minute(minute: int, time_zone: str) -> WindowIds:
    now_ms = minute * MINUTE_MS
    tz = zone(time_zone)
    local = datetime.datetime.fromtimestamp(now_ms / 1000, tz)
    today = local.date()
    next_day = today + datetime.timedelta(days=1)
    week_start = today - datetime.timedelta(days=today.weekday())
    next_week = week_start + datetime.timedelta(days=7)
    next_month = (today.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
    iso_year, iso_week, _ = today.isocalendar()

    def midnight(day: datetime.date) -> int:
        return _ms(datetime.datetime.combine(day, datetime.time(), tz))

    return WindowIds(
        day=today.isoformat(),
        week=f"{iso_year}-W{iso_week:02d}",
        month=f"{today.year}-{today.month:02d}",
        minute=str(now_ms // MINUTE_MS),
        day_ends_at_ms=midnight(next_day),
        week_ends_at_ms=midnight(next_week),
        month_ends_at_ms=midnight(next_month),
    )
