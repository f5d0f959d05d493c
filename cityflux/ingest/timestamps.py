"""Timestamps to integer epoch nanoseconds, exactly: no float ever touches them.

The contract allows ``ts`` as an integer (epoch milliseconds) or an RFC 3339 string with up to
nine fractional digits, and ``ts_ns`` as integer epoch nanoseconds.
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
_INT64_MAX: Final = np.iinfo(np.int64).max
_NS_PER_MS: Final = 1_000_000

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


def _one(ts: int | str | None, ts_ns: int | None, default_ns: int | None) -> int:
    if ts_ns is not None:
        return ts_ns if ts is None and -_INT64_MAX <= ts_ns <= _INT64_MAX else int(MISSING)
    if isinstance(ts, int):
        ns = ts * _NS_PER_MS
        return ns if -_INT64_MAX <= ns <= _INT64_MAX else int(MISSING)
    if isinstance(ts, str):
        parsed = parse_rfc3339(ts)
        return int(MISSING) if parsed is None else parsed
    return int(MISSING) if default_ns is None else default_ns


def to_epoch_ns(
    ts: Sequence[int | str | None],
    ts_ns: Sequence[int | None],
    default_ns: int | None = None,
) -> npt.NDArray[np.int64]:
    """Column of epoch nanoseconds; MISSING where absent, both given, or unreadable.

    The common case (every reading has an integer ``ts`` in ms) is one vectorised multiply.
    """
    if ts and all(v is None for v in ts_ns) and all(type(v) is int for v in ts):
        millis = np.array(ts, dtype=object if _too_big(ts) else np.int64)
        if millis.dtype == np.int64:
            return millis * _NS_PER_MS
    return np.fromiter(
        (_one(a, b, default_ns) for a, b in zip(ts, ts_ns, strict=True)),
        dtype=np.int64,
        count=len(ts),
    )


def _too_big(values: Sequence[int | str | None]) -> bool:
    """Any millisecond value whose nanoseconds would not fit in int64."""
    limit = _INT64_MAX // _NS_PER_MS
    return any(isinstance(v, int) and not -limit <= v <= limit for v in values)
