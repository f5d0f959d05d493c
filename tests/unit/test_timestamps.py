from __future__ import annotations

import numpy as np
import pytest

from cityflux.ingest.timestamps import MISSING, UNREPRESENTABLE, parse_rfc3339, to_epoch_ns

EPOCH_2026 = 1_767_225_600  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-01T00:00:00Z", EPOCH_2026 * 10**9),
        ("2026-01-01T00:00:00.5Z", EPOCH_2026 * 10**9 + 500_000_000),
        ("2026-01-01T00:00:00.123456789Z", EPOCH_2026 * 10**9 + 123_456_789),
        ("2026-01-01T08:00:00.000000001+08:00", EPOCH_2026 * 10**9 + 1),
        ("2025-12-31T19:00:00-05:00", EPOCH_2026 * 10**9),
        ("2026-01-01 00:00:00z", EPOCH_2026 * 10**9),
    ],
)
def test_rfc3339_is_exact_to_the_nanosecond(text: str, expected: int) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "yesterday",
        "2026-01-01",
        "2026-01-01T00:00:00",
        "2026-13-01T00:00:00Z",
        "2026-01-01T00:00:00.1234567890Z",
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
    ],
)
def test_rfc3339_refuses_what_is_not(text: str) -> None:
    assert parse_rfc3339(text) is None


def test_integer_milliseconds_fast_path_is_exact() -> None:
    ts = [1_795_570_800_123, 1_795_570_800_124]
    assert to_epoch_ns(ts, [None, None]).tolist() == [
        1_795_570_800_123_000_000,
        1_795_570_800_124_000_000,
    ]


def test_mixed_forms_and_the_missing_marker() -> None:
    result = to_epoch_ns(
        [1, "2026-01-01T00:00:00Z", None, 5, None, 2**62],
        [None, None, 7, 9, None, None],
        default_ns=None,
    )
    assert result.dtype == np.int64
    assert result.tolist() == [
        1_000_000,
        EPOCH_2026 * 10**9,
        7,
        int(MISSING),
        int(MISSING),
        int(UNREPRESENTABLE),
    ]  # both ts and ts_ns is ambiguous; none is missing; 2**62 ms overflows int64 ns


def test_default_for_status_messages() -> None:
    assert to_epoch_ns([None], [None], default_ns=42).tolist() == [42]


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("ts", "ts_ns", "expected"),
    [
        ("2262-04-11T23:47:16.854775807Z", None, INT64_MAX),  # the last storable instant
        ("2262-04-11T23:47:16.854775808Z", None, int(UNREPRESENTABLE)),
        ("1677-09-21T00:12:43.145224194Z", None, -(2**63) + 2),  # the first, above the markers
        ("1677-09-21T00:12:43.145224193Z", None, int(UNREPRESENTABLE)),
        ("9999-12-31T23:59:59Z", None, int(UNREPRESENTABLE)),
        ("0001-01-01T00:00:00Z", None, int(UNREPRESENTABLE)),
        ("0000-01-01T00:00:00Z", None, int(MISSING)),  # no year 0: unreadable
        (None, INT64_MAX, INT64_MAX),
        (None, 2**63, int(UNREPRESENTABLE)),
        (None, -(2**63), int(UNREPRESENTABLE)),  # would read as the missing marker
        (None, -(2**63) - 1, int(UNREPRESENTABLE)),
        (None, 10**400, int(UNREPRESENTABLE)),
        (INT64_MAX, None, int(UNREPRESENTABLE)),  # milliseconds
        (2**63, None, int(UNREPRESENTABLE)),
        (-(2**63) - 1, None, int(UNREPRESENTABLE)),
        (-(10**400), None, int(UNREPRESENTABLE)),
        (INT64_MAX // 1_000_000, None, INT64_MAX // 1_000_000 * 1_000_000),
        (-1, None, -1_000_000),  # before 1970 is a time; validation says it is too old
    ],
)
def test_what_int64_nanoseconds_cannot_hold_is_marked_never_raised(
    ts: int | str | None, ts_ns: int | None, expected: int
) -> None:
    alone = to_epoch_ns([ts], [ts_ns])
    assert alone.tolist() == [expected]
    # the same among ordinary readings, on the vectorised path where it applies
    mixed = to_epoch_ns([1_000, ts, 2_000], [None, ts_ns, None])
    assert mixed.tolist() == [1_000_000_000, expected, 2_000_000_000]
