"""The analytics inside the pipeline: a reading later than the allowed lateness is stored but
not used (counted and dead-lettered as too_late, with its address); an analytics failure is
counted and logged, and ingest goes on."""

from __future__ import annotations

import time

import msgspec

from cityflux.config import Config
from cityflux.ingest.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter
from tests.support import Subscriber, count_points, mosquitto_pub, running, wait_for

POLE = "cityflux/v1/centre/pole/pole-0001"  # in examples/city-map.json


def test_too_late_is_stored_counted_and_dead_lettered(config: Config, db: InfluxWriter) -> None:
    now_ms = time.time_ns() // 1_000_000
    letters = Subscriber(config.mqtt.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)) as pipeline:
            mosquitto_pub(
                config.mqtt.port, POLE, msgspec.json.encode({"ts": now_ms, "noise_dba": 55.0})
            )
            wait_for(lambda: count_points(db, "pole", "noise_dba") == 1, what="the first reading")
            # an hour late: its 5-minute pane closed long ago (delay 120 s + lateness 300 s)
            late = {"ts": now_ms - 3_600_000, "noise_dba": 61.0}
            mosquitto_pub(config.mqtt.port, POLE, msgspec.json.encode(late))
            (letter,) = wait_for(letters.decoded, what="the too_late dead letter")
            assert pipeline.metrics.value("rejections_total", reason="too_late") == 1
            wait_for(lambda: count_points(db, "pole", "noise_dba") == 2, what="stored anyway")
    finally:
        letters.close()
    assert letter["reason"] == "too_late"
    assert letter["topic"] == POLE and letter["reading"] == 0
    assert "stored, but not in the indices" in letter["message"]


def test_an_analytics_failure_never_stops_ingest(config: Config, db: InfluxWriter) -> None:
    pipeline = Pipeline(config)
    assert pipeline.analytics is not None

    def broken(columns: object) -> tuple[list[str], list[object]]:
        raise RuntimeError("a bug in the analytics")

    pipeline.analytics.process = broken  # type: ignore[assignment,method-assign]
    with running(pipeline):
        reading = {"ts": time.time_ns() // 1_000_000, "noise_dba": 55.0}
        mosquitto_pub(config.mqtt.port, POLE, msgspec.json.encode(reading))
        wait_for(lambda: count_points(db, "pole", "noise_dba") == 1, what="the reading stored")
        wait_for(
            lambda: (
                pipeline.metrics.value("messages_acked_total")
                == pipeline.metrics.value("messages_received_total")
            ),
            what="everything acknowledged",
        )
        assert pipeline.metrics.value("analytics_errors_total") == 1
