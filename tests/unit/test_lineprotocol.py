from __future__ import annotations

import numpy as np
import pytest

from cityflux.model.columns import Columns
from cityflux.store.lineprotocol import BatchEncoder, encode_point, encode_table


def test_escaping_of_every_part() -> None:
    line = encode_point("my m,x", {"t k": "v,=1", "empty": ""}, {"f=1": 'say "hi"\\', "n": 2}, 5)
    assert line == 'my\\ m\\,x,t\\ k=v\\,\\=1 f\\=1="say \\"hi\\"\\\\",n=2i 5'


@pytest.mark.parametrize("value", ["a\nb", "ends\\", ""])
def test_tag_values_that_line_protocol_cannot_express_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="tag"):
        encode_point("m", {"t": "x", "u": value} if value else {"": "x"}, {"f": 1}, 1)


def test_non_finite_floats_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot store"):
        encode_point("m", {}, {"f": float("nan")}, 1)


def test_columns_encode_with_absent_fields_omitted() -> None:
    columns = Columns(
        kind="pole",
        tags={
            "district": np.array(["d1", "d1"], dtype=object),
            "device_id": np.array(["p1", "p2"], dtype=object),
        },
        fields={"pm25_ugm3": np.array([1.5, np.nan]), "lamp_on": np.array([-1, 1], np.int8)},
        ts_ns=np.array([10, 20], dtype=np.int64),
        message_index=np.array([0, 1], np.int32),
        reading_index=np.array([0, 0], np.int32),
        group=np.array([0, 1], np.int32),
    )
    assert BatchEncoder().encode(columns) == [
        "pole,device_id=p1,district=d1 pm25_ugm3=1.5 10",
        "pole,device_id=p2,district=d1 lamp_on=true 20",
    ]


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("unknown field `a\nb`", r'"unknown field `a\nb`"'),
        ("cr\r\nlf", r'"cr\r\nlf"'),
        ('quote " and \\ backslash', r'"quote \" and \\ backslash"'),
        ("a literal \\n stays two characters", r'"a literal \\n stays two characters"'),
    ],
)
def test_a_string_field_never_carries_a_raw_line_break(text: str, written: str) -> None:
    """VictoriaMetrics splits the body on every line feed, even inside quotes."""
    line = encode_point("cityflux_deadletter", {"reason": "schema"}, {"message": text}, 7)
    assert line == f"cityflux_deadletter,reason=schema message={written} 7"
    assert "\n" not in line and "\r" not in line


def test_string_columns_are_escaped_like_single_points() -> None:
    prefixes = ["m,t=a", "m,t=b"]
    lines = encode_table(prefixes, {"s": np.array(["x\ny", "\r"], dtype=object)}, 9)
    assert lines == [r'm,t=a s="x\ny" 9', r'm,t=b s="\r" 9']


@pytest.mark.parametrize(
    ("tags", "fields"),
    [
        ({"t\n": "x"}, {"f": 1}),  # tag key
        ({"t": "x\r"}, {"f": 1}),  # tag value
        ({}, {"f\n": 1}),  # field key
    ],
)
def test_keys_and_tag_values_with_a_line_break_are_refused(
    tags: dict[str, str], fields: dict[str, int]
) -> None:
    with pytest.raises(ValueError, match="newline"):
        encode_point("m", tags, fields, 1)
    with pytest.raises(ValueError, match="newline"):
        encode_point("m\n", {}, {"f": 1}, 1)  # measurement
