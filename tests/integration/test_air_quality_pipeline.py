"""The six-pollutant HJ 633 AQI through the real pipeline: an hour of a pole's readings with
all six pollutants, published to mosquitto as a gateway's array, decoded, windowed and the
AQI read back from InfluxDB with every IAQI, the tied primary pollutants and the exceedance
pollutants."""

from __future__ import annotations

import time

import msgspec

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter
from tests.support import count_points, mosquitto_pub, running, select, wait_for

POLE = "cityflux/v1/centre/pole/pole-0001"  # in examples/city-map.json
HOUR_MS = 3_600_000
# IAQI (HJ 633-2012 Table 1): PM2.5 75 -> 100, PM10 150 -> 100, SO2 1-hour 500 -> 100,
# NO2 1-hour 700 -> 150, CO 1-hour 35 -> 150, O3 1-hour 300 -> 150: three tied at 150
READING = {"pm25_ugm3": 75.0, "pm10_ugm3": 150.0, "so2_ugm3": 500.0, "no2_ugm3": 700.0,
           "co_mgm3": 35.0, "o3_ugm3": 300.0}  # fmt: skip


def test_six_pollutant_aqi_stored_for_known_readings(config: Config, db: InfluxWriter) -> None:
    hour_ms = (time.time_ns() // 1_000_000 // HOUR_MS - 3) * HOUR_MS  # a clock hour 3 h ago
    # PM alternating around its value (a constant would be a stuck sensor: qc_flags)
    readings = [
        {"ts": hour_ms + m * 60_000} | READING
        | {"pm25_ugm3": 74.9 + (m % 2) / 5, "pm10_ugm3": 149.8 + (m % 2) * 0.4}
        for m in range(60)
    ]  # fmt: skip
    # a later reading moves the watermark past the hour (delay 120 s)
    after = {"ts": hour_ms + HOUR_MS + 10 * 60_000, "noise_dba": 50.0}
    end_ns = (hour_ms + HOUR_MS) * 1_000_000
    with running(Pipeline(config)):
        mosquitto_pub(config.mqtt.port, POLE, msgspec.json.encode(readings))
        wait_for(lambda: count_points(db, "pole", "no2_ugm3") == 60, what="the hour stored")
        mosquitto_pub(config.mqtt.port, POLE, msgspec.json.encode(after))
        rows = wait_for(
            lambda: select(
                db,
                'SELECT * FROM "air_quality" WHERE "device_id" = \'pole-0001\' '
                f"AND time = {end_ns}",
            ),
            what="the hour's AQI",
        )
        (district,) = select(
            db, f"SELECT * FROM \"air_quality_district\" WHERE \"district\" = 'centre' "
            f"AND time = {end_ns}",
        )  # fmt: skip
    (row,) = rows
    assert row["aqi"] == 150.0 and row["category"] == 3 and row.get("qc_flags") is None
    assert row["primary"] == "o3_1h,no2,co"  # all three tied pollutants are named
    assert row["exceeding"] == "o3_1h,no2,co"  # IAQI > 100; PM and SO2 are at exactly 100
    assert {k: row[f"iaqi_{k}"] for k in ("pm25", "pm10", "so2", "no2", "co", "o3_1h")} == {
        "pm25": 100.0, "pm10": 100.0, "so2": 100.0, "no2": 150.0, "co": 150.0, "o3_1h": 150.0,
    }  # fmt: skip
    assert row.get("iaqi_o3_8h") is None  # one hour of O3: no 8-hour average (6 hours needed)
    assert (row["no2_1h_ugm3"], row["co_1h_mgm3"], row["o3_1h_ugm3"]) == (700.0, 35.0, 300.0)
    assert row["district"] == "centre"
    # the district's AQI over its unflagged poles (here the one pole), with HJ 633's colour
    assert (district["aqi"], district["primary"], district["colour"]) == (
        150.0, "o3_1h,no2,co", "#FF7E00")  # fmt: skip
    assert (district["poles"], district["poles_flagged"]) == (1, 0)
