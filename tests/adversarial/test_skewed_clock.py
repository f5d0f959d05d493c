"""One device whose clock runs 295 s ahead (inside ingest.max_future_s, so it is accepted),
among 40 honest detectors reporting in real time, through the real pipeline (mosquitto,
cityflux, InfluxDB). Before the fix its readings pushed event time to now + 175 s: the current
minute closed early with a partial window, and readings 200 s old became too_late."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.simulators.citygen import CitySpec, generate_city
from cityflux.store.influx import InfluxWriter
from tests.support import Subscriber, count_points, publish_all, running, select, wait_for

SKEW_S = 295
NS = 1_000_000_000


def reading(ts_ms: int, vehicles: int) -> bytes:
    lanes = [{"lane": n, "count": vehicles, "occupancy_pct": 9.0, "speed_kmh": 55.0}
             for n in (1, 2, 3)]  # fmt: skip
    return msgspec.json.encode({"ts": ts_ms, "interval_s": 60, "lanes": lanes})


def test_one_skewed_clock_moves_no_one_elses_windows(
    config: Config, db: InfluxWriter, tmp_path: Path
) -> None:
    city = generate_city(CitySpec(districts=1, road_km=10, poles=2, manholes=1))
    city_map = tmp_path / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(city))
    config = config.with_overrides({
        "analytics.city_map": str(city_map),
        "analytics.idle_flush_s": 3_600,  # no idle flush: only event time closes windows
    })  # fmt: skip
    district = {s.id: s.district for s in city.segments}
    topics = [f"cityflux/v1/{district[d.segment]}/traffic/{d.id}" for d in city.detectors[:41]]
    honest, skewed = topics[:-1], topics[-1]
    letters = Subscriber(config.mqtt.port, "cityflux/v1/deadletter/#")
    try:
        with running(Pipeline(config)) as pipeline:
            assert pipeline.analytics is not None
            engine = pipeline.analytics.engine
            now_ms = time.time_ns() // 1_000_000
            publish_all(config.mqtt.port, [(t, reading(now_ms, 10)) for t in honest]
                        + [(skewed, reading(now_ms + SKEW_S * 1_000, 10))])  # fmt: skip
            wait_for(lambda: count_points(db, "traffic", "count") == 41 * 3, what="batch 1")
            # a gateway delivers readings 200 s old: inside delay + lateness, on time
            old_ms = now_ms - 200_000
            publish_all(config.mqtt.port, [(t, reading(old_ms, 20)) for t in honest])
            wait_for(lambda: count_points(db, "traffic", "count") == 81 * 3, what="batch 2")
            time.sleep(0.5)  # rejections are counted as the batch is acknowledged
            too_late = pipeline.metrics.value("rejections_total", reason="too_late")
            assert too_late == 0  # was: 40, the whole gateway's delivery
            old_end_ns = (old_ms // 60_000 + 1) * 60_000 * 1_000_000
            wait_for(
                lambda: select(db, "SELECT count(\"flow_vph\") FROM \"traffic_segment\" WHERE "
                                   f"\"window\" = '1m' AND time = {old_end_ns}"),
                what="the window of the 200-s-old readings, complete by the honest clocks",
            )  # fmt: skip
            newest_ns = engine.watermark.newest_ns
            minute_ns = now_ms // 60_000 * 60_000 * 1_000_000
            current = engine.traffic.panes[minute_ns]
            closed_early = select(
                db, f"SELECT count(flow_vph) FROM traffic_segment WHERE time > {old_end_ns}"
            )
            skewed_id = city.detectors[40].id
            skewed_rows = select(db, f"SELECT * FROM traffic WHERE device_id = '{skewed_id}'")
    finally:
        letters.close()
    assert letters.decoded() == []  # no too_late dead letters
    assert newest_ns <= time.time_ns() + 5 * NS  # event time: the wall clock + max_clock_skew_s
    assert not current.emitted and closed_early == []  # the current minute is still open
    assert len(current.rows()["entity"]) == 40 * 3  # with every honest reading of it
    # the skewed device's readings are stored, at their own (future) time
    assert [r["time"] for r in skewed_rows] == [(now_ms + SKEW_S * 1_000) * 1_000_000] * 3
