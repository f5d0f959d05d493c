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
from typing import Any, Final

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
def _fragments(key: str, column: npt.NDArray[Any]) -> list[str]:
    """``key=value`` per row, '' where the value is absent (NaN, -1 bool, empty string)."""
    if column.dtype == np.bool_:
        return [f"{key}=true" if value else f"{key}=false" for value in column.tolist()]
    if column.dtype == object or column.dtype.kind == "U":
        return [f"{key}={escape_string_field(str(v))}" if v else "" for v in column.tolist()]
    if column.dtype == np.float64:
        present = (~np.isnan(column)).tolist()
        return [
            f"{key}={value!r}" if ok else ""
            for value, ok in zip(column.tolist(), present, strict=True)
        ]
    if column.dtype == np.int8:
        table = {1: f"{key}=true", 0: f"{key}=false", BOOL_ABSENT: ""}
        return [table[value] for value in column.tolist()]
    return [f"{key}={value}i" for value in column.tolist()]


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
    prefix; rows with no field present are skipped, NaN fields are left out."""
    fragments = [_fragments(escape_key(name), column) for name, column in fields.items()]
    lines = []
    for prefix, row in zip(prefixes, zip(*fragments, strict=True), strict=True):
        present = ",".join(filter(None, row))
        if present:
            lines.append(f"{prefix} {present} {int(ts_ns)}")
    return lines


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


class BatchEncoder:
    """Encodes :class:`Columns` to line protocol; series keys are cached across batches."""

    def __init__(self, cache_limit: int = 1_000_000) -> None:
        self._series: dict[tuple[str, ...], str] = {}
        self._cache_limit = cache_limit

    def _series_key(
        self, measurement: str, tag_names: tuple[str, ...], values: tuple[str, ...]
    ) -> str:
        key = (measurement, *values)
        try:
            return self._series[key]
        except KeyError:
            pass
        if len(self._series) >= self._cache_limit:
            self._series.clear()
        tags = dict(zip(tag_names, values, strict=True))
        line = escape_measurement(measurement) + "".join(
            f",{escape_key(name)}={escape_key(tags[name])}" for name in sorted(tag_names)
        )
        self._series[key] = line
        return line

    def encode(self, columns: Columns) -> list[str]:
        if not len(columns):
            return []
        schema = MEASUREMENTS[columns.kind]
        tag_columns = [columns.tags[name].tolist() for name in schema.tags]
        tag_columns += [
            [str(v) for v in columns.fields[name].tolist()] for name in schema.field_tags
        ]
        tag_names = schema.tags + schema.field_tags
        prefixes = [
            self._series_key(schema.measurement, tag_names, values)
            for values in zip(*tag_columns, strict=True)
        ]
        fragments = [
            _fragments(escape_key(name), column)
            for name, column in columns.fields.items()
            if name not in schema.field_tags
        ]
        return [
            f"{prefix} {','.join(filter(None, row))} {ts}"
            for prefix, row, ts in zip(
                prefixes, zip(*fragments, strict=True), columns.ts_ns.tolist(), strict=True
            )
        ]
