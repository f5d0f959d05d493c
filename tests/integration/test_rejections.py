"""Hostile and broken input is dead-lettered with its reason, counted, stored nowhere else,
and the pipeline keeps running."""

from __future__ import annotations

import time

import pytest

from cityflux.config import Config
from cityflux.model.contract import Reason
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import Subscriber, publish_all, running, select, wait_for

NOW_MS = int(time.time() * 1000)
POLE = "cityflux/v1/centre/pole/pole-0001"
GOOD = f'{{"ts": {NOW_MS}, "pm25_ugm3": 10.0}}'.encode()

# (case, topic, payload, reason, rejected reading index or None for the whole message)
HOSTILE: list[tuple[str, str, bytes, Reason, int | None]] = [
    ("not utf-8", POLE, b'{"ts": 1, "pm25_ugm3": "\xff\xfe"}', Reason.INVALID_UTF8, None),
    (
        "not utf-8 in a typed string",
        POLE,
        b'{"ts": 1, "device_id": "\xff\xfe"}',
        Reason.INVALID_UTF8,
        None,
    ),
    ("truncated json", POLE, b'{"ts": 1, "pm25_ugm3": 1', Reason.INVALID_JSON, None),
    ("NaN", POLE, f'{{"ts": {NOW_MS}, "pm25_ugm3": NaN}}'.encode(), Reason.INVALID_JSON, None),
    (
        "Infinity",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": Infinity}}'.encode(),
        Reason.INVALID_JSON,
        None,
    ),
    ("trailing garbage", POLE, GOOD + b"}{", Reason.INVALID_JSON, None),
    ("deeply nested", POLE, b"[" * 100_000 + b"]" * 100_000, Reason.INVALID_JSON, None),
    # over ingest.max_payload_bytes (256 KiB); over mqtt.max_packet_size (1 MiB) the broker
    # refuses it instead (tests/adversarial/test_malformed_broker.py)
    ("600 KB", POLE, b'{"ts": 1, "x": "' + b"a" * 600_000 + b'"}', Reason.TOO_LARGE, None),
    ("id with space", "cityflux/v1/centre/pole/bad id", GOOD, Reason.BAD_TOPIC, None),
    ("id with comma", "cityflux/v1/centre/pole/a,b", GOOD, Reason.BAD_TOPIC, None),
    ("id with equals", "cityflux/v1/centre/pole/a=b", GOOD, Reason.BAD_TOPIC, None),
    ("id with quote", 'cityflux/v1/centre/pole/a"b', GOOD, Reason.BAD_TOPIC, None),
    # a newline (any control character) in a topic never reaches us: mosquitto refuses it
    ("district with space", "cityflux/v1/old town/pole/p1", GOOD, Reason.BAD_TOPIC, None),
    ("too deep", "cityflux/v1/centre/pole/p1/extra", GOOD, Reason.BAD_TOPIC, None),
    ("unknown kind", "cityflux/v1/centre/bin/b1", GOOD, Reason.UNKNOWN_KIND, None),
    ("mistyped", POLE, f'{{"ts": {NOW_MS}, "pm25_ugm3": "high"}}'.encode(), Reason.SCHEMA, None),
    ("unknown field", POLE, f'{{"ts": {NOW_MS}, "pm2_5": 3.0}}'.encode(), Reason.SCHEMA, None),
    ("no measurement", POLE, f'{{"ts": {NOW_MS}}}'.encode(), Reason.SCHEMA, 0),
    (
        "missing interval",
        "cityflux/v1/centre/traffic/det-0001",
        f'{{"ts": {NOW_MS}, "lanes": [{{"lane": 1, "count": 1, "occupancy_pct": 1}}]}}'.encode(),
        Reason.SCHEMA,
        None,
    ),
    ("scalar", POLE, b"42", Reason.SCHEMA, None),
    (
        "out of range",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1500}}'.encode(),
        Reason.OUT_OF_RANGE,
        0,
    ),
    (
        "too big a number",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1e400}}'.encode(),
        Reason.OUT_OF_RANGE,
        None,
    ),
    (
        "count over capacity",
        "cityflux/v1/centre/traffic/det-0001",
        f'{{"ts": {NOW_MS}, "interval_s": 60, "lanes": [{{"lane": 1, "count": 61, '
        f'"occupancy_pct": 50}}]}}'.encode(),
        Reason.OUT_OF_RANGE,
        0,
    ),
    (
        "future",
        POLE,
        f'{{"ts": {NOW_MS + 86_400_000}, "pm25_ugm3": 1}}'.encode(),
        Reason.BAD_TIMESTAMP,
        0,
    ),
    ("epoch zero", POLE, b'{"ts": 1, "pm25_ugm3": 1}', Reason.BAD_TIMESTAMP, 0),
    ("no timestamp", POLE, b'{"pm25_ugm3": 1}', Reason.BAD_TIMESTAMP, 0),
    ("unreadable timestamp", POLE, b'{"ts": "yesterday", "pm25_ugm3": 1}', Reason.BAD_TIMESTAMP, 0),
    ("float timestamp", POLE, b'{"ts": 1795570800000.5, "pm25_ugm3": 1}', Reason.SCHEMA, None),
    (
        "other device",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "device_id": "a b,c=d\\"e\\nf"}}'.encode(),
        Reason.MISMATCH,
        0,
    ),
    (
        "pole payload on a manhole topic",
        "cityflux/v1/centre/manhole/mh-0001",
        GOOD,
        Reason.MISMATCH,
        None,
    ),
]


def test_every_rejection_is_dead_lettered_counted_and_harmless(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)) as pipeline:
            publish_all(broker.port, [(topic, payload) for _, topic, payload, _, _ in HOSTILE])
            publish_all(broker.port, [(POLE, GOOD)])  # the pipeline still works afterwards
            wait_for(lambda: len(watcher.messages) >= len(HOSTILE), what="dead letters")
            wait_for(lambda: select(db, "SELECT * FROM pole"), what="the good reading")
            counted = {
                r.value: pipeline.metrics.value("rejections_total", reason=r.value) for r in Reason
            }
    finally:
        watcher.close()
    letters = watcher.decoded()
    assert len(letters) == len(HOSTILE)
    for (case, topic, payload, reason, reading), letter in zip(HOSTILE, letters, strict=True):
        assert (letter["reason"], letter["topic"], letter["reading"]) == (
            reason.value,
            topic,
            reading,
        ), case
        assert letter["message"], case
        assert letter["payload_bytes"] == len(payload), case
        assert letter["truncated"] == (len(payload) > 1024), case
    for (_, _, _, reason, _), (topic, _) in zip(HOSTILE, watcher.messages, strict=True):
        assert topic == f"cityflux/v1/deadletter/{reason.value}"
    expected_counts = {r.value: sum(1 for case in HOSTILE if case[3] is r) for r in Reason}
    assert counted == expected_counts
    # nothing of the hostile input became a series or a field
    series = {row["key"] for row in select(db, "SHOW SERIES FROM pole, manhole, traffic")}
    assert series == {"pole,device_id=pole-0001,district=centre"}
    fields = {row["fieldKey"] for row in select(db, "SHOW FIELD KEYS FROM pole")}
    assert fields == {"pm25_ugm3"}
    stored = select(db, "SELECT * FROM pole")
    assert [(row["time"], row["pm25_ugm3"]) for row in stored] == [(NOW_MS * 1_000_000, 10.0)]
    # the dead letters are visible in InfluxDB too, one point each
    dead = select(db, "SELECT * FROM cityflux_deadletter")
    assert sorted(row["reason"] for row in dead) == sorted(case[3].value for case in HOSTILE)


def test_one_bad_reading_rejects_that_reading_only(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    batch = (
        f'[{{"ts": {NOW_MS}, "pm25_ugm3": 1.0}}, {{"ts": {NOW_MS + 1}, "pm25_ugm3": -5}}, '
        f'{{"ts": {NOW_MS + 2}, "pm25_ugm3": "x"}}, {{"ts": {NOW_MS + 3}, "pm25_ugm3": 3.0}}, '
        f'{{"ts": {NOW_MS + 4}, "pm25_ugm3": 1e400}}]'
    )
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)):
            publish_all(broker.port, [(POLE, batch.encode())])
            wait_for(lambda: len(watcher.messages) >= 3, what="three dead letters")
            rows = wait_for(
                lambda: len(r := select(db, "SELECT * FROM pole")) >= 2 and r,
                what="the two good readings",
            )
    finally:
        watcher.close()
    assert [row["pm25_ugm3"] for row in rows] == [1.0, 3.0]
    letters = sorted(watcher.decoded(), key=lambda letter: letter["reading"])
    assert [(x["reason"], x["reading"]) for x in letters] == [
        ("out_of_range", 1),
        ("schema", 2),
        ("out_of_range", 4),
    ]


@pytest.mark.parametrize("lanes", [[], [{"lane": 1, "count": 1, "occupancy_pct": 1}] * 2])
def test_bad_lanes_reject_the_reading(
    broker: LocalMosquitto, config: Config, db: InfluxWriter, lanes: list[object]
) -> None:
    import msgspec

    payload = msgspec.json.encode({"ts": NOW_MS, "interval_s": 60, "lanes": lanes})
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)):
            publish_all(broker.port, [("cityflux/v1/centre/traffic/det-1", payload)])
            wait_for(lambda: watcher.messages, what="dead letter")
    finally:
        watcher.close()
    assert watcher.decoded()[0]["reason"] == "schema"
    assert select(db, "SELECT * FROM traffic") == []
