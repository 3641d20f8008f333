"""A bandwidth limit as operators write it: one rate, or a timetable like rclone's `--bwlimit`.

    transfer:
      bandwidth: "08:00,50M 19:00,off"     # 50 MB/s from 08:00, no limit from 19:00
      bandwidth_timezone: Europe/Paris     # the zone the times are in (default)

A rate is a size per second in the project's units (`50M` = 50 MB/s, `50MiB` = 50 MiB/s, a
number = bytes/s) or `off` (no limit). A timetable is `HH:MM,RATE` entries separated by spaces,
in any order; the entry with the latest time not after now applies, and before the first time of
the day the last entry of the previous day still does (as rclone). Day-of-week entries
(`Mon-08:00,…`) and separate upload:download rates are not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, tzinfo

from .sizes import parse_size

EXAMPLE = '"08:00,50M 19:00,off" or "20M"'
_ENTRY = re.compile(r"^(\d{1,2}):(\d{2}),(.+)$")


@dataclass(frozen=True)
class BandwidthTimetable:
    """Bytes per second by local time of day (None: no limit), switching at each entry's time."""

    entries: tuple[tuple[time, int | None], ...]  # sorted by time; at least one
    text: str  # as written, for messages and the run's log

    def rate_at(self, when: datetime, zone: tzinfo) -> int | None:
        """The limit in force at `when` (an aware datetime), read on the clock of `zone`."""
        now = when.astimezone(zone).time()
        rate = self.entries[-1][1]  # before the first switch of the day: yesterday's last one
        for at, value in self.entries:
            if at <= now:
                rate = value
        return rate

    @property
    def unlimited(self) -> bool:
        return all(rate is None for _, rate in self.entries)


def parse_bandwidth(text: str) -> BandwidthTimetable:
    """`"08:00,50M 19:00,off"` or `"20M"` → a `BandwidthTimetable`; `ValueError` saying what is
    wrong (the caller names the field or the flag)."""
    words = str(text).split()
    if not words:
        raise ValueError("it is empty")
    if len(words) == 1 and "," not in words[0]:
        return BandwidthTimetable(((time(0, 0), _rate(words[0])),), str(text))
    entries: dict[time, int | None] = {}
    for word in words:
        m = _ENTRY.match(word)
        if not m:
            raise ValueError(f"`{word}` is not an entry `HH:MM,RATE`")
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"`{word}`: {m.group(1)}:{m.group(2)} is not a time of day")
        at = time(hour, minute)
        if at in entries:
            raise ValueError(f"{at:%H:%M} is given twice")
        entries[at] = _rate(m.group(3))
    return BandwidthTimetable(tuple(sorted(entries.items())), str(text))


def _rate(word: str) -> int | None:
    if word.lower() == "off":
        return None
    try:
        rate = parse_size(word)
    except ValueError:
        raise ValueError(f"`{word}` is not a rate (a size per second such as 50M or 20MiB, or off)") from None
    if rate < 1024:
        raise ValueError(f"`{word}` is below 1 KiB/s")
    return rate
