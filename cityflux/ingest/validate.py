"""Range and timestamp checks on whole columns at once.

A reading fails as a whole: if one lane of a traffic reading is out of range, every lane of that
reading is rejected (a partial interval would bias the indices downstream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cityflux.config import IngestConfig
from cityflux.ingest.timestamps import MISSING, UNREPRESENTABLE
from cityflux.model.columns import Columns, Rejection
from cityflux.model.contract import KIND_FIELDS, MAX_VEHICLES_PER_LANE_SECOND, FieldSpec, Reason
from cityflux.model.units import NS


@dataclass(frozen=True, slots=True)
class _Check:
    reason: Reason
    bad: npt.NDArray[np.bool_]
    describe: Callable[[int], str]  # the message for a failing row


def validate(
    columns: Columns, config: IngestConfig, now_ns: int
) -> tuple[Columns, list[Rejection]]:
    """The rows that pass, and one rejection per failing reading (its first failed check)."""
    checks = [_timestamp_check(columns, config, now_ns)]
    if columns.kind != "status":
        checks += [_range_check(spec, columns) for spec in KIND_FIELDS[columns.kind]]
    if columns.kind == "traffic":
        checks.append(_count_check(columns))
    failed = np.zeros(len(columns), dtype=np.bool_)
    rejections: list[Rejection] = []
    for check in checks:
        new = check.bad & ~failed
        for row in np.flatnonzero(new).tolist():
            rejections.append(_rejection(columns, row, check))
        failed |= check.bad
    if not failed.any():
        return columns, rejections
    # widen to whole readings: any failed row fails its group
    failed_groups = np.unique(columns.group[failed])
    failed_reading = np.isin(columns.group, failed_groups)
    return columns.select(~failed_reading), _one_per_reading(rejections)


def _rejection(columns: Columns, row: int, check: _Check) -> Rejection:
    return Rejection(
        check.reason,
        check.describe(row),
        int(columns.message_index[row]),
        int(columns.reading_index[row]),
    )


def _one_per_reading(rejections: list[Rejection]) -> list[Rejection]:
    seen: set[tuple[int, int | None]] = set()
    unique = []
    for rejection in rejections:
        key = (rejection.index, rejection.reading)
        if key not in seen:
            seen.add(key)
            unique.append(rejection)
    return unique


def _timestamp_check(columns: Columns, config: IngestConfig, now_ns: int) -> _Check:
    ts = columns.ts_ns
    earliest = now_ns - config.max_past_s * NS
    latest = now_ns + config.max_future_s * NS
    bad = (ts == MISSING) | (ts < earliest) | (ts > latest)
    window = f"[now - {config.max_past_s} s, now + {config.max_future_s} s]"

    def describe(row: int) -> str:
        if ts[row] == MISSING:
            return "timestamp missing or unreadable: give ts (epoch ms or RFC 3339) or ts_ns"
        if ts[row] == UNREPRESENTABLE:
            return f"timestamp outside what int64 ns hold (1677 to 2262), so outside {window}"
        return f"timestamp {int(ts[row])} ns is outside {window}"

    return _Check(Reason.BAD_TIMESTAMP, bad, describe)


def _range_check(spec: FieldSpec, columns: Columns) -> _Check:
    column = columns.fields[spec.name]
    low, high = spec.low, spec.high
    if spec.type == "bool" or low is None or high is None:
        return _Check(Reason.OUT_OF_RANGE, np.zeros(len(column), np.bool_), str)
    with np.errstate(invalid="ignore"):  # NaN (absent) compares False: absent is in range
        bad = (column < low) | (column > high)

    def describe(row: int) -> str:
        value = column[row].item()
        return f"{spec.name}={value} outside [{low:g}, {high:g}] {spec.unit}"

    return _Check(Reason.OUT_OF_RANGE, bad, describe)


def _count_check(columns: Columns) -> _Check:
    limit = columns.fields["interval_s"] * MAX_VEHICLES_PER_LANE_SECOND
    bad = columns.fields["count"] > limit
    count, interval = columns.fields["count"], columns.fields["interval_s"]

    def describe(row: int) -> str:
        return (
            f"count={int(count[row])} exceeds {MAX_VEHICLES_PER_LANE_SECOND:g} vehicle per "
            f"second per lane over interval_s={int(interval[row])}"
        )

    return _Check(Reason.OUT_OF_RANGE, bad, describe)
