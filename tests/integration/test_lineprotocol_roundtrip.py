"""The line-protocol escaper, property-tested against what InfluxDB 1.x reads back."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import encode_point
from tests.support import select

# Tag values: any printable text without newlines, not ending in a backslash (line protocol
# cannot express those; cityflux refuses them, see test_lineprotocol.py).
tag_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30
).filter(lambda s: not s.endswith("\\") and s.strip() == s and s)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
_counter = itertools.count()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tag=tag_text, text=any_text, number=numbers, integer=st.integers(-(2**63), 2**63 - 1))
def test_what_influxdb_reads_back_is_what_we_wrote(
    db: InfluxWriter, tag: str, text: str, number: float, integer: int
) -> None:
    ts = 1_700_000_000_000_000_000 + next(_counter)
    measurement = f"m,eas ure{next(_counter)}"
    line = encode_point(
        measurement,
        {"ta g,=": tag},
        {"te,xt= ": text, "num": number, "int": integer, "flag": True},
        ts,
    )
    db.send(line.encode(), gzipped=False)
    quoted = measurement.replace('"', '\\"')
    rows = select(db, f'SELECT * FROM "{quoted}"')
    assert len(rows) == 1, line
    row = rows[0]
    assert row["time"] == ts
    assert row["ta g,="] == tag
    # a raw line break would end the line (VictoriaMetrics splits on it even inside quotes):
    # it is written, and so stored, as the two characters backslash and n (or r)
    assert row["te,xt= "] == text.replace("\n", "\\n").replace("\r", "\\r")
    # Go's JSON writes 7.0293e16 as 70293060974427980: compare as the float it encodes
    assert float(row["num"]) == number
    assert row["int"] == integer
    assert row["flag"] is True
