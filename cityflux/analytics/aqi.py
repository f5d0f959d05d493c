"""HJ 633-2012, the Technical Regulation on Ambient Air Quality Index, as vectorised functions.

Six pollutants, two kinds of report (docs/analytics.md has the tables and their source):

* **real-time (hourly)**: SO2, NO2, CO, O3 1-hour means on the 1-hour breakpoints, the O3
  8-hour moving average on the 8-hour breakpoints, PM10 and PM2.5 1-hour means on the 24-hour
  breakpoints (the particulates have no 1-hour ones);
* **daily (24-hour)**: SO2, NO2, CO, PM10, PM2.5 24-hour means, the day's highest O3 1-hour
  mean and highest O3 8-hour moving average.

Two special rules (HJ 633 Table 1, notes 2 and 3): an SO2 1-hour mean above 800 µg/m³ has no
1-hour IAQI, the SO2 24-hour value is used instead; an O3 8-hour mean above 800 µg/m³ has no
8-hour IAQI, the O3 1-hour value decides.

Rounding: concentrations are first rounded to the grid they are reported on (whole µg/m³, CO
to 0.1 mg/m³; round half to even, GB/T 8170), then IAQI = IAQI_lo + (IAQI_hi - IAQI_lo) x
(C - BP_lo) / (BP_hi - BP_lo) is **rounded up** to an integer ("进位取整数"), computed in integer
arithmetic: no value on a breakpoint lands one above it. Above the last breakpoint an IAQI is
500. AQI = the largest IAQI; when AQI > 50 every pollutant whose IAQI equals it is a primary
pollutant; every pollutant with IAQI > 100 is an exceedance pollutant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
IAQI_POINTS: Final = (0, 50, 100, 150, 200, 300, 400, 500)

# HJ 633-2012 Table 1: concentration at IAQI 0, 50, 100, 150, 200, 300, 400, 500 (µg/m³; CO
# mg/m³). SO2 1-hour ends at IAQI 200 (800) and O3 8-hour at IAQI 300 (800): the fallbacks.
HJ633_2012: Final[dict[str, tuple[int, ...]]] = {
    "so2_1h": (0, 150, 500, 650, 800),
    "so2_24h": (0, 50, 150, 475, 800, 1600, 2100, 2620),
    "no2_1h": (0, 100, 200, 700, 1200, 2340, 3090, 3840),
    "no2_24h": (0, 40, 80, 180, 280, 565, 750, 940),
    "pm10_24h": (0, 50, 150, 250, 350, 420, 500, 600),
    "co_1h": (0, 5, 10, 35, 60, 90, 120, 150),
    "co_24h": (0, 2, 4, 14, 24, 36, 48, 60),
    "o3_1h": (0, 160, 200, 300, 400, 800, 1000, 1200),
    "o3_8h": (0, 100, 160, 215, 265, 800),
    "pm25_24h": (0, 35, 75, 115, 150, 250, 350, 500),
}
TABLES: Final[dict[str, dict[str, tuple[int, ...]]]] = {
    "HJ633-2012": HJ633_2012,
    # The 2026 revision moves the particulates' IAQI-100 point (second-hand, unverified):
    # PM2.5 60, PM10 120; everything else as 2012.
    "HJ633-2026": HJ633_2012
    | {
        "pm10_24h": (0, 50, 120, 250, 350, 420, 500, 600),
        "pm25_24h": (0, 35, 60, 115, 150, 250, 350, 500),
    },
}
# Reporting grid: concentrations are rounded to 1/SCALE of their unit before the IAQI.
SCALE: Final = {"co": 10}
TRUNCATED_AT: Final = {"so2_1h": 800, "o3_8h": 800}  # above: no IAQI from this table

# The pollutant items of each report, in the order a tie lists them.
ITEMS: Final = ("pm25", "pm10", "o3_8h", "o3_1h", "no2", "so2", "co")

CATEGORIES: Final = (
    "excellent",
    "good",
    "lightly polluted",
    "moderately polluted",
    "heavily polluted",
    "severely polluted",
)
CATEGORY_UPPER: Final = np.array([50.0, 100.0, 150.0, 200.0, 300.0])
# HJ 633 Table 2: the colour of each category (RGB)
COLOURS: Final = ("#00E400", "#FFFF00", "#FF7E00", "#FF0000", "#99004C", "#7E0023")


def reported(pollutant: str, concentration: Array) -> Array:
    """The concentration on its reporting grid (whole µg/m³; CO 0.1 mg/m³), half to even."""
    scale = SCALE.get(pollutant.split("_", maxsplit=1)[0], 1)
    result: Array = np.round(np.asarray(concentration, dtype=np.float64) * scale) / scale
    return result


def iaqi(table: str, concentration: Array, standard: str = "HJ633-2012") -> Array:
    """Individual AQI of ``concentration`` on one breakpoint table (e.g. ``"no2_1h"``): an
    integer-valued float, NaN for no data and above a truncated table's end (SO2 1-hour, O3
    8-hour: the caller applies the fallback)."""
    points = np.array(TABLES[standard][table], dtype=np.int64)
    scale = SCALE.get(table.split("_", maxsplit=1)[0], 1)
    c = reported(table, concentration)
    missing = np.isnan(c)
    scaled = np.where(missing, 0, np.rint(c * scale)).astype(np.int64)
    bp = points * scale
    segment = np.clip(np.searchsorted(bp, scaled, side="right") - 1, 0, len(bp) - 2)
    lo, hi = bp[segment], bp[segment + 1]
    i_lo = np.array(IAQI_POINTS, dtype=np.int64)[segment]
    i_hi = np.array(IAQI_POINTS, dtype=np.int64)[segment + 1]
    above = scaled > bp[-1]
    numerator = (i_hi - i_lo) * (np.minimum(scaled, bp[-1]) - lo)
    value = i_lo - (-numerator // (hi - lo))  # ceiling division, exact in int64
    result = np.where(above, 500, value).astype(np.float64)
    truncated = TRUNCATED_AT.get(table)
    if truncated is not None:
        result = np.where(scaled > truncated * scale, np.nan, result)
    return np.where(missing, np.nan, result)


@dataclass(slots=True)
class Index:
    """An AQI report over many stations (poles) at once."""

    aqi: Array  # float, NaN where no pollutant has data
    iaqi: dict[str, Array]  # per item of the report
    primary: Array  # str: the tied primary pollutants, comma-separated ("pm25,pm10"); "" <= 50
    exceeding: Array  # str: every pollutant with IAQI > 100, comma-separated
    category: Array  # int 1-6, 0: no data

    @property
    def colour(self) -> Array:
        return np.array(("", *COLOURS), dtype=object)[self.category]


def hourly(c: dict[str, Array], so2_24h: Array, standard: str = "HJ633-2012") -> Index:
    """Real-time AQI from 1-hour means ``c`` (keys so2, no2, co, o3, pm10, pm25) and the O3
    8-hour moving average (``o3_8h``); ``so2_24h``: the SO2 24-hour mean, used where the 1-hour
    one is above 800."""
    so2_fallback = iaqi("so2_24h", so2_24h, standard)
    so2 = iaqi("so2_1h", c["so2"], standard)
    so2 = np.where(np.isnan(so2) & ~np.isnan(c["so2"]), so2_fallback, so2)
    iaqis = {
        "pm25": iaqi("pm25_24h", c["pm25"], standard),
        "pm10": iaqi("pm10_24h", c["pm10"], standard),
        "o3_8h": iaqi("o3_8h", c["o3_8h"], standard),  # > 800: NaN, the 1-hour value decides
        "o3_1h": iaqi("o3_1h", c["o3"], standard),
        "no2": iaqi("no2_1h", c["no2"], standard),
        "so2": so2,
        "co": iaqi("co_1h", c["co"], standard),
    }
    return combine(iaqis)


def daily(c: dict[str, Array], standard: str = "HJ633-2012") -> Index:
    """Daily AQI from 24-hour means (so2, no2, co, pm10, pm25), the highest O3 1-hour mean
    (``o3_1h_max``) and the highest O3 8-hour moving average (``o3_8h_max``) of the day."""
    iaqis = {
        "pm25": iaqi("pm25_24h", c["pm25"], standard),
        "pm10": iaqi("pm10_24h", c["pm10"], standard),
        "o3_8h": iaqi("o3_8h", c["o3_8h_max"], standard),
        "o3_1h": iaqi("o3_1h", c["o3_1h_max"], standard),
        "no2": iaqi("no2_24h", c["no2"], standard),
        "so2": iaqi("so2_24h", c["so2"], standard),
        "co": iaqi("co_24h", c["co"], standard),
    }
    return combine(iaqis)


def combine(iaqis: dict[str, Array]) -> Index:
    """AQI, tied primary pollutants, exceedance pollutants and category from the IAQIs."""
    names = list(iaqis)
    stacked = np.vstack([iaqis[n] for n in names])  # (items, stations)
    filled = np.where(np.isnan(stacked), -1.0, stacked)
    best = filled.max(axis=0)
    value = np.where(best < 0, np.nan, best)
    value = value + 0.0  # never -0.0
    primary = joined(names, (filled == best) & (best > 50))
    exceeding = joined(names, filled > 100)
    category = np.searchsorted(CATEGORY_UPPER, value, side="left") + 1
    category = np.where(np.isnan(value), 0, category).astype(np.int64)
    return Index(value, iaqis, primary, exceeding, category)


def joined(names: list[str], mask: Array) -> Array:
    """Per column of ``mask`` (items x stations), the names of the set rows joined by commas:
    one string per distinct pattern, not one join per station."""
    if mask.shape[1] == 0:
        return np.array([], dtype=object)
    weights = 1 << np.arange(len(names), dtype=np.int64)
    code = (mask.astype(np.int64) * weights[:, None]).sum(axis=0)
    patterns, inverse = np.unique(code, return_inverse=True)
    text = [",".join(n for i, n in enumerate(names) if int(p) >> i & 1) for p in patterns]
    return np.array(text, dtype=object)[inverse.reshape(-1)]
