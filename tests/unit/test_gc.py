"""The garbage collector stays out of the hot path (docs/performance.md, "Garbage collection"):
decoded readings are not tracked (msgspec ``gc=False``): they hold no references back, so
they can be in no cycle, and 200,000 of them no longer trigger collections that walk them."""

from __future__ import annotations

import gc

import msgspec

from cityflux.model.contract import READING_TYPES


def test_decoded_readings_are_not_tracked_by_the_collector() -> None:
    payloads = {
        "pole": b'{"ts": 1, "pm25_ugm3": 12.5, "noise_dba": 55.0}',
        "manhole": b'{"ts": 1, "water_level_cm": 3.0, "cover_open": false}',
        "traffic": b'{"ts": 1, "interval_s": 60, "lanes": [{"lane": 1, "count": 3, '
        b'"occupancy_pct": 4.5}]}',
    }
    for kind, payload in payloads.items():
        reading = msgspec.json.decode(payload, type=READING_TYPES[kind])
        assert not gc.is_tracked(reading), kind
    lanes = msgspec.json.decode(payloads["traffic"], type=READING_TYPES["traffic"]).lanes
    assert not gc.is_tracked(lanes[0])
