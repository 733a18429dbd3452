"""Exact ISO-8601 timestamp handling at microsecond resolution.

The Scan prints update ``record_time`` with exactly six fractional digits; ``effective_at`` and
``created_at`` may carry 0, 3, 6 or 9. We keep integers of microseconds since the Unix epoch and
never go through floats. Nine-digit values are accepted only when the last three digits are zero:
Daml time is microseconds, so anything else is a corrupt value and raises rather than rounding.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
_EPOCH_DATE = date(1970, 1, 1)

_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|z|[+-]\d{2}:?\d{2})$"
)


class TimestampError(ValueError):
    """A string is not an ISO-8601 UTC timestamp we can represent exactly in microseconds."""


@lru_cache(maxsize=4096)
def _days_since_epoch(year: int, month: int, day: int) -> int:
    return (date(year, month, day) - _EPOCH_DATE).days


def parse_us(text: str) -> int:
    """Parse an ISO-8601 timestamp with a zone into microseconds since the epoch, exactly."""
    if not isinstance(text, str):
        raise TimestampError(f"expected an ISO-8601 string, got {type(text).__name__} {text!r}")
    m = _ISO_RE.match(text)
    if m is None:
        raise TimestampError(f"not an ISO-8601 timestamp with a zone: {text!r}")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        days = _days_since_epoch(int(year), int(month), int(day))
    except ValueError as exc:
        raise TimestampError(f"invalid date in {text!r}: {exc}") from None
    h, mi, s = int(hour), int(minute), int(second)
    if h > 23 or mi > 59 or s > 59:
        raise TimestampError(f"invalid time of day in {text!r}")
    micros = 0
    if frac:
        if len(frac) > 6:
            if frac[6:].strip("0"):
                raise TimestampError(f"sub-microsecond precision would be lost in {text!r}")
            frac = frac[:6]
        micros = int(frac.ljust(6, "0"))
    total = ((days * 86_400) + h * 3600 + mi * 60 + s) * US_PER_SECOND + micros
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        offset_s = int(digits[:2]) * 3600 + int(digits[2:]) * 60
        total -= sign * offset_s * US_PER_SECOND
    return total


def format_us(us: int) -> str:
    """Format microseconds as the Scan does for record times: 6 fractional digits and ``Z``."""
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    # strftime does not zero-pad years below 1000 on every platform (ACS imports use year 1).
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f".{dt.microsecond:06d}Z"
    )


def to_datetime(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def from_datetime(value: datetime) -> int:
    """Exact microseconds of an aware datetime (naive values are rejected, not guessed)."""
    if value.tzinfo is None:
        raise TimestampError(f"naive datetime {value!r}: a time zone is required")
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def date_of_us(us: int) -> str:
    """UTC calendar date (``YYYY-MM-DD``, zero-padded, as Hive partitions) of a timestamp."""
    return (_EPOCH_DATE + timedelta(days=us // US_PER_DAY)).isoformat()


def compact_us(us: int) -> str:
    """A file-name-safe, sortable rendering, e.g. ``20250303T101500Z`` or ``20250303T101500.000123Z``."""
    dt = to_datetime(us)
    base = f"{dt.year:04d}{dt.month:02d}{dt.day:02d}T{dt.hour:02d}{dt.minute:02d}{dt.second:02d}"
    return f"{base}Z" if dt.microsecond == 0 else f"{base}.{dt.microsecond:06d}Z"


_COMPACT_RE = re.compile(r"^(\d{8})T(\d{6})(?:\.(\d{6}))?Z$")


def parse_compact_us(text: str) -> int:
    m = _COMPACT_RE.match(text)
    if m is None:
        raise TimestampError(f"not a compact timestamp: {text!r}")
    d, t, frac = m.groups()
    return parse_us(f"{d[:4]}-{d[4:6]}-{d[6:]}T{t[:2]}:{t[2:4]}:{t[4:]}.{frac or '0'}Z")
