"""HJ 633-2012 known answers: every breakpoint of every table (1-hour and 24-hour, six
pollutants, O3 8-hour), one reporting step either side of it, the two fallback rules, tied
primary pollutants, exceedance pollutants, categories and colours, and no -0."""

from __future__ import annotations

from fractions import Fraction
from math import ceil

import numpy as np
import pytest

from cityflux.analytics import aqi
from cityflux.analytics.aqi import IAQI_POINTS

# Table 1 of HJ 633-2012, typed in again from the standard (not imported): a typo in the
# module's table fails here
STANDARD = {
    "so2_24h": [0, 50, 150, 475, 800, 1600, 2100, 2620],
    "so2_1h": [0, 150, 500, 650, 800],
    "no2_24h": [0, 40, 80, 180, 280, 565, 750, 940],
    "no2_1h": [0, 100, 200, 700, 1200, 2340, 3090, 3840],
    "pm10_24h": [0, 50, 150, 250, 350, 420, 500, 600],
    "co_24h": [0, 2, 4, 14, 24, 36, 48, 60],
    "co_1h": [0, 5, 10, 35, 60, 90, 120, 150],
    "o3_1h": [0, 160, 200, 300, 400, 800, 1000, 1200],
    "o3_8h": [0, 100, 160, 215, 265, 800],
    "pm25_24h": [0, 35, 75, 115, 150, 250, 350, 500],
}


def one(table: str, concentration: float) -> float:
    return float(aqi.iaqi(table, np.array([concentration]))[0])


def expected(table: str, concentration: Fraction) -> int:
    """The formula of HJ 633 (5.2) in exact fractions, rounded up."""
    points = STANDARD[table]
    for j in range(len(points) - 1):
        lo, hi = points[j], points[j + 1]
        if lo <= concentration <= hi:
            i_lo, i_hi = IAQI_POINTS[j], IAQI_POINTS[j + 1]
            return ceil(i_lo + Fraction(i_hi - i_lo) * (concentration - lo) / (hi - lo))
    return 500


def test_the_tables_are_the_standards() -> None:
    assert {k: tuple(v) for k, v in STANDARD.items()} == aqi.HJ633_2012


@pytest.mark.parametrize("table", sorted(STANDARD))
def test_every_breakpoint_and_one_step_either_side(table: str) -> None:
    step = Fraction(1, 10) if table.startswith("co") else Fraction(1)
    for j, point in enumerate(STANDARD[table]):
        assert one(table, float(point)) == IAQI_POINTS[j], (table, point)
        for c in (point - step, point + step):
            if c < 0 or c > STANDARD[table][-1]:
                continue
            assert one(table, float(c)) == expected(table, c), (table, float(c))


@pytest.mark.parametrize("table", sorted(STANDARD))
def test_every_reporting_step_of_every_table(table: str) -> None:
    """The whole range, one reporting step at a time, against the exact formula."""
    step = Fraction(1, 10) if table.startswith("co") else Fraction(1)
    top = STANDARD[table][-1]
    grid = [step * k for k in range(int(top / step) + 1)]
    got = aqi.iaqi(table, np.array([float(c) for c in grid]))
    want = [expected(table, c) for c in grid]
    assert got.tolist() == want


def test_rounding_to_the_reporting_grid_first() -> None:
    assert one("pm25_24h", 35.4) == 50  # reported as 35
    assert one("pm25_24h", 35.5) == 52  # reported as 36 (half to even): 51.25 rounded up
    assert one("pm25_24h", 36.5) == 52  # half to even: 36
    assert one("co_1h", 5.04) == 50  # reported as 5.0 mg/m³
    assert one("co_1h", 5.06) == 51  # 5.1: 50 + 0.1 x 50 / 5 = 51 exactly


def test_above_the_last_breakpoint_is_500_and_nan_is_no_data() -> None:
    assert one("pm25_24h", 800.0) == 500
    assert one("co_1h", 180.0) == 500
    assert np.isnan(one("no2_1h", float("nan")))


def test_truncated_tables_have_no_value_above_800() -> None:
    assert one("so2_1h", 800.0) == 200
    assert np.isnan(one("so2_1h", 801.0))
    assert one("o3_8h", 800.0) == 300
    assert np.isnan(one("o3_8h", 801.0))


def hourly(**c: float) -> aqi.Index:
    names = ("so2", "no2", "co", "o3", "o3_8h", "pm10", "pm25")
    columns = {n: np.array([c.get(n, np.nan)]) for n in names}
    return aqi.hourly(columns, np.array([c.get("so2_24h", np.nan)]))


def test_so2_above_800_falls_back_to_the_24_hour_value() -> None:
    report = hourly(so2=900.0, so2_24h=475.0)
    assert report.iaqi["so2"][0] == 150  # the 24-hour table at 475, not the 1-hour one
    assert report.aqi[0] == 150 and report.primary[0] == "so2"
    assert hourly(so2=650.0, so2_24h=475.0).iaqi["so2"][0] == 150  # 1-hour table: 650 -> 150
    assert hourly(so2=700.0, so2_24h=10.0).iaqi["so2"][0] == 167  # 150 + 50 x 50/150 -> 167


def test_o3_8_hour_above_800_leaves_the_1_hour_value() -> None:
    report = hourly(o3=1000.0, o3_8h=850.0)
    assert np.isnan(report.iaqi["o3_8h"][0])
    assert report.iaqi["o3_1h"][0] == 400
    assert report.aqi[0] == 400 and report.primary[0] == "o3_1h"
    below = hourly(o3=400.0, o3_8h=265.0)
    assert below.aqi[0] == 200 and below.primary[0] == "o3_8h,o3_1h"  # a tie


def test_ties_name_every_primary_pollutant() -> None:
    report = hourly(pm25=75.0, pm10=150.0)  # the example: both IAQI 100
    assert report.aqi[0] == 100
    assert report.primary[0] == "pm25,pm10"
    three = hourly(pm25=115.0, pm10=250.0, no2=700.0, so2=5.0)
    assert three.primary[0] == "pm25,pm10,no2" and three.exceeding[0] == "pm25,pm10,no2"


def test_no_primary_pollutant_at_50_or_below() -> None:
    report = hourly(pm25=35.0, pm10=50.0, no2=100.0)
    assert report.aqi[0] == 50 and report.primary[0] == "" and report.exceeding[0] == ""
    assert report.category[0] == 1 and report.colour[0] == "#00E400"


def test_exceedance_pollutants_are_those_above_100() -> None:
    report = hourly(pm25=76.0, pm10=150.0, co=12.0)
    assert report.iaqi["pm10"][0] == 100 and report.iaqi["co"][0] == 104
    assert report.iaqi["pm25"][0] == 102  # 101.25 rounded up
    assert report.exceeding[0] == "pm25,co"  # pm10 at exactly 100 is not exceeding
    assert report.primary[0] == "co"


@pytest.mark.parametrize(
    ("pm25", "category", "colour"),
    [(0, 1, "#00E400"), (35, 1, "#00E400"), (36, 2, "#FFFF00"), (75, 2, "#FFFF00"),
     (76, 3, "#FF7E00"), (115, 3, "#FF7E00"), (116, 4, "#FF0000"), (150, 4, "#FF0000"),
     (151, 5, "#99004C"), (250, 5, "#99004C"), (251, 6, "#7E0023"), (600, 6, "#7E0023")],
)  # fmt: skip
def test_categories_and_colours(pm25: float, category: int, colour: str) -> None:
    report = hourly(pm25=pm25)
    assert report.category[0] == category
    assert report.colour[0] == colour


def test_zero_is_zero_not_minus_zero() -> None:
    report = hourly(pm25=0.0, pm10=0.0, so2=0.0)
    assert report.aqi[0] == 0 and not np.signbit(report.aqi[0])
    assert report.category[0] == 1
    assert all(not np.signbit(v[0]) for v in report.iaqi.values() if not np.isnan(v[0]))


def test_no_data_is_nan_category_0() -> None:
    report = hourly()
    assert np.isnan(report.aqi[0]) and report.category[0] == 0 and report.primary[0] == ""


def test_daily_report_uses_the_24_hour_tables() -> None:
    names = ("so2", "no2", "co", "pm10", "pm25", "o3_1h_max", "o3_8h_max")
    values = {"so2": 150.0, "no2": 80.0, "co": 4.0, "pm10": 50.0, "pm25": 20.0,
              "o3_1h_max": 150.0, "o3_8h_max": 100.0}  # fmt: skip
    report = aqi.daily({n: np.array([values[n]]) for n in names})
    assert report.iaqi["so2"][0] == 100 and report.iaqi["no2"][0] == 100
    assert report.iaqi["co"][0] == 100 and report.iaqi["o3_8h"][0] == 50
    assert report.aqi[0] == 100 and report.primary[0] == "no2,so2,co"
    over = aqi.daily({n: np.array([values[n]]) for n in names} | {
        "o3_8h_max": np.array([900.0]), "o3_1h_max": np.array([1000.0])})  # fmt: skip
    assert np.isnan(over.iaqi["o3_8h"][0]) and over.aqi[0] == 400


def test_many_stations_at_once() -> None:
    n = 10_000
    rng = np.random.default_rng(1)
    c = {k: rng.uniform(0, 400, n) for k in ("so2", "no2", "o3", "o3_8h", "pm10", "pm25")}
    c["co"] = rng.uniform(0, 20, n)
    report = aqi.hourly(c, c["so2"])
    assert report.aqi.shape == (n,) and set(report.category.tolist()) <= set(range(1, 7))
    i = 1234
    single = aqi.hourly({k: v[i : i + 1] for k, v in c.items()}, c["so2"][i : i + 1])
    assert single.aqi[0] == report.aqi[i] and single.primary[0] == report.primary[i]


def test_the_2026_table_moves_the_good_boundary() -> None:
    assert aqi.iaqi("pm25_24h", np.array([60.0]), "HJ633-2026")[0] == 100
    assert aqi.iaqi("pm25_24h", np.array([75.0]), "HJ633-2026")[0] == 114  # ceil(113.6)
    assert aqi.iaqi("pm10_24h", np.array([150.0]), "HJ633-2026")[0] == 112  # ceil(111.5)
