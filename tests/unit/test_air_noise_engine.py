"""The pole path of the engine with real decoded readings: the six-pollutant AQI it stores, the
noise hour judged by the period it starts in (05:00-07:00, 21:00-23:00), the night-time Lmax
rules and their alert, the O3 8-hour average and the daily AQI from the kept hourly means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from cityflux.analytics.engine import AnalyticsEngine, Output
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Columns
from cityflux.model.points import Table

MIDNIGHT_MS = 1_795_536_000_000  # 2026-11-25T00:00:00+08:00
HOUR_MS = 3_600_000
POLE = "pole-0001"  # the example map's pole in zone 4a: day 70, night 55 dB(A)


def config_in(path: Path) -> Config:
    return Config().with_overrides({
        "analytics.checkpoint_dir": str(path), "analytics.alerts_db": str(path / "a.sqlite"),
        "ingest.max_past_s": 10**9,
    })  # fmt: skip


def readings(config: Config, rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Columns]:
    """Readings of POLE (ts ms, fields) through the real decoder and validator."""
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    topics = [f"cityflux/v1/centre/pole/{POLE}"] * len(rows)
    payloads = [msgspec.json.encode({"ts": ts} | fields) for ts, fields in rows]
    now = (MIDNIGHT_MS + 40 * HOUR_MS) * 1_000_000
    columns = decoder.decode(topics, payloads, now).columns
    return {k: validate(c, config.ingest, now)[0] for k, c in columns.items()}


def run(tmp_path: Path, rows: list[tuple[int, dict[str, Any]]]) -> Output:
    config = config_in(tmp_path)
    engine = AnalyticsEngine(config.analytics)
    out = Output()
    for hour in range(0, len(rows), 60):  # an hour of minutes per batch
        got = engine.process(readings(config, rows[hour : hour + 60]))
        out.results += got.results
        out.alerts += got.alerts
    flushed = engine.flush(now_ns=(MIDNIGHT_MS + 40 * HOUR_MS) * 1_000_000)
    out.results += flushed.results
    out.alerts += flushed.alerts
    engine.close()
    return out


def row(out: Output, measurement: str, end_ms: int) -> dict[str, Any]:
    """POLE's fields in the table of ``measurement`` at ``end_ms`` (the last one written)."""
    tables = [
        r for r in out.results
        if isinstance(r, Table) and r.measurement == measurement and r.ts_ns == end_ms * 10**6
    ]  # fmt: skip
    assert tables, f"no {measurement} at {end_ms}"
    table = tables[-1]
    i = list(table.tags["device_id"]).index(POLE)
    return {k: v[i].item() if isinstance(v[i], np.generic) else v[i]
            for k, v in table.fields.items()}  # fmt: skip


def row_of(out: Output, measurement: str, end_ms: int, district: str) -> dict[str, Any]:
    """A district's fields in the table of ``measurement`` at ``end_ms``."""
    table = [r for r in out.results if isinstance(r, Table) and r.measurement == measurement
             and r.ts_ns == end_ms * 10**6][-1]  # fmt: skip
    i = list(table.tags["district"]).index(district)
    return {k: v[i].item() if isinstance(v[i], np.generic) else v[i]
            for k, v in table.fields.items()}  # fmt: skip


def minutes(start_ms: int, count: int, **fields: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(start_ms + m * 60_000, dict(fields)) for m in range(count)]


def test_six_pollutant_aqi_of_known_readings(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 10 * HOUR_MS
    rows = minutes(start, 60, so2_ugm3=10.0, no2_ugm3=100.0, co_mgm3=1.0, o3_ugm3=50.0)
    for m, (_, fields) in enumerate(rows):  # PM alternating around 75 and 150: not stuck
        fields |= {"pm25_ugm3": 75.0 + (0.1 if m % 2 else -0.1),
                   "pm10_ugm3": 150.0 + (0.2 if m % 2 else -0.2)}  # fmt: skip
    out = run(tmp_path, rows)
    air = row(out, "air_quality", start + HOUR_MS)
    assert air["aqi"] == 100 and air["primary"] == "pm25,pm10"  # a tie names both
    assert air["iaqi_pm25"] == 100 and air["iaqi_pm10"] == 100
    assert air["iaqi_no2"] == 50 and air["iaqi_so2"] == 4  # ceil(10 x 50 / 150)
    assert air["iaqi_co"] == 10 and air["iaqi_o3_1h"] == 16  # ceil(50 x 50 / 160) = 16
    assert air["no2_1h_ugm3"] == 100 and air["co_1h_mgm3"] == 1.0
    assert air["category"] == 2 and air["exceeding"] == ""
    district = row_of(out, "air_quality_district", start + HOUR_MS, "centre")
    assert district["aqi"] == 100 and district["colour"] == "#FFFF00" and district["poles"] == 1
    assert np.isnan(air["iaqi_o3_8h"])  # one hour of O3: no 8-hour average yet (6 needed)


def test_zero_readings_give_aqi_0_not_minus_0(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 10 * HOUR_MS
    out = run(tmp_path, minutes(start, 60, pm25_ugm3=0.0, pm10_ugm3=0.0, no2_ugm3=0.0))
    air = row(out, "air_quality", start + HOUR_MS)
    assert air["aqi"] == 0 and not np.signbit(air["aqi"])


def test_so2_above_800_falls_back_to_its_24_hour_mean(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 10 * HOUR_MS
    rows = minutes(start, 60, so2_ugm3=100.0) + minutes(start + HOUR_MS, 60, so2_ugm3=900.0)
    out = run(tmp_path, rows)
    air = row(out, "air_quality", start + 2 * HOUR_MS)
    assert air["so2_1h_ugm3"] == 900
    assert air["iaqi_so2"] == 154  # 24-hour table at (100 + 900) / 2 = 500: 150 + 25 x 50 / 325


def test_o3_8_hour_moving_average_after_six_hours(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 8 * HOUR_MS
    rows = [r for h in range(8) for r in minutes(start + h * HOUR_MS, 60, o3_ugm3=240.0 - 20 * h)]
    out = run(tmp_path, rows)
    air = row(out, "air_quality", start + 8 * HOUR_MS)
    assert air["o3_1h_ugm3"] == 100 and air["iaqi_o3_1h"] == 32  # 100 x 50 / 160 = 31.25
    assert air["o3_8h_ugm3"] == 170  # mean of 240, 220, ..., 100
    assert air["iaqi_o3_8h"] == 110  # 100 + 10 x 50 / 55 = 109.09 -> 110
    assert air["aqi"] == 110 and air["primary"] == "o3_8h" and air["exceeding"] == "o3_8h"
    assert not np.isnan(row(out, "air_quality", start + 6 * HOUR_MS)["iaqi_o3_8h"])  # 6 hours
    assert np.isnan(row(out, "air_quality", start + 5 * HOUR_MS)["iaqi_o3_8h"])  # 5: too few


def test_daily_aqi_on_the_hour_after_20_hours(tmp_path: Path) -> None:
    start = MIDNIGHT_MS
    rows = minutes(start, 24 * 60, pm25_ugm3=75.0, no2_ugm3=80.0, o3_ugm3=100.0)
    for m, (_, fields) in enumerate(rows):  # PM wobbling (a constant would be stuck)
        fields["pm25_ugm3"] = 75.0 + (0.1 if m % 2 else -0.1)
    rows[12 * 60 + 30][1]["o3_ugm3"] = 1300.0  # one minute: hour 12's mean 120
    out = run(tmp_path, rows)
    day = row(out, "air_quality", start + 24 * HOUR_MS)
    assert day["aqi_24h"] == 100 and day["primary_24h"] == "pm25,no2"  # NO2 24-hour 80: 100
    assert day["category_24h"] == 2
    assert day["aqi"] == 100 and day["primary"] == "pm25"  # NO2 on the 1-hour table: 40
    assert "aqi_24h" not in row(out, "air_quality", start + 24 * HOUR_MS - 300_000)
    # at 19 hours only the O3 8-hour item is judged (14 8-hour means, hours 6-19): the
    # 8-hour mean with hour 12's 120 is 102.5 -> 102 (half to even), IAQI 50 + 2 x 50/60
    early = row(out, "air_quality", start + 19 * HOUR_MS)
    assert (early["aqi_24h"], early["primary_24h"]) == (52, "o3_8h")


@pytest.mark.parametrize(
    ("hour", "period", "limit"),
    [(5, "night", 55.0), (6, "day", 70.0), (21, "day", 70.0), (22, "night", 55.0)],
)
def test_noise_hour_is_judged_by_the_period_it_starts_in(
    tmp_path: Path, hour: int, period: str, limit: float
) -> None:
    start = MIDNIGHT_MS + hour * HOUR_MS
    out = run(tmp_path, minutes(start, 60, noise_dba=60.0))
    noise = row(out, "noise", start + HOUR_MS)
    assert (noise["period"], noise["limit_dba"]) == (period, limit)
    assert noise["exceed_dba"] == pytest.approx(60.0 - limit)


def night_lmax(levels: list[float]) -> list[tuple[int, dict[str, Any]]]:
    start = MIDNIGHT_MS + 2 * HOUR_MS
    rows = minutes(start, 60, noise_dba=50.0, noise_lmax_dba=60.0)
    for i, level in enumerate(levels):
        rows[10 * i + 5][1]["noise_lmax_dba"] = level
    return rows


@pytest.mark.parametrize(
    ("levels", "violation", "frequent"),
    [([64.9, 64.9, 64.9], 0.0, 0), ([65.5, 65.5], 0.0, 2), ([65.5, 65.5, 65.5], 1.0, 3),
     ([70.0], 0.0, 1), ([70.1], 1.0, 1), ([], 0.0, 0)],
)  # fmt: skip
def test_night_lmax_frequent_and_sporadic(
    tmp_path: Path, levels: list[float], violation: float, frequent: int
) -> None:
    out = run(tmp_path, night_lmax(levels))
    noise = row(out, "noise", MIDNIGHT_MS + 3 * HOUR_MS)
    assert noise["lmax_violation"] == violation
    assert noise["lmax_frequent_n"] == frequent
    assert noise["lmax_dba"] == max([60.0, *levels])
    raised = [a for a in out.alerts if a.rule == "noise_night_lmax" and a.state == "active"]
    assert bool(raised) == (violation == 1.0)


def test_lmax_by_day_is_no_violation(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 12 * HOUR_MS
    out = run(tmp_path, minutes(start, 60, noise_dba=60.0, noise_lmax_dba=90.0))
    noise = row(out, "noise", start + HOUR_MS)
    assert noise["lmax_violation"] == 0.0 and noise["lmax_dba"] == 90.0


def test_a_checkpoint_from_before_the_gases_still_loads(tmp_path: Path) -> None:
    """Pole panes and partials without the columns and keys issue 13 added (as written by
    the version before it) are restored, not set aside as corrupt."""
    config = config_in(tmp_path)
    start = MIDNIGHT_MS + 10 * HOUR_MS
    engine = AnalyticsEngine(config.analytics)
    engine.process(readings(config, minutes(start, 30, pm25_ugm3=20.0, noise_dba=50.0)))
    engine.close()
    old_columns = {"entity", "ts_ns", "pm25_ugm3", "pm10_ugm3", "noise_dba", "lamp_on",
                   "lamp_power_w", "lamp_fault"}  # fmt: skip
    old_partials = {"pm25_sum", "pm25_n", "pm10_sum", "pm10_n", "energy_sum", "noise_n",
                    "lamp_rows", "lamp_bad"}  # fmt: skip
    path = tmp_path / "windows.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("pole_hour")}
    arrays = {k: v for k, v in arrays.items()
              if not (k.startswith("poles|") and k.split("|")[3] not in old_columns)
              and not (k.startswith("pole#") and k.split("#")[2] not in old_partials)}  # fmt: skip
    assert any(k.startswith("poles|") for k in arrays) and any(
        k.startswith("pole#") for k in arrays
    )
    np.savez(path, **arrays)  # type: ignore[arg-type]
    again = AnalyticsEngine(config.analytics)
    assert again.counts["checkpoint_corrupt"] == 0 and again.poles.panes
    out = again.process(readings(config, minutes(start + 30 * 60_000, 40, pm25_ugm3=20.0,
                                                 no2_ugm3=40.0)))  # fmt: skip
    again.close()
    air = row(out, "air_quality", start + HOUR_MS)
    assert air["pm25_1h_ugm3"] == 20 and air["no2_1h_ugm3"] == 40
