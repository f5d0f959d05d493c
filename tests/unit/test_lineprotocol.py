from __future__ import annotations

import numpy as np
import pytest

from cityflux.ingest.batch import Columns
from cityflux.store.lineprotocol import BatchEncoder, encode_point


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
