"""Decode a batch of MQTT messages into numpy columns per kind, rejecting what does not fit.

The hot path is: a cached topic lookup and one msgspec C call per message, then one
``attrgetter`` map per field per batch to build the columns. Only payloads that fail the typed
decode take the slow path (``_salvage``), which finds out exactly why and keeps the good
readings of a partly bad array.

Nothing a payload holds may raise here: integers are bounded to int64 by the types (the slow
path names a bigger one out_of_range), timestamps outside int64 nanoseconds become
bad_timestamp, and duplicate keys are found by counting (:mod:`cityflux.ingest.keys`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.config import IngestConfig
from cityflux.ingest import keys
from cityflux.ingest.timestamps import to_epoch_ns
from cityflux.ingest.topics import DeviceTopic, TopicParser, TopicRejection
from cityflux.model.columns import BOOL_ABSENT, Columns, Decoded, Rejection
from cityflux.model.contract import (
    KIND_FIELDS,
    LANE_FIELDS,
    MAX_LANES,
    READING_TYPES,
    STATUS_STATES,
    TRAFFIC_FIELDS,
    FieldSpec,
    Reason,
    StatusMessage,
)

# msgspec's words for a number outside its type: a float overflow (1e400), an integer outside
# the int64 bounds of the contract's types, or one too long for msgspec to read at all
_REASON_WORDS = (
    ("out of range", Reason.OUT_OF_RANGE),
    ("expected `int` <=", Reason.OUT_OF_RANGE),
    ("expected `int` >=", Reason.OUT_OF_RANGE),
)
_TIMESTAMP_PATHS = ("`$.ts`", "`$.ts_ns`")
NUMBER_OUT_OF_RANGE = object()  # what _generic_json returns for 1e400: JSON, but not a float


@dataclass(slots=True)
class _KindRows:
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


class BatchDecoder:
    """Turns ``(topics, payloads)`` into :class:`Decoded`; never raises on bad input."""

    def __init__(self, config: IngestConfig, topic_root: str) -> None:
        self.config = config
        self.topics = TopicParser(topic_root)
        self._typed = {
            kind: msgspec.json.Decoder(cls | list[cls])  # type: ignore[valid-type]
            for kind, cls in READING_TYPES.items()
        }
        self._one = {kind: msgspec.json.Decoder(cls) for kind, cls in READING_TYPES.items()}
        self._raw_list = msgspec.json.Decoder(list[msgspec.Raw])
        self._status = msgspec.json.Decoder(StatusMessage)

    # -- per batch -----------------------------------------------------------------------
    def decode(self, topics: Sequence[str], payloads: Sequence[bytes], now_ns: int) -> Decoded:
        rows: dict[str, _KindRows] = {kind: _KindRows() for kind in self._typed}
        rejections: list[Rejection] = []
        ignored = 0
        fast: list[bytes] = []  # payloads whose readings all decoded typed: checked by counting
        slow: set[int] = set()  # messages the slow path took: checked there, one by one
        parse, typed, limit = self.topics.parse, self._typed, self.config.max_payload_bytes
        for index, (topic, payload) in enumerate(zip(topics, payloads, strict=True)):
            parsed = parse(topic)
            # the fast path, inlined: a device topic, a payload of one valid reading
            if type(parsed) is DeviceTopic and not parsed.is_status and len(payload) <= limit:
                try:
                    value = typed[parsed.kind].decode(payload)
                except _DECODE_ERRORS:
                    slow.add(index)
                    self._salvage(parsed, payload, index, rows[parsed.kind], rejections)
                    continue
                if type(value) is list:
                    if self._add_array(parsed, value, index, rows[parsed.kind], rejections):
                        fast.append(payload)
                else:
                    kind_rows = rows[parsed.kind]
                    kind_rows.readings.append(value)
                    kind_rows.message_index.append(index)
                    kind_rows.reading_index.append(0)
                    kind_rows.topics.append(parsed)
                    fast.append(payload)
            elif parsed is None:
                ignored += 1
            else:
                self._decode_other(parsed, payload, index, rows, rejections)
        columns = {
            kind: _build_columns(kind, kind_rows, now_ns, rejections)
            for kind, kind_rows in rows.items()
            if kind_rows.readings
        }
        if fast:  # not one payload may hold a key twice (module keys)
            counts = _key_counts(rows)
            if not keys.cleared(b"".join(fast), keys.total(counts, slow)):
                found = keys.find_duplicates(payloads, counts, slow)
                columns, rejections = keys.drop_duplicates(columns, rejections, found)
        return Decoded(columns, rejections, ignored)

    def _decode_other(
        self,
        parsed: DeviceTopic | TopicRejection,
        payload: bytes,
        index: int,
        rows: dict[str, _KindRows],
        rejections: list[Rejection],
    ) -> None:
        """Bad topics, oversized payloads and status messages."""
        if isinstance(parsed, TopicRejection):
            rejections.append(Rejection(parsed.reason, parsed.message, index))
        elif len(payload) > self.config.max_payload_bytes:
            message = f"payload of {len(payload)} bytes exceeds {self.config.max_payload_bytes}"
            rejections.append(Rejection(Reason.TOO_LARGE, message, index))
        else:
            kind_rows = rows.setdefault("status", _KindRows())
            self._decode_status(parsed, payload, index, kind_rows, rejections)

    # -- per message ---------------------------------------------------------------------
    def _add_array(
        self,
        topic: DeviceTopic,
        value: list[Any],
        index: int,
        rows: _KindRows,
        rejections: list[Rejection],
    ) -> bool:
        if not self._array_size_ok(value, index, rejections):
            return False
        for position, reading in enumerate(value):
            rows.add(reading, index, position, topic)
        return True

    def _array_size_ok(self, value: list[Any], index: int, rejections: list[Rejection]) -> bool:
        limit = self.config.max_readings_per_message
        if not value:
            rejections.append(Rejection(Reason.SCHEMA, "empty array: no readings", index))
            return False
        if len(value) > limit:
            message = f"{len(value)} readings in one message exceed {limit}"
            rejections.append(Rejection(Reason.TOO_LARGE, message, index))
            return False
        return True

    def _salvage(
        self,
        topic: DeviceTopic,
        payload: bytes,
        index: int,
        rows: _KindRows,
        rejections: list[Rejection],
    ) -> None:
        """Slow path: say precisely why a payload failed, keep the good readings of an array."""
        generic = _generic_json(payload)
        if isinstance(generic, Rejection):
            rejections.append(Rejection(generic.reason, generic.message, index))
            return
        # an array with a number too large for a float is still an array: judge each reading
        is_array = isinstance(generic, list) or (
            generic is NUMBER_OUT_OF_RANGE and payload.lstrip().startswith(b"[")
        )
        if not is_array:
            rejections.append(self._explain(topic, payload, index, None))
            return
        elements = self._raw_list.decode(payload)
        if not self._array_size_ok(elements, index, rejections):
            return
        decoder = self._one[topic.kind]
        for position, element in enumerate(elements):
            try:
                reading = decoder.decode(element)
            except (msgspec.ValidationError, RecursionError):
                rejections.append(self._explain(topic, bytes(element), index, position))
                continue
            duplicate = keys.duplicate_key(bytes(element))
            if duplicate is not None:
                rejections.append(_duplicate_rejection(duplicate, index, position))
                continue
            rows.add(reading, index, position, topic)

    def _explain(
        self, topic: DeviceTopic, payload: bytes, index: int, position: int | None
    ) -> Rejection:
        try:
            self._one[topic.kind].decode(payload)
        except msgspec.ValidationError as exc:
            error = str(exc)
        except RecursionError:
            return Rejection(Reason.INVALID_JSON, "JSON nested too deeply", index, position)
        else:  # decodes alone: only the array wrapper was wrong
            error = "expected a reading object or an array of reading objects"
        for words, reason in _REASON_WORDS:
            if words in error.lower():
                if error.endswith(_TIMESTAMP_PATHS):  # ts = 10**5000: unreadable as a time
                    return Rejection(Reason.BAD_TIMESTAMP, error, index, position)
                return Rejection(reason, error, index, position)
        other = self._other_kind(topic.kind, payload) if "unknown field" in error else None
        if other is not None:
            message = f"payload is a {other} reading on a {topic.kind} topic"
            return Rejection(Reason.MISMATCH, message, index, position)
        return Rejection(Reason.SCHEMA, error, index, position)

    def _other_kind(self, kind: str, payload: bytes) -> str | None:
        for other, decoder in self._one.items():
            if other == kind:
                continue
            try:
                decoder.decode(payload)
            except _DECODE_ERRORS:
                continue
            return other
        return None

    def _decode_status(
        self,
        topic: DeviceTopic,
        payload: bytes,
        index: int,
        rows: _KindRows,
        rejections: list[Rejection],
    ) -> None:
        try:
            status = self._status.decode(payload)
        except _DECODE_ERRORS:
            generic = _generic_json(payload)
            if isinstance(generic, Rejection):
                rejections.append(Rejection(generic.reason, generic.message, index))
            else:
                message = 'status payload must be {"state": "online"|"offline", "ts": ...}'
                rejections.append(Rejection(Reason.SCHEMA, message, index))
            return
        if status.state not in STATUS_STATES:
            message = f"state {status.state!r} is not one of {', '.join(STATUS_STATES)}"
            rejections.append(Rejection(Reason.SCHEMA, message, index))
            return
        expected = 1 + (status.ts is not None) + (status.ts_ns is not None)
        if type(status.ts) is str:
            expected += status.ts.count(":")
        if not keys.cleared(payload, expected):
            duplicate = keys.duplicate_key(payload)
            if duplicate is not None:
                rejections.append(_duplicate_rejection(duplicate, index, None))
                return
        rows.add(status, index, 0, topic)


# msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 inside a string that
# a typed field reads, e.g. {"device_id": "\xff"}: the slow path then names it invalid_utf8.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)


def _generic_json(payload: bytes) -> Any:
    """The payload as untyped JSON, or the invalid_utf8 / invalid_json rejection it deserves."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(
            Reason.INVALID_UTF8, f"payload is not UTF-8: {exc.reason} at byte {exc.start}", -1
        )
    try:
        return msgspec.json.decode(payload)
    except msgspec.ValidationError:  # valid JSON, but a number too large for a float
        return NUMBER_OUT_OF_RANGE
    except msgspec.DecodeError as exc:
        return Rejection(Reason.INVALID_JSON, f"{exc} (NaN and Infinity are not JSON)", -1)
    except RecursionError:
        return Rejection(Reason.INVALID_JSON, "JSON nested too deeply", -1)


# -- columns ---------------------------------------------------------------------------------
def _build_columns(kind: str, rows: _KindRows, now_ns: int, rejections: list[Rejection]) -> Columns:
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
    rows: _KindRows,
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
def _key_counts(rows: dict[str, _KindRows]) -> list[keys.KeyCounts]:
    """Per reading kind: each row's message and the keys its reading holds."""
    return [
        (
            kind_rows.message_index,
            np.broadcast_to(np.asarray(kind_rows.keys, dtype=np.int64), (len(kind_rows.readings),)),
        )
        for kind, kind_rows in rows.items()
        if kind != "status" and kind_rows.readings
    ]


def _duplicate_rejection(key: str, index: int, position: int | None) -> Rejection:
    return Rejection(Reason.SCHEMA, f"duplicate key {key}", index, position)
