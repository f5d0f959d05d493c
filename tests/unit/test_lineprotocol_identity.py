"""The columnar line-protocol encoder writes byte for byte what the per-value encoder it
replaced wrote (issue 11): that encoder is frozen below as the reference, escapers included,
and hypothesis feeds both the same columns of every kind, with the awkward values (NaN/absent,
-0.0, subnormals, the edges of repr's positional notation, int64 limits, bools absent, strings
and tags that need escaping)."""

from __future__ import annotations

import math
from typing import Any

import hypothesis.strategies as st
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings

from cityflux.model.columns import BOOL_ABSENT, Columns
from cityflux.model.contract import KIND_FIELDS
from cityflux.store.lineprotocol import BatchEncoder, encode_table, number_text
from cityflux.store.schema import MEASUREMENTS
from tests.support import examples


# -- the reference: BatchEncoder and _fragments as they were before issue 11, frozen --------
def _ref_no_newline(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} cannot contain a newline: {text!r}")
    if not text:
        raise ValueError(f"{what} cannot be empty")
    if text.endswith("\\"):
        raise ValueError(f"{what} cannot end with a backslash: {text!r}")
    return text


_REF_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ "})
_REF_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_REF_STRING = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def _ref_escape_measurement(name: str) -> str:
    return _ref_no_newline(name, "measurement").translate(_REF_MEASUREMENT)


def _ref_escape_key(key: str) -> str:
    return _ref_no_newline(key, "tag or field key/value").translate(_REF_KEY)


def _ref_escape_string_field(value: str) -> str:
    return '"' + value.translate(_REF_STRING) + '"'


def reference_fragments(key: str, column: npt.NDArray[Any]) -> list[str]:
    if column.dtype == np.bool_:
        return [f"{key}=true" if value else f"{key}=false" for value in column.tolist()]
    if column.dtype == object or column.dtype.kind == "U":
        return [f"{key}={_ref_escape_string_field(str(v))}" if v else "" for v in column.tolist()]
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


class ReferenceBatchEncoder:
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
        line = _ref_escape_measurement(measurement) + "".join(
            f",{_ref_escape_key(name)}={_ref_escape_key(tags[name])}" for name in sorted(tag_names)
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
            reference_fragments(_ref_escape_key(name), column)
            for name, column in columns.fields.items()
            if name not in schema.field_tags
        ]
        return [
            f"{prefix} {','.join(filter(None, row))} {ts}"
            for prefix, row, ts in zip(
                prefixes, zip(*fragments, strict=True), columns.ts_ns.tolist(), strict=True
            )
        ]


# -- generated columns ----------------------------------------------------------------------
AWKWARD_FLOATS = [
    -0.0,
    0.0,
    5e-324,  # smallest subnormal
    2.2250738585072014e-308,  # smallest normal
    1.7976931348623157e308,
    1e16,  # repr switches to exponent notation here
    9999999999999998.0,  # largest double below it, still positional
    1e15,
    1234567890123456.8,
    1e-4,  # and here, below which it is exponent again
    9.999999999999999e-05,
    1.0000000000000002e-4,
    1e-05,
    0.1 + 0.2,
    1 / 3,
    1e22,
    123456789012345678.0,
    -1.5e-7,
    100.0,
    float("nan"),
    float("inf"),
    float("-inf"),
]
INT64 = st.integers(-(2**63), 2**63 - 1)
# anything but a line break; escaping characters and backslashes often
TEXT = st.text(
    st.one_of(
        st.sampled_from(list(',= "\\\n\r=ä€\t')),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=12,
)
ID_TEXT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,10}", fullmatch=True)
# a tag value InfluxDB can take: non-empty, no line break, not ending in a backslash
TAG_TEXT = st.one_of(
    ID_TEXT,
    TEXT.filter(lambda s: s and "\n" not in s and "\r" not in s and not s.endswith("\\")),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2000, max_value=2000).map(lambda v: round(v, 1)),
    st.sampled_from(AWKWARD_FLOATS),
    st.floats(min_value=1e-6, max_value=1e-3),
    st.floats(min_value=1e15, max_value=1e17),
)


def _field_column(draw: st.DrawFn, kind: str, rows: int) -> npt.NDArray[Any]:
    if kind == "float":
        return np.array(draw(st.lists(FLOATS, min_size=rows, max_size=rows)), np.float64)
    if kind == "bool":
        values = draw(st.lists(st.sampled_from([BOOL_ABSENT, 0, 1]), min_size=rows, max_size=rows))
        return np.array(values, np.int8)
    return np.array(draw(st.lists(INT64, min_size=rows, max_size=rows)), np.int64)


@st.composite
def columns_of_every_kind(draw: st.DrawFn, tag_text: st.SearchStrategy[str] = TAG_TEXT) -> Columns:
    kind = draw(st.sampled_from(sorted(MEASUREMENTS)))
    rows = draw(st.integers(0, 12))
    schema = MEASUREMENTS[kind]
    tags = {
        name: np.array(draw(st.lists(tag_text, min_size=rows, max_size=rows)), dtype=object)
        for name in schema.tags
    }
    specs = [(spec.name, spec.type) for spec in KIND_FIELDS.get(kind, ())]
    if kind == "status":
        specs = [("online", "bool")]
    fields = {name: _field_column(draw, type_, rows) for name, type_ in specs}
    if draw(st.booleans()):  # a string field (the dead letters' kind of column) and a numpy bool
        strings = draw(st.lists(st.one_of(TEXT, st.none()), min_size=rows, max_size=rows))
        fields["note text"] = np.array(strings, dtype=object)
        fields["flag,b"] = np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    if draw(st.booleans()):  # field order is the columns' order, not the schema's
        fields = dict(reversed(list(fields.items())))
    return Columns(
        kind=kind,
        tags=tags,
        fields=fields,
        ts_ns=np.array(draw(st.lists(INT64, min_size=rows, max_size=rows)), np.int64),
        message_index=np.arange(rows, dtype=np.int32),
        reading_index=np.zeros(rows, np.int32),
        group=np.arange(rows, dtype=np.int32),
    )


# -- the properties -------------------------------------------------------------------------
@settings(max_examples=examples(400), deadline=None)
@given(st.lists(columns_of_every_kind(), min_size=1, max_size=4))
def test_batches_encode_byte_identical_to_the_reference(batches: list[Columns]) -> None:
    new, reference = BatchEncoder(), ReferenceBatchEncoder()
    for columns in batches:  # one encoder over several batches, as the pipeline uses it
        expected = reference.encode(columns)
        got = new.encode(columns)
        assert got == expected
        assert "\n".join(got).encode() == "\n".join(expected).encode()


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(FLOATS, min_size=1, max_size=40))
def test_float_text_is_python_repr(values: list[float]) -> None:
    """Shortest round-trip digits, and repr's notation: exponent below 1e-4 and from 1e16 on
    (1e-05, 1e+16), positional between."""
    column = np.array(values, np.float64)
    text = number_text(column)
    for value, written in zip(values, text, strict=True):
        if not math.isnan(value):
            assert written == repr(value)
            assert float(written) == value


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(INT64, min_size=1, max_size=40))
def test_int_text_is_python_str(values: list[int]) -> None:
    assert number_text(np.array(values, np.int64)) == [str(v) for v in values]


@pytest.mark.parametrize("bad", ["", "a\nb", "cr\r", "ends\\"])
def test_tags_line_protocol_cannot_express_are_refused_as_before(bad: str) -> None:
    columns = Columns(
        kind="pole",
        tags={
            "district": np.array(["d1", bad], dtype=object),
            "device_id": np.array(["p1", "p2"], dtype=object),
        },
        fields={"pm25_ugm3": np.array([1.5, 2.5])},
        ts_ns=np.array([1, 2], np.int64),
        message_index=np.arange(2, dtype=np.int32),
        reading_index=np.zeros(2, np.int32),
    )
    with pytest.raises(ValueError, match="tag or field key/value") as expected:
        ReferenceBatchEncoder().encode(columns)
    with pytest.raises(ValueError, match="tag or field key/value") as got:
        BatchEncoder().encode(columns)
    assert str(got.value) == str(expected.value)


def test_a_row_with_no_field_present_is_written_as_before() -> None:
    """Validation drops such rows; the encoder alone writes what it always wrote."""
    columns = Columns(
        kind="manhole",
        tags={
            "district": np.array(["d1", "d2", "d3"], dtype=object),
            "device_id": np.array(["m1", "m2", "m3"], dtype=object),
        },
        fields={
            "cover_open": np.array([BOOL_ABSENT, 1, BOOL_ABSENT], np.int8),
            "tilt_deg": np.array([np.nan, np.nan, 2.0]),
        },
        ts_ns=np.array([1, 2, 3], np.int64),
        message_index=np.arange(3, dtype=np.int32),
        reading_index=np.zeros(3, np.int32),
    )
    assert BatchEncoder().encode(columns) == [
        "manhole,device_id=m1,district=d1  1",
        "manhole,device_id=m2,district=d2 cover_open=true 2",
        "manhole,device_id=m3,district=d3 tilt_deg=2.0 3",
    ]
    assert BatchEncoder().encode(columns) == ReferenceBatchEncoder().encode(columns)


def reference_encode_table(
    prefixes: list[str], fields: dict[str, npt.NDArray[Any]], ts_ns: int
) -> list[str]:
    """encode_table as it was before issue 11."""
    fragments = [
        reference_fragments(_ref_escape_key(name), column) for name, column in fields.items()
    ]
    lines = []
    for prefix, row in zip(prefixes, zip(*fragments, strict=True), strict=True):
        present = ",".join(filter(None, row))
        if present:
            lines.append(f"{prefix} {present} {int(ts_ns)}")
    return lines


@st.composite
def result_tables(draw: st.DrawFn) -> tuple[list[str], dict[str, npt.NDArray[Any]], int]:
    rows = draw(st.integers(0, 12))
    prefixes = [f"m,entity=e{i}" for i in range(rows)]
    names = draw(st.lists(st.sampled_from(["tpi", "speed_kmh", "level", "los", "ok", "lamp"]),
                          unique=True, min_size=1, max_size=5))  # fmt: skip
    fields: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        kind = draw(st.sampled_from(["float", "int", "bool8", "bool", "text"]))
        if kind == "bool":
            fields[name] = np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
        elif kind == "text":
            values = draw(st.lists(st.one_of(st.just(""), TEXT), min_size=rows, max_size=rows))
            fields[name] = np.array(values, dtype=object)
        else:
            fields[name] = _field_column(draw, "bool" if kind == "bool8" else kind, rows)
    return prefixes, fields, draw(st.integers(0, 2**62))


@settings(max_examples=examples(400), deadline=None)
@given(result_tables())
def test_result_tables_encode_byte_identical_to_the_reference(
    table: tuple[list[str], dict[str, npt.NDArray[Any]], int],
) -> None:
    prefixes, fields, ts = table
    assert encode_table(prefixes, fields, ts) == reference_encode_table(prefixes, fields, ts)


def test_a_table_without_fields_is_no_lines() -> None:
    # the reference raised on it (a zip of no columns); nothing to write is no lines
    assert encode_table(["m,entity=e0"], {}, 1) == []
