"""The analytics inside the pipeline: a reading later than the allowed lateness is stored but
not used (counted and dead-lettered as too_late, with its address); an analytics failure is
counted and logged, and ingest goes on."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter
from tests.support import (
    Subscriber,
    count_points,
    mosquitto_pub,
    running,
    select,
    start_ingest_process,
    wait_for,
)

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


def traffic(ts_ms: int, count: int) -> bytes:
    lanes = [
        {"lane": n, "count": count, "occupancy_pct": 8.0, "speed_kmh": 70.0} for n in (1, 2, 3)
    ]
    return msgspec.json.encode({"ts": ts_ms, "interval_s": 60, "lanes": lanes})


def test_kill_9_mid_window_the_restart_recovers_the_window_from_influxdb(
    config: Config, db: InfluxWriter, tmp_path: Path
) -> None:
    """Readings acknowledged (so durable in InfluxDB) after the last checkpoint are re-read
    on start: the window they belong to is complete, not missing or short."""
    config = config.with_overrides({"analytics.checkpoint_interval_s": 3600})  # none in between
    topic = "cityflux/v1/centre/traffic/det-0001"
    minute = (time.time_ns() // 60_000_000_000 - 5) * 60_000  # 5 minutes ago, on a minute
    child = start_ingest_process(config, tmp_path / "ingest.log")
    try:
        wait_for(
            lambda: count_points(db, "cityflux_pipeline", "messages_received_total"),
            what="ingest up (first health point)",
        )
        for m in range(3):  # minutes 0-2, 30 vehicles per lane per minute
            mosquitto_pub(config.mqtt.port, topic, traffic(minute + m * 60_000, 30))
        wait_for(lambda: count_points(db, "traffic", "count") == 9, what="stored before the kill")
    finally:
        child.kill()  # kill -9: no checkpoint of these windows
        child.wait(10)
    with running(Pipeline(config)) as pipeline:
        for m in range(3, 8):  # later minutes move the watermark past minutes 0-2
            mosquitto_pub(config.mqtt.port, topic, traffic(minute + m * 60_000, 10))
        wait_for(lambda: count_points(db, "traffic", "count") == 24, what="the later readings")
        assert pipeline.analytics is not None
        rows = wait_for(
            lambda: select(
                db,
                'SELECT "flow_vph" FROM "traffic_segment" WHERE "segment" = \'seg-0001\' AND '
                f"\"window\" = '1m' AND time = {(minute + 60_000) * 1_000_000}",
            ),
            what="the first minute's window after the restart",
        )
    # 3 lanes x 30 vehicles in one minute = 5,400 veh/h: the window has the pre-kill readings
    assert rows[0]["flow_vph"] == 5_400.0
