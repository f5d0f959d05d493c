"""One message must not stop the city (issue 9, point 1 and the error boundary per message).

Poison payloads (timestamps and integers outside int64, duplicate keys, a line feed in an
unknown key, and, by fault injection, a payload that makes decoding raise) are published mixed
with good readings into the real pipeline (real mosquitto, real InfluxDB). Each poison becomes a
dead letter of its own message or reading, on MQTT and in InfluxDB, with its reason; every good
reading lands; a good message published after the poison lands too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.model.columns import Decoded
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto, LocalVictoriaMetrics
from cityflux.store.influx import InfluxWriter
from tests.support import (
    Subscriber,
    count_points,
    export,
    publish_all,
    running,
    select,
    v2_overrides,
    wait_for,
)

NOW_MS = int(time.time() * 1000) - 60_000
BIG = "1" + "0" * 400
HUGE = "1" + "0" * 5000


def pole(i: int) -> tuple[str, bytes]:
    return (
        f"cityflux/v1/centre/pole/pole-{i % 7}",
        f'{{"ts": {NOW_MS + i}, "pm25_ugm3": {i % 900}.5}}'.encode(),
    )


def traffic(i: int, interval_s: str = "60", lane: str = "1", count: str = "7") -> bytes:
    return (
        f'{{"ts": {NOW_MS + i}, "interval_s": {interval_s}, "lanes": [{{"lane": {lane}, '
        f'"count": {count}, "occupancy_pct": 5.0}}]}}'
    ).encode()


POLE = "cityflux/v1/centre/pole/pole-poison"
DETECTOR = "cityflux/v1/centre/traffic/det-poison"
# (topic, payload, reason, rejected reading or None, readings of the payload that are good)
POISON: list[tuple[str, bytes, str, int | None, int]] = [
    (POLE, b'{"ts": "9999-12-31T23:59:59Z", "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, b'{"ts": "0001-01-01T00:00:00Z", "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, b'{"ts": "2262-04-12T00:00:00Z", "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, b'{"ts": 9223372036854775808, "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, b'{"ts": -9223372036854775809, "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, b'{"ts_ns": 9223372036854775808, "pm25_ugm3": 1}', "bad_timestamp", 0, 0),
    (POLE, f'{{"ts": {BIG}, "pm25_ugm3": 1}}'.encode(), "bad_timestamp", 0, 0),
    (POLE, f'{{"ts": {HUGE}, "pm25_ugm3": 1}}'.encode(), "bad_timestamp", None, 0),
    (DETECTOR, traffic(1, lane="9223372036854775808"), "out_of_range", None, 0),
    (DETECTOR, traffic(2, count=BIG), "out_of_range", None, 0),
    (DETECTOR, traffic(3, count=HUGE), "out_of_range", None, 0),
    (DETECTOR, traffic(4, interval_s="-9223372036854775809"), "out_of_range", None, 0),
    (DETECTOR, traffic(5, count="18446744073709551616"), "out_of_range", None, 0),
    (
        DETECTOR,  # one poison reading in an array of two: the other one is stored
        b"[" + traffic(6, count=BIG) + b", " + traffic(7) + b"]",
        "out_of_range",
        0,
        1,
    ),
    (
        POLE,
        b'[{"ts": "9999-01-01T00:00:00Z", "pm25_ugm3": 1}, {"ts": %d, "pm25_ugm3": 2}]'
        % (NOW_MS + 8),
        "bad_timestamp",
        0,
        1,
    ),
    (
        "cityflux/v1/centre/pole/pole-poison/status",
        b'{"state": "online", "ts": "9999-12-31T23:59:59Z"}',
        "bad_timestamp",
        0,
        0,
    ),
    (POLE, b'{"ts": %d, "pm25_ugm3": 1, "pm25_ugm3": 900}' % NOW_MS, "schema", None, 0),
    (DETECTOR, traffic(9).replace(b'"count": 7', b'"count": 7, "count": 70'), "schema", None, 0),
    (POLE, b'{"ts": %d, "pm25_ugm3": 1, "a\\nb": 2}' % NOW_MS, "schema", None, 0),
]
GOOD_POLES = 300
GOOD_DETECTORS = 100


def mixed() -> list[tuple[str, bytes]]:
    """Good readings with the poison spread among them (one batch, or a few)."""
    good = [pole(i) for i in range(GOOD_POLES)] + [
        (f"cityflux/v1/centre/traffic/det-{i % 5}", traffic(100 + i)) for i in range(GOOD_DETECTORS)
    ]
    messages: list[tuple[str, bytes]] = []
    step = len(good) // len(POISON)
    for n, (topic, payload, *_) in enumerate(POISON):
        messages += [*good[n * step : (n + 1) * step], (topic, payload)]
    return messages + good[len(POISON) * step :]


def test_poison_is_dead_lettered_alone_and_the_city_keeps_going(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    config = config.with_overrides({"analytics.enabled": False})
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    after = (POLE, b'{"ts": %d, "pm25_ugm3": 777.25}' % (NOW_MS + 99_999))
    try:
        with running(Pipeline(config)) as pipeline:
            publish_all(broker.port, mixed())
            wait_for(lambda: len(watcher.messages) >= len(POISON), what="dead letters")
            publish_all(broker.port, [after])  # the pipeline is still alive afterwards
            landed = "SELECT * FROM pole WHERE pm25_ugm3 = 777.25"
            wait_for(lambda: select(db, landed), what="the good message after the poison")
            counted = Counter(
                {
                    reason: pipeline.metrics.value("rejections_total", reason=reason)
                    for reason in ("bad_timestamp", "out_of_range", "schema", "internal_error")
                }
            )
    finally:
        watcher.close()
    expected = Counter(reason for _, _, reason, _, _ in POISON)
    assert counted == expected  # and no internal_error: every poison has its own reason
    letters = watcher.decoded()
    assert len(letters) == len(POISON)
    assert Counter(letter["reason"] for letter in letters) == expected
    assert Counter(topic for topic, _ in watcher.messages) == Counter(
        f"cityflux/v1/deadletter/{reason}" for reason in expected.elements()
    )
    for topic, payload, reason, reading, _ in POISON:
        match = [
            x
            for x in letters
            if (x["topic"], x["payload_bytes"], x["payload"])
            == (topic, len(payload), payload[:1024].decode())
        ]
        assert [(x["reason"], x["reading"]) for x in match] == [(reason, reading)], payload[:60]

    # exactly the good readings, and the good reading of each half-poisoned array
    def kept(topic: str) -> int:
        return sum(good for t, _, _, _, good in POISON if t == topic)

    assert count_points(db, "pole", "pm25_ugm3") == GOOD_POLES + kept(POLE) + 1  # + after
    assert count_points(db, "traffic", "count") == GOOD_DETECTORS + kept(DETECTOR)
    assert select(db, 'SELECT count("online") FROM device_status') == []
    # the dead letters in InfluxDB, by reason; the line feed of the unknown key is escaped
    stored = Counter(
        {
            row["reason"]: row["count"]
            for row in select(
                db, 'SELECT count("message") FROM cityflux_deadletter GROUP BY reason'
            )
        }
    )
    assert stored == expected
    (unknown,) = [x for x in letters if "unknown field" in x["message"]]
    assert "\n" in unknown["message"]
    rows = select(db, "SELECT message FROM cityflux_deadletter WHERE message =~ /unknown field/")
    assert [row["message"] for row in rows] == [unknown["message"].replace("\n", "\\n")]


class FaultyDecoder(BatchDecoder):
    """Fault injection: decoding raises whenever the batch holds a message of a device
    ``boom-*``; everything else is the shipped decoder."""

    def decode(self, topics: Sequence[str], payloads: Sequence[bytes], now_ns: int) -> Decoded:
        if any("/boom-" in topic for topic in topics):
            raise ZeroDivisionError("injected fault")
        return super().decode(topics, payloads, now_ns)


def test_a_payload_that_raises_is_an_internal_error_of_that_message_only(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    config = config.with_overrides({"analytics.enabled": False})
    messages = [pole(i) for i in range(500)]
    booms = [40, 41, 250, 499]
    for i in booms:
        messages[i] = (f"cityflux/v1/centre/pole/boom-{i}", pole(i)[1])
    watcher = Subscriber(broker.port, "cityflux/v1/deadletter/#")
    try:
        pipeline = Pipeline(config)
        pipeline.transform.decoder = FaultyDecoder(config.ingest, config.mqtt.topic_root)
        with running(pipeline):
            publish_all(broker.port, messages)
            wait_for(lambda: len(watcher.messages) >= len(booms), what="dead letters")
            publish_all(broker.port, [pole(10_000)])
            wait_for(lambda: count_points(db, "pole", "pm25_ugm3") == 497, what="all good")
            internal = pipeline.metrics.value("rejections_total", reason="internal_error")
    finally:
        watcher.close()
    assert internal == len(booms)
    letters = watcher.decoded()
    assert sorted(x["topic"] for x in letters) == sorted(
        f"cityflux/v1/centre/pole/boom-{i}" for i in booms
    )
    assert {x["reason"] for x in letters} == {"internal_error"}
    assert all(x["message"].startswith("ZeroDivisionError: injected fault") for x in letters)
    assert {t for t, _ in watcher.messages} == {"cityflux/v1/deadletter/internal_error"}
    rows = select(db, 'SELECT count("message") FROM cityflux_deadletter GROUP BY reason')
    assert [(r["reason"], r["count"]) for r in rows] == [("internal_error", len(booms))]


def test_a_line_feed_in_a_dead_letter_does_not_lose_it_in_victoriametrics(
    broker: LocalMosquitto, config: Config, victoria: LocalVictoriaMetrics
) -> None:
    """VictoriaMetrics splits the body on every line feed, quotes or not: unescaped, the dead
    letter's point was dropped without an error (measured: 204, and nothing stored)."""
    config = config.with_overrides({**v2_overrides(victoria), "analytics.enabled": False})
    payload = b'{"ts": %d, "pm25_ugm3": 1, "x\\ny": 2}' % NOW_MS
    device = f"pole-lf-{NOW_MS}"
    with running(Pipeline(config)) as pipeline:
        publish_all(broker.port, [(f"cityflux/v1/centre/pole/{device}", payload), pole(1)])
        wait_for(lambda: pipeline.metrics.value("lines_written_total") >= 2, what="writes")
    series = wait_for(
        lambda: export(victoria, '{__name__="cityflux_deadletter_payload_bytes"}'),
        what="the dead letter in VictoriaMetrics",
    )
    assert [s["values"] for s in series if s["metric"]["reason"] == "schema"] == [[len(payload)]]
