"""InfluxDB line protocol: escaping, single points, whole columnar batches, and the analytics'
result tables (model.points).

Escaping rules (https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/):
measurement names escape comma and space; tag keys, tag values and field keys escape comma,
equals sign and space; string field values escape backslash and double quote. Tag values cannot
hold a newline at all (there is no escape for it), so the escaper refuses them; cityflux's own
tags are ids from a strict charset, and free text goes into string fields.

String fields carry text a device chose (an unknown key named in a dead letter's message, a
payload excerpt), so a raw line feed or carriage return must never reach the body: InfluxDB
reads one inside quotes, but VictoriaMetrics (and other parsers) split lines on every line feed,
and the rest of the point becomes a bad line of its own. Each is written as a backslash
followed by ``n`` or ``r``; InfluxDB keeps a backslash before anything but a double quote or a
backslash as it is, so the stored text shows where the line breaks were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from cityflux.model.columns import BOOL_ABSENT, Columns
from cityflux.model.points import FieldValue, Point, Result, Table
from cityflux.store.schema import MEASUREMENTS

_MEASUREMENT: Final = str.maketrans({",": r"\,", " ": r"\ "})
_KEY: Final = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING: Final = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def _no_newline(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} cannot contain a newline: {text!r}")
    if not text:
        raise ValueError(f"{what} cannot be empty")
    if text.endswith("\\"):
        raise ValueError(f"{what} cannot end with a backslash: {text!r}")
    return text


def escape_measurement(name: str) -> str:
    return _no_newline(name, "measurement").translate(_MEASUREMENT)


def escape_key(key: str) -> str:
    """Tag keys, tag values and field keys."""
    return _no_newline(key, "tag or field key/value").translate(_KEY)


def escape_string_field(value: str) -> str:
    return '"' + value.translate(_STRING) + '"'


def format_field(value: FieldValue) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"InfluxDB cannot store {value!r}")
        return repr(value)
    return escape_string_field(value)


def encode_point(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    ts_ns: int,
) -> str:
    """One line. Tags are sorted by key (InfluxDB's preferred order); empty tags are dropped."""
    if not fields:
        raise ValueError("a point needs at least one field")
    tag_part = "".join(
        f",{escape_key(key)}={escape_key(value)}" for key, value in sorted(tags.items()) if value
    )
    field_part = ",".join(f"{escape_key(k)}={format_field(v)}" for k, v in fields.items())
    return f"{escape_measurement(measurement)}{tag_part} {field_part} {int(ts_ns)}"


def point_line(point: Point) -> str:
    """:func:`encode_point` of a :class:`Point`."""
    return encode_point(point.measurement, point.tags, point.fields, point.ts_ns)


# -- columnar batches -------------------------------------------------------------------------
def series_prefixes(measurement: str, tags: Mapping[str, Sequence[str]]) -> list[str]:
    """``measurement,tag=value,...`` per row (tags sorted, empty values dropped). Results of
    the same entities repeat every window: callers cache these."""
    names = sorted(tags)
    return [
        escape_measurement(measurement)
        + "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in zip(names, row, strict=True) if v)
        for row in zip(*(tags[k] for k in names), strict=True)
    ]


def encode_table(
    prefixes: Sequence[str], fields: Mapping[str, npt.NDArray[Any]], ts_ns: int
) -> list[str]:
    """One line per row of a table of results (analytics output), given each row's series
    prefix; rows with no field present are skipped, NaN fields are left out. Column at a
    time, as :class:`BatchEncoder` (defined below; called at run time)."""
    rows = len(prefixes)
    if not rows:
        return []
    lines = _Lines(rows)
    lines.add(list(prefixes))
    seen: bool | npt.NDArray[np.bool_] = False
    for name, column in fields.items():
        seen = BatchEncoder._add_field(lines, escape_key(name), column, seen)
    if seen is False:
        return []  # no row holds a field
    lines.add(f" {int(ts_ns)}")
    written = lines.join()
    if seen is True:
        return written
    return list(compress(written, seen.tolist()))


class TableEncoder:
    """Analytics results (:class:`Table`, :class:`Point`) as lines. The series prefixes of a
    table's fixed tag set are built once, keyed by its measurement and ``series``, and the
    table's row selection is applied to the cached prefixes each time."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], tuple[npt.NDArray[np.object_], list[str]]] = {}

    def prefixes(self, table: Table) -> list[str]:
        """The series prefix of each selected row of ``table``."""
        key = (table.measurement, table.series)
        cached = self._series.get(key)
        rows = len(next(iter(table.tags.values()), ()))
        if cached is None or len(cached[1]) != rows:  # a new set, or another map's: rebuilt
            built = series_prefixes(table.measurement, table.tags)
            cached = self._series[key] = (np.array(built, dtype=object), built)
        if table.rows is None:
            return cached[1]
        selected: list[str] = cached[0][table.rows].tolist()
        return selected

    def encode_table(self, table: Table) -> list[str]:
        return encode_table(self.prefixes(table), table.fields, table.ts_ns)

    def encode(self, results: Iterable[Result]) -> list[str]:
        """Tables and points, in their order."""
        lines: list[str] = []
        for item in results:
            if isinstance(item, Point):
                lines.append(point_line(item))
            else:
                lines += self.encode_table(item)
        return lines


# -- columnar batches, a column at a time -------------------------------------------------------
# msgspec writes numbers in C: ints as str() does, floats in the shortest round-trip digits as
# repr() does. Only the notation differs, outside repr's positional range [1e-4, 1e16) (repr:
# 1e-05, 1e+16; JSON: 0.00001, 1e16) and for inf/nan (JSON null): those values go through repr.
_NUMBERS: Final = msgspec.json.Encoder()
_POSITIONAL_LOW: Final = 1e-4
_POSITIONAL_HIGH: Final = 1e16
# a tag value holding none of these, and not empty, is its own escaped form
_TAG_SPECIAL: Final = (",", "=", " ", "\n", "\r", "\\")
_BOOL_TEXT: Final = np.array(["false", "true", ""], dtype=object)  # index -1: BOOL_ABSENT


def number_text(column: npt.NDArray[Any]) -> list[str]:
    """``str()`` of each value of an int column, ``repr()`` of each of a float64 column ("null"
    for NaN), without a Python call per value."""
    if not len(column):
        return []
    text = _NUMBERS.encode(column.tolist()).decode()[1:-1].split(",")
    if column.dtype == np.float64:
        magnitude = np.abs(column)
        positional = (magnitude < _POSITIONAL_HIGH) & (
            (magnitude >= _POSITIONAL_LOW) | (magnitude == 0)
        )
        for row in np.flatnonzero(~positional & ~np.isnan(column)).tolist():
            text[row] = repr(float(column[row]))
    return text


def _tag_text(column: npt.NDArray[Any], from_field: bool) -> list[str]:
    """Escaped tag values; a tag column taken from a field is written as ``str()`` of it."""
    if not from_field:
        values: list[str] = column.tolist()
    elif column.dtype.kind in "iu":
        values = number_text(column)
    else:
        values = list(map(str, column.tolist()))
    joined = "".join(values)  # one scan instead of one check per value
    if "" in values or any(special in joined for special in _TAG_SPECIAL):
        return list(map(escape_key, values))  # escapes, or refuses what cannot be expressed
    return values


Part = str | list[str] | npt.NDArray[np.object_]


Present = npt.NDArray[np.bool_] | None  # rows holding a value; None: every row


def _field_text(column: npt.NDArray[Any]) -> tuple[Part, Present, str]:
    """Each row's value as text ('' where absent), which rows hold one, and the suffix after
    the value (absent: NaN, -1 bool, empty string)."""
    if column.dtype == np.bool_:
        return _BOOL_TEXT[column.astype(np.intp)], None, ""
    if column.dtype == object or column.dtype.kind == "U":  # free text: no fast path needed
        values = column.tolist()
        written = [escape_string_field(str(v)) if v else "" for v in values]
        return written, np.array([bool(v) for v in values], dtype=np.bool_), ""
    if column.dtype == np.float64:
        return (*_float_text(column), "")
    if column.dtype == np.int8:
        return (*_bool_text(column), "")
    text = number_text(column) if column.dtype.kind in "iu" else list(map(str, column.tolist()))
    return text, None, "i"


def _float_text(column: npt.NDArray[np.float64]) -> tuple[Part, Present]:
    present = ~np.isnan(column)
    text = number_text(column)
    if present.all():
        return text, None
    absent_blank = np.array(text, dtype=object)
    absent_blank[~present] = ""
    return absent_blank, present


def _bool_text(column: npt.NDArray[np.int8]) -> tuple[Part, Present]:
    if len(column) and (column.min() < BOOL_ABSENT or column.max() > 1):  # was a KeyError
        raise ValueError(f"a bool column holds {column.min()}..{column.max()}")
    present = column != BOOL_ABSENT
    return _BOOL_TEXT[column.astype(np.intp)], None if present.all() else present


class _Lines:
    """The parts of every row's line, column by column: constants (one str for all rows) and
    per-row text. Each line is one ``str.join`` called from C (map over zip), no Python code
    per row or value."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.parts: list[Part] = []

    def add(self, part: Part) -> None:
        if isinstance(part, str) and self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += part  # adjacent constants are one part
        else:
            self.parts.append(part)

    def join(self) -> list[str]:
        columns = [
            repeat(part, self.rows)
            if isinstance(part, str)
            else part.tolist()
            if isinstance(part, np.ndarray)
            else part
            for part in self.parts
        ]
        return list(map("".join, zip(*columns, strict=True)))


class BatchEncoder:
    """Encodes :class:`Columns` to line protocol a column at a time (issue 11): numbers are
    written by C code (msgspec), bools and separators by numpy lookups, and the batch is
    joined in one call; no Python code runs per value (only per rare float outside repr's
    positional range, and per string field). Output is byte-identical to the per-value encoder
    it replaced (tests/unit/test_lineprotocol_identity.py)."""

    def encode(self, columns: Columns) -> list[str]:
        rows = len(columns)
        if not rows:
            return []
        schema = MEASUREMENTS[columns.kind]
        lines = _Lines(rows)
        lines.add(escape_measurement(schema.measurement))
        tags = {name: (columns.tags[name], False) for name in schema.tags}
        tags |= {name: (columns.fields[name], True) for name in schema.field_tags}
        for name in sorted(tags):
            lines.add(f",{escape_key(name)}=")
            lines.add(_tag_text(*tags[name]))
        # rows that already hold a field: the next field follows a comma, else the space
        seen: bool | npt.NDArray[np.bool_] = False
        for name, column in columns.fields.items():
            if name not in schema.field_tags:
                seen = self._add_field(lines, escape_key(name), column, seen)
        if isinstance(seen, bool):
            lines.add(" " if seen else "  ")
        else:  # a row with no field at all was written "prefix  ts"
            lines.add(np.array(["  ", " "], dtype=object)[seen.astype(np.intp)])
        lines.add(number_text(columns.ts_ns))
        return lines.join()

    @staticmethod
    def _add_field(
        lines: _Lines, key: str, column: npt.NDArray[Any], seen: bool | npt.NDArray[np.bool_]
    ) -> bool | npt.NDArray[np.bool_]:
        text, present, suffix = _field_text(column)
        first, after = f" {key}=", f",{key}="
        if present is not None and not present.any():
            return seen  # absent in every row: nothing written
        if present is None and isinstance(seen, bool):
            lines.add(after if seen else first)
        else:  # choices[2 * present + seen]
            choices = np.array(["", "", first, after], dtype=object)
            index = (2 if present is None else 2 * present.astype(np.intp)) + np.asarray(seen)
            lines.add(choices[index])
        lines.add(text)
        if suffix:
            lines.add(suffix)
        if present is None:
            return True
        merged = present | seen
        return True if merged.all() else merged
