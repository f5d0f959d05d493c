"""The store's encoder of analytics results (model.points): byte-identical to encoding the same
table row by row with freshly built series prefixes, and each fixed tag set built once."""

from __future__ import annotations

import numpy as np
import pytest

from cityflux.analytics.alerts import Alert
from cityflux.analytics.results import alert_point
from cityflux.model.points import FieldValue, Point, Table
from cityflux.store import lineprotocol
from cityflux.store.lineprotocol import TableEncoder, encode_point, encode_table, series_prefixes

TAGS = {
    "segment": ["seg-1", "seg-2", "seg 3", "seg-4"],
    "direction": ["forward", "reverse", "forward", ""],  # an empty tag value is left out
    "window": ["1m"] * 4,
}


def fields(n: int) -> dict[str, np.ndarray]:
    return {
        "tpi": np.array([1.25, np.nan, 3.5, 7.0][:n]),  # NaN: the field is absent
        "level": np.arange(1, n + 1, dtype=np.int64),
        "los": np.array(["A", "B", "", 'say "F"'][:n], dtype=object),
        "imputed": np.array([True, False, True, False][:n]),
    }


@pytest.mark.parametrize(
    "rows",
    [None, np.array([True, False, True, True]), np.array([3, 0]), np.array([False] * 4)],
    ids=["all rows", "mask", "indices", "nothing selected"],
)
def test_a_table_encodes_byte_for_byte_as_encode_table(rows: np.ndarray | None) -> None:
    selected = np.arange(4) if rows is None else np.arange(4)[rows]
    table = Table("traffic_segment", "segment/1m", TAGS, fields(len(selected)), 120, rows=rows)
    prefixes = [series_prefixes("traffic_segment", TAGS)[i] for i in selected.tolist()]
    expected = encode_table(prefixes, table.fields, 120)
    assert TableEncoder().encode([table]) == expected
    assert len(expected) == len(selected)  # every selected row has a field present


def test_selected_rows_get_their_own_series() -> None:
    table = Table("traffic_segment", "segment/1m", TAGS, fields(2), 7, rows=np.array([2, 3]))
    assert TableEncoder().encode([table]) == [
        r'traffic_segment,direction=forward,segment=seg\ 3,window=1m tpi=1.25,level=1i,los="A",'
        "imputed=true 7",
        r'traffic_segment,segment=seg-4,window=1m level=2i,los="B",imputed=false 7',
    ]


def test_series_prefixes_are_built_once_per_series(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def counting(measurement: str, tags: dict[str, list[str]]) -> list[str]:
        built.append(measurement)
        return series_prefixes(measurement, tags)

    monkeypatch.setattr(lineprotocol, "series_prefixes", counting)
    encoder = TableEncoder()
    mask = np.array([True, True, False, True])
    masked = Table("traffic_segment", "segment/1m", TAGS, fields(3), 1, rows=mask)
    whole = Table("traffic_segment", "segment/1m", TAGS, fields(4), 2)
    assert len(encoder.encode([masked])) == 3
    assert len(encoder.encode([whole, masked])) == 7
    assert len(encoder.encode([Table("traffic_segment", "segment/5m", TAGS, fields(4), 2)])) == 4
    assert built == ["traffic_segment", "traffic_segment"]  # 1m once, 5m once
    everyone = encoder.prefixes(whole)
    assert encoder.prefixes(masked) == [p for p, keep in zip(everyone, mask, strict=True) if keep]
    # a tag set of another size under the same key (another city map) is built afresh
    fewer = {k: v[:2] for k, v in TAGS.items()}
    assert len(encoder.encode([Table("traffic_segment", "segment/1m", fewer, fields(2), 3)])) == 2
    assert len(built) == 3


def test_points_and_tables_keep_their_order() -> None:
    point = Point("cityflux_alert", {"rule": "r", "entity": "e", "district": ""}, {"x": 1.5}, 9)
    table = Table("noise", "poles", {"device_id": ["p1"]}, {"leq": np.array([50.0])}, 8)
    assert TableEncoder().encode([point, table, point]) == [
        "cityflux_alert,entity=e,rule=r x=1.5 9",
        "noise,device_id=p1 leq=50.0 8",
        "cityflux_alert,entity=e,rule=r x=1.5 9",
    ]


def test_an_alert_point_encodes_as_the_alert_line_did() -> None:
    alert = Alert(
        id=4, rule="manhole_cover_open", severity="critical", district="centre",
        entity="mh-0001", state="cleared", value=float("nan"), message='cover "open"',
        started_ns=10, updated_ns=20, cleared_ns=20,
    )  # fmt: skip
    line = TableEncoder().encode([alert_point(alert, (22.5, 114.1))])
    tags = {"rule": "manhole_cover_open", "severity": "critical", "district": "centre",
            "entity": "mh-0001"}  # fmt: skip
    values: dict[str, FieldValue] = {
        "alert_id": 4, "state": "cleared", "acknowledged": False, "flapping": False,
        "value": 0.0, "message": 'cover "open"', "lat": 22.5, "lon": 114.1,
    }  # fmt: skip
    assert line == [encode_point("cityflux_alert", tags, values, 20)]  # cleared: its time
    assert line[0] == (
        "cityflux_alert,district=centre,entity=mh-0001,rule=manhole_cover_open,"
        'severity=critical alert_id=4i,state="cleared",acknowledged=false,flapping=false,'
        'value=0.0,message="cover \\"open\\"",lat=22.5,lon=114.1 20'
    )
