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

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, cast

import msgspec
import numpy as np

from cityflux.config import IngestConfig
from cityflux.ingest import keys
from cityflux.ingest.tabulate import KindRows, build_columns, key_counts
from cityflux.ingest.topics import KIND_CODES, DeviceTopic, TopicParser, TopicRejection
from cityflux.model.columns import Decoded, Rejection
from cityflux.model.contract import (
    READING_TYPES,
    STATUS_STATES,
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
        rows: dict[str, KindRows] = {kind: KindRows() for kind in self._typed}
        rejections: list[Rejection] = []
        fast: list[bytes] = []  # payloads whose readings all decoded typed: checked by counting
        slow: set[int] = set()  # messages the slow path took: checked there, one by one
        rest = self._decode_by_kind(topics, payloads, rows, fast)
        ignored = self._decode_each(topics, payloads, rest, rows, rejections, fast, slow)
        columns = {
            kind: build_columns(kind, kind_rows, now_ns, rejections)
            for kind, kind_rows in rows.items()
            if kind_rows.readings
        }
        if fast:  # not one payload may hold a key twice (module keys)
            counts = key_counts(rows)
            if not keys.cleared(b"".join(fast), keys.total(counts, slow)):
                found = keys.find_duplicates(payloads, counts, slow)
                columns, rejections = keys.drop_duplicates(columns, rejections, found)
        return Decoded(columns, rejections, ignored)

    def _decode_by_kind(
        self,
        topics: Sequence[str],
        payloads: Sequence[bytes],
        rows: dict[str, KindRows],
        fast: list[bytes],
    ) -> list[int]:
        """The usual batch at C speed: each kind's messages decoded by one ``map`` of its
        msgspec decoder. A kind holding anything unusual (an array, a status, a payload that
        fails to decode, an oversized one) is left whole to the per-message loop, so that its
        rows stay in message order; the messages left, in order, are returned."""
        codes = self.topics.kind_codes(topics)
        left = np.ones(len(codes), dtype=np.bool_)
        for kind, code in KIND_CODES.items():
            chosen = np.flatnonzero(codes == code).tolist()
            if not chosen:
                continue
            pick = _picker(chosen)
            kind_payloads: tuple[bytes, ...] = pick(payloads)
            if max(map(len, kind_payloads)) > self.config.max_payload_bytes:
                continue
            try:
                readings = list(map(self._one[kind].decode, kind_payloads))
            except _DECODE_ERRORS:
                continue  # the per-message loop finds which and why
            # a kind code says each of these topics is a DeviceTopic of this kind
            device_topics = cast(list[DeviceTopic], self.topics.parse_all(pick(topics)))
            rows[kind] = KindRows(readings, chosen, [0] * len(chosen), device_topics)
            fast.extend(kind_payloads)
            left[chosen] = False
        return np.flatnonzero(left).tolist()

    def _decode_each(
        self,
        topics: Sequence[str],
        payloads: Sequence[bytes],
        indices: list[int],
        rows: dict[str, KindRows],
        rejections: list[Rejection],
        fast: list[bytes],
        slow: set[int],
    ) -> int:
        """One message at a time; how many were cityflux's own (ignored)."""
        ignored = 0
        parse, typed, limit = self.topics.parse, self._typed, self.config.max_payload_bytes
        for index in indices:
            topic, payload = topics[index], payloads[index]
            parsed = parse(topic)
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
                    rows[parsed.kind].add(value, index, 0, parsed)
                    fast.append(payload)
            elif parsed is None:
                ignored += 1
            else:
                self._decode_other(parsed, payload, index, rows, rejections)
        return ignored

    def _decode_other(
        self,
        parsed: DeviceTopic | TopicRejection,
        payload: bytes,
        index: int,
        rows: dict[str, KindRows],
        rejections: list[Rejection],
    ) -> None:
        """Bad topics, oversized payloads and status messages."""
        if isinstance(parsed, TopicRejection):
            rejections.append(Rejection(parsed.reason, parsed.message, index))
        elif len(payload) > self.config.max_payload_bytes:
            message = f"payload of {len(payload)} bytes exceeds {self.config.max_payload_bytes}"
            rejections.append(Rejection(Reason.TOO_LARGE, message, index))
        else:
            kind_rows = rows.setdefault("status", KindRows())
            self._decode_status(parsed, payload, index, kind_rows, rejections)

    # -- per message ---------------------------------------------------------------------
    def _add_array(
        self,
        topic: DeviceTopic,
        value: list[Any],
        index: int,
        rows: KindRows,
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
        rows: KindRows,
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
        rows: KindRows,
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


def _picker(indices: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """The items at ``indices``, picked in C (``itemgetter``), always as a tuple (itemgetter of
    one index returns the bare item)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda sequence: (sequence[index],)
    getter: Any = itemgetter  # mypy 2.4 crashes inferring itemgetter(*list[int])
    picker: Callable[[Sequence[Any]], tuple[Any, ...]] = getter(*indices)
    return picker


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


def _duplicate_rejection(key: str, index: int, position: int | None) -> Rejection:
    return Rejection(Reason.SCHEMA, f"duplicate key {key}", index, position)
