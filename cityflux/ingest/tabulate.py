"""Readings -> numpy columns per kind: one ``attrgetter`` map per field per batch.

The second half of decoding (:mod:`cityflux.ingest.decode` turns payloads into typed readings):
timestamps, the optional ``device_id``/``kind`` claims, one row per lane for traffic, and the
keys each reading holds (for the duplicate-key count, :mod:`cityflux.ingest.keys`). Rows that
break a rule are rejected here, each with its message and reading index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.ingest import keys
from cityflux.ingest.timestamps import to_epoch_ns
from cityflux.ingest.topics import DeviceTopic
from cityflux.model.columns import BOOL_ABSENT, Columns, Rejection
from cityflux.model.contract import (
    KIND_FIELDS,
    LANE_FIELDS,
    MAX_LANES,
    TRAFFIC_FIELDS,
    FieldSpec,
    Reason,
)


@dataclass(slots=True)
class KindRows:
    """Readings of one kind gathered during the per-message loop."""

    readings: list[Any] = field(default_factory=list)
    message_index: list[int] = field(default_factory=list)
    reading_index: list[int] = field(default_factory=list)
    topics: list[DeviceTopic] = field(default_factory=list)
    # keys present per reading (see cityflux.ingest.keys), filled while building columns
    keys: npt.NDArray[np.int64] | int = 0

    def add(self, reading: Any, index: int, position: int, topic: DeviceTopic) -> None:
        self.readings.append(reading)
        self.message_index.append(index)
        self.reading_index.append(position)
        self.topics.append(topic)


# -- columns ---------------------------------------------------------------------------------
def build_columns(kind: str, rows: KindRows, now_ns: int, rejections: list[Rejection]) -> Columns:
    readings = rows.readings
    ts = list(map(attrgetter("ts"), readings))
    ts_given = list(map(attrgetter("ts_ns"), readings))
    ts_ns = to_epoch_ns(
        ts,
        ts_given,
        default_ns=now_ns if kind == "status" else None,  # a will has no clock
    )
    columns = Columns(
        kind=kind,
        tags={
            "district": np.array([t.district for t in rows.topics], dtype=object),
            "device_id": np.array([t.device_id for t in rows.topics], dtype=object),
        },
        fields={},
        ts_ns=ts_ns,
        message_index=np.array(rows.message_index, dtype=np.int32),
        reading_index=np.array(rows.reading_index, dtype=np.int32),
        group=np.arange(len(readings), dtype=np.int32),
    )
    if kind == "status":
        columns.tags["kind"] = np.array([t.kind for t in rows.topics], dtype=object)
        columns.fields["online"] = np.array([s.state == "online" for s in readings], dtype=np.int8)
        return columns
    claimed_ids = list(map(attrgetter("device_id"), readings))
    claimed_kinds = list(map(attrgetter("kind"), readings))
    rows.keys = _string_keys(ts) + keys.present(ts_given) + _string_keys(claimed_ids)
    rows.keys = rows.keys + _string_keys(claimed_kinds)
    keep = _claims_match(kind, claimed_ids, claimed_kinds, rows.topics, columns, rejections)
    if kind == "traffic":
        return _traffic_columns(readings, columns, keep, rejections, rows)
    for spec in KIND_FIELDS[kind]:
        columns.fields[spec.name] = _column(spec, list(map(attrgetter(spec.name), readings)))
    present = _present_fields(columns)
    rows.keys = rows.keys + present
    keep &= _has_measurements(columns, present, keep, rejections)
    return columns.select(keep)


def _string_keys(values: list[Any]) -> npt.NDArray[np.int64] | int:
    """Keys of a column of optional strings, plus the colons inside them (module keys)."""
    given = keys.present(values)
    return given if type(given) is int and given == 0 else given + keys.string_colons(values)


def _column(spec: FieldSpec, values: list[Any]) -> npt.NDArray[Any]:
    if spec.type == "float":
        return np.array(values, dtype=np.float64)  # None becomes NaN
    if spec.type == "bool":
        return np.fromiter(
            (BOOL_ABSENT if value is None else value for value in values), np.int8, len(values)
        )
    return np.array(values, dtype=np.int64)


def _reject_rows(
    columns: Columns,
    bad: npt.NDArray[np.bool_],
    reason: Reason,
    message: str,
    rejections: list[Rejection],
) -> None:
    for row in np.flatnonzero(bad).tolist():
        rejections.append(
            Rejection(
                reason, message, int(columns.message_index[row]), int(columns.reading_index[row])
            )
        )


def _claims_match(
    kind: str,
    claimed_ids: list[str | None],
    claimed_kinds: list[str | None],
    topics: list[DeviceTopic],
    columns: Columns,
    rejections: list[Rejection],
) -> npt.NDArray[np.bool_]:
    """Rows whose optional ``device_id``/``kind`` claims agree with their topic."""
    size = len(topics)
    keep = np.ones(size, dtype=np.bool_)
    if claimed_ids.count(None) == size and claimed_kinds.count(None) == size:
        return keep  # the usual case: nothing claimed, nothing to compare
    for row, topic in enumerate(topics):
        claimed_id, claimed_kind = claimed_ids[row], claimed_kinds[row]
        if (claimed_id is None or claimed_id == topic.device_id) and (
            claimed_kind is None or claimed_kind == kind
        ):
            continue
        keep[row] = False
        message = (
            f"payload says device_id={claimed_id!r} kind={claimed_kind!r}, topic says "
            f"device_id={topic.device_id!r} kind={kind!r}"
        )
        rejections.append(
            Rejection(
                Reason.MISMATCH,
                message,
                int(columns.message_index[row]),
                int(columns.reading_index[row]),
            )
        )
    return keep


def _present_fields(columns: Columns) -> npt.NDArray[np.int64]:
    """Measurement fields each row carries (None became NaN or BOOL_ABSENT)."""
    present = np.zeros(len(columns), dtype=np.int64)
    for column in columns.fields.values():
        present += (column != BOOL_ABSENT) if column.dtype == np.int8 else ~np.isnan(column)
    return present


def _has_measurements(
    columns: Columns,
    present: npt.NDArray[np.int64],
    keep: npt.NDArray[np.bool_],
    rejections: list[Rejection],
) -> npt.NDArray[np.bool_]:
    """Rows with at least one measurement; an empty row already rejected (``keep`` False,
    e.g. a mismatched claim) is not rejected a second time: one dead letter per reading."""
    empty: npt.NDArray[np.bool_] = present == 0
    message = "reading carries no measurement field"
    _reject_rows(columns, empty & keep, Reason.SCHEMA, message, rejections)
    return ~empty


def _traffic_columns(
    readings: list[Any],
    columns: Columns,
    keep: npt.NDArray[np.bool_],
    rejections: list[Rejection],
    rows: KindRows,
) -> Columns:
    """One row per lane; a reading with no lanes or repeated lanes is rejected whole."""
    lane_counts = np.array([len(r.lanes) for r in readings], dtype=np.int64)
    for row, reading in enumerate(readings):
        lanes = reading.lanes
        problem = None
        if not lanes:
            problem = "lanes is empty"
        elif len(lanes) > MAX_LANES:
            problem = f"{len(lanes)} lanes exceed {MAX_LANES}"
        elif len({lane.lane for lane in lanes}) != len(lanes):
            problem = "a lane number appears twice"
        if problem is not None and keep[row]:
            keep[row] = False
            rejections.append(
                Rejection(
                    Reason.SCHEMA,
                    problem,
                    int(columns.message_index[row]),
                    int(columns.reading_index[row]),
                )
            )
    # every lane of every reading, rejected ones too (their keys are counted), then the kept
    lanes_flat = [lane for reading in readings for lane in reading.lanes]

    def repeat(column: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.repeat(column, lane_counts)

    fields: dict[str, npt.NDArray[Any]] = {
        spec.name: repeat(_column(spec, list(map(attrgetter(spec.name), readings))))
        for spec in TRAFFIC_FIELDS
    }
    for spec in LANE_FIELDS:
        fields[spec.name] = _column(spec, list(map(attrgetter(spec.name), lanes_flat)))
    # keys: interval_s and lanes; per lane its three required fields, and speed_kmh if given
    lane_keys = 3 + (~np.isnan(fields["speed_kmh"])).astype(np.int64)
    owner = np.repeat(np.arange(len(readings)), lane_counts)
    per_reading = np.bincount(owner, weights=lane_keys, minlength=len(readings))
    rows.keys = rows.keys + 2 + per_reading.astype(np.int64)
    columns = Columns(
        kind="traffic",
        tags={name: repeat(column) for name, column in columns.tags.items()},
        fields=fields,
        ts_ns=repeat(columns.ts_ns),
        message_index=repeat(columns.message_index),
        reading_index=repeat(columns.reading_index),
        group=repeat(columns.group),
    )
    return columns if keep.all() else columns.select(repeat(keep))


# -- duplicate keys (module keys) -------------------------------------------------------------
def key_counts(rows: dict[str, KindRows]) -> list[keys.KeyCounts]:
    """Per reading kind: each row's message and the keys its reading holds."""
    return [
        (
            kind_rows.message_index,
            np.broadcast_to(np.asarray(kind_rows.keys, dtype=np.int64), (len(kind_rows.readings),)),
        )
        for kind, kind_rows in rows.items()
        if kind != "status" and kind_rows.readings
    ]
