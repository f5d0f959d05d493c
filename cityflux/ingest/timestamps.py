"""Timestamps to integer epoch nanoseconds, exactly: no float ever touches them.

The contract allows ``ts`` as an integer (epoch milliseconds) or an RFC 3339 string with up to
nine fractional digits, and ``ts_ns`` as integer epoch nanoseconds.

A column is int64 nanoseconds, which hold 1677-09-21T00:12:43.145224194Z to
2262-04-11T23:47:16.854775807Z. A timestamp a device sends outside that span (year 9999, year 1,
ts = 2**63, ts = 10**400) is never converted: it becomes :data:`UNREPRESENTABLE`, and validation
rejects the reading as bad_timestamp; it must not raise, because one message would fail its
whole batch.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import numpy as np
import numpy.typing as npt

# A reading with a timestamp we cannot read gets this; validation turns it into bad_timestamp.
MISSING: Final = np.iinfo(np.int64).min
# ... and this when it is a readable instant int64 nanoseconds cannot hold.
UNREPRESENTABLE: Final = MISSING + 1
_INT64_MAX: Final = np.iinfo(np.int64).max
_LOWEST: Final = MISSING + 2  # the earliest storable instant: above both markers
_NS_PER_MS: Final = 1_000_000
_MAX_MS: Final = _INT64_MAX // _NS_PER_MS  # milliseconds whose nanoseconds fit in int64

_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_rfc3339(text: str) -> int | None:
    """Epoch nanoseconds of an RFC 3339 timestamp, or None if it is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    try:  # validates the calendar (no 30 February); a leap second 60 is allowed
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:
        return None
    fraction = (match.group(7) or "").ljust(9, "0")
    offset_s = 0
    if match.group(9):
        sign = 1 if match.group(9) == "+" else -1
        offset_s = sign * (int(match.group(10)) * 3600 + int(match.group(11)) * 60)
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    return (seconds - offset_s) * 1_000_000_000 + int(fraction)


def _storable(ns: int) -> int:
    return ns if _LOWEST <= ns <= _INT64_MAX else int(UNREPRESENTABLE)


def _one(ts: int | str | None, ts_ns: int | None, default_ns: int | None) -> int:
    if ts_ns is not None:
        return _storable(ts_ns) if ts is None else int(MISSING)
    if isinstance(ts, int):
        return _storable(ts * _NS_PER_MS)
    if isinstance(ts, str):
        parsed = parse_rfc3339(ts)
        return int(MISSING) if parsed is None else _storable(parsed)
    return int(MISSING) if default_ns is None else default_ns


def to_epoch_ns(
    ts: Sequence[int | str | None],
    ts_ns: Sequence[int | None],
    default_ns: int | None = None,
) -> npt.NDArray[np.int64]:
    """Column of epoch nanoseconds; MISSING where absent, both given, or unreadable;
    UNREPRESENTABLE where outside what int64 nanoseconds hold.

    The common case (every reading has an integer ``ts`` in ms) is one vectorised multiply.
    """
    if ts and ts_ns.count(None) == len(ts_ns) and set(map(type, ts)) == {int}:
        try:
            millis = np.array(ts, dtype=np.int64)
        except OverflowError:  # beyond int64 even as milliseconds: the slow way says so
            pass
        else:
            if millis.min() >= -_MAX_MS and millis.max() <= _MAX_MS:
                return millis * _NS_PER_MS
    return np.fromiter(
        (_one(a, b, default_ns) for a, b in zip(ts, ts_ns, strict=True)),
        dtype=np.int64,
        count=len(ts),
    )
