"""The recording file format and the timestamp shifter."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import msgspec
import pytest

from cityflux.errors import CityfluxError
from cityflux.simulators.recording import (
    Header,
    RecordingWriter,
    ReplayPlan,
    TimestampShifter,
    read_recording,
    replay_batches,
)

MESSAGES = [
    (1_000_000_000_000_000_000, "cityflux/v1/d01/pole/p1", b'{"ts":1795570800000}', False),
    (1_000_000_000_200_000_000, "cityflux/v1/d01/pole/p1/status", b'{"state":"online"}', True),
    (1_000_000_000_500_000_000, "cityflux/v1/d01/manhole/m1", b"\xff not json", False),
]


def _write(path: Path) -> None:
    writer = RecordingWriter(path, Header(source="mqtt://example:1883", topic="cityflux/v1/#"))
    for received_ns, topic, payload, retain in MESSAGES:
        writer.write(received_ns, topic, payload, retain)
    writer.close()


def test_round_trip_keeps_order_bytes_retain_and_offsets(tmp_path: Path) -> None:
    path = tmp_path / "run.cfxrec"
    _write(path)
    header, records = read_recording(path)
    assert header.source == "mqtt://example:1883"
    assert header.started_ns == MESSAGES[0][0]
    assert list(records) == [(r - MESSAGES[0][0], t, p, k) for r, t, p, k in MESSAGES]
    with gzip.open(path, "rb") as raw:  # documented framing: 4-byte length + msgpack
        length = int.from_bytes(raw.read(4), "big")
        assert msgspec.msgpack.decode(raw.read(length))["format"] == "cityflux-recording"


def test_not_a_recording_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.cfxrec"
    path.write_bytes(b"hello")
    with pytest.raises(CityfluxError, match="not a cityflux recording"):
        read_recording(path)


def test_replay_batches_scale_time_and_loop(tmp_path: Path) -> None:
    path = tmp_path / "run.cfxrec"
    _write(path)
    batches = list(replay_batches(path, ReplayPlan(speed=2.0, loops=2)))
    times = [at for at, _ in batches]
    assert times[:3] == pytest.approx([0.0, 0.1, 0.25])
    assert times[3] == pytest.approx((0.5 + 1.0) / 2)  # loop 2: after duration + 1 s gap
    flat = [m for _, batch in batches for m in batch]
    assert [m[0] for m in flat] == [m[1] for m in MESSAGES] * 2
    fastest = list(replay_batches(path, ReplayPlan(speed=math.inf)))
    assert len(fastest) == 1 and fastest[0][0] == 0.0


def test_shift_to_now_moves_every_timestamp_form(tmp_path: Path) -> None:
    shift = TimestampShifter(3_600_000_000_000)  # one hour
    assert msgspec.json.decode(shift(b'{"ts":1000,"noise_dba":50.0}')) == {
        "ts": 3_601_000,  # milliseconds
        "noise_dba": 50.0,
    }
    assert msgspec.json.decode(shift(b'[{"ts_ns":5},{"ts_ns":6}]')) == [
        {"ts_ns": 3_600_000_000_005},
        {"ts_ns": 3_600_000_000_006},
    ]
    assert msgspec.json.decode(shift(b'{"ts":"1970-01-01T00:00:00.000000001Z"}')) == {
        "ts_ns": 3_600_000_000_001
    }
    for untouched in (b"\xff not json", b'{"state":"offline"}', b"[1,2]", b'{"ts":"garbage"}'):
        assert shift(untouched) == untouched
