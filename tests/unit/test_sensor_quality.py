"""Quality control of the poles' air sensors: stuck, drifting against the district's robust
median, PM2.5 above PM10; flagged poles left out of the district AQI; the alerts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cityflux.analytics import quality
from tests.unit.test_air_noise_engine import HOUR_MS, MIDNIGHT_MS, minutes, row, run


def means_of(pm25: list[float], **other: list[float]) -> dict[str, np.ndarray]:
    n = len(pm25)
    out = {k: np.full(n, np.nan) for k in ("pm25", "pm10", "so2", "no2", "co", "o3", "o3_8h")}
    out["pm25"] = np.array(pm25)
    out |= {k: np.array(v) for k, v in other.items()}
    return out


def no_recent(n: int) -> dict[str, np.ndarray]:
    return {f"{i}_{k}": np.zeros(n) for i in quality.STUCK_ITEMS for k in ("n", "min", "max")}


def test_group_median_is_each_districts_median() -> None:
    values = np.array([1.0, 5.0, 3.0, np.nan, 10.0, 20.0, 7.0])
    group = np.array([0, 0, 0, 0, 1, 1, 2])
    median, count = quality.group_median(values, group, 4)
    assert median[:3].tolist() == [3.0, 15.0, 7.0] and np.isnan(median[3])
    assert count.tolist() == [3, 2, 1, 0]


def test_a_pole_far_from_its_agreeing_district_drifts() -> None:
    pm25 = [30.0, 32.0, 28.0, 31.0, 29.0, 33.0, 80.0]  # one pole 50 above the others
    qc = quality.check(means_of(pm25), no_recent(7), np.zeros(7, np.int64), 1)
    assert qc.drift.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert qc.flags[6] == "drift:pm25" and qc.flagged.tolist() == [False] * 6 + [True]


def test_no_drift_below_the_floor_or_when_the_district_disagrees() -> None:
    near = [30.0, 30.5, 30.2, 30.1, 29.9, 30.3, 40.0]  # 10 µg/m³ off: many MADs, under 15
    qc = quality.check(means_of(near), no_recent(7), np.zeros(7, np.int64), 1)
    assert qc.drift[6] == 0
    spread = [5.0, 60.0, 20.0, 90.0, 40.0, 10.0, 150.0]  # the neighbours do not agree
    qc = quality.check(means_of(spread), no_recent(7), np.zeros(7, np.int64), 1)
    assert np.isnan(qc.drift).all()
    few = [30.0, 31.0, 29.0, 90.0]  # fewer than 5 neighbours
    assert np.isnan(
        quality.check(means_of(few), no_recent(4), np.zeros(4, np.int64), 1).drift
    ).all()


def test_districts_are_judged_apart() -> None:
    pm25 = [30.0, 31.0, 29.0, 30.0, 32.0, 90.0, 91.0, 89.0, 90.0, 92.0]
    district = np.array([0] * 5 + [1] * 5)
    qc = quality.check(means_of(pm25), no_recent(10), district, 2)
    assert (qc.drift == 0).all()  # a polluted district is not ten drifting sensors


def test_stuck_needs_ten_equal_readings() -> None:
    recent = no_recent(3)
    recent["pm25_n"] = np.array([15.0, 15.0, 9.0])
    recent["pm25_min"] = np.array([31.4, 30.0, 31.4])
    recent["pm25_max"] = np.array([31.4, 35.0, 31.4])
    qc = quality.check(means_of([31.4, 32.0, 31.4]), recent, np.zeros(3, np.int64), 1)
    assert qc.stuck[0] == 1 and qc.stuck[1] == 0 and np.isnan(qc.stuck[2])
    assert qc.flags[0] == "stuck:pm25"


def test_pm25_above_pm10_is_out_of_physics() -> None:
    qc = quality.check(
        means_of([40.0, 40.0, 40.0], pm10=[60.0, 39.0, np.nan]), no_recent(3),
        np.zeros(3, np.int64), 1,
    )  # fmt: skip
    assert qc.physics[0] == 0 and qc.physics[1] == 1 and np.isnan(qc.physics[2])
    assert qc.flags[1] == "pm25>pm10"


def test_district_means_leave_flagged_poles_out() -> None:
    values = {"pm25": np.array([30.0, 40.0, 500.0, 10.0])}
    usable = np.array([True, True, False, True])
    got = quality.district_means(values, usable, np.array([0, 0, 0, 1]), 3)
    assert got["pm25"][:2].tolist() == [35.0, 10.0] and np.isnan(got["pm25"][2])


def test_a_stuck_sensor_in_the_engine_is_flagged_and_alerted(tmp_path: Path) -> None:
    start = MIDNIGHT_MS + 10 * HOUR_MS
    rows: list[tuple[int, dict[str, Any]]] = [
        (ts, {"pm25_ugm3": 30.0 + (m % 7) / 10 if m < 40 else 31.4,  # frozen from 40 min
              "pm10_ugm3": 50.0 + (m % 5) / 10})
        for m, (ts, _) in enumerate(minutes(start, 60))
    ]  # fmt: skip
    out = run(tmp_path, rows)
    assert row(out, "air_quality", start + 45 * 60_000)["qc_flags"] == ""
    frozen = row(out, "air_quality", start + HOUR_MS)
    assert frozen["qc_flags"] == "stuck:pm25" and frozen["qc_flagged"]
    district = [r for r in out.results if getattr(r, "measurement", "") == "air_quality_district"
                and r.ts_ns == (start + HOUR_MS) * 10**6][-1]  # fmt: skip
    centre = list(district.tags["district"]).index("centre")
    assert district.fields["poles_flagged"][centre] == 1 and district.fields["poles"][centre] == 0
    assert np.isnan(district.fields["aqi"][centre])  # its only pole is left out
    raised = [a for a in out.alerts if a.rule == "sensor_stuck"]
    assert raised and raised[0].entity == "pole-0001" and "stuck:pm25" in raised[0].message
