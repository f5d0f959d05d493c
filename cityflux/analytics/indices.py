"""The indices the operations centre uses, as vectorised functions over numpy arrays.

Every table here comes with its source in docs/analytics.md; figures marked unverified there
are configurable. Inputs are arrays (one value per segment, pole, ...); NaN means "no data" and
propagates: a missing detector never becomes a zero.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np

from cityflux.analytics import aqi as hj633

# -- GB/T 33171-2016: delay proportion -> traffic performance index (linear within bands) ----------
TPI_DTP_BANDS: Final = np.array([0.0, 0.3, 0.5, 0.6, 0.7, 1.0])
TPI_BANDS: Final = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
TPI_LEVELS: Final = ("smooth", "basically smooth", "light", "moderate", "severe")

# Segment congestion level from speed bands per road class (km/h, lower bounds of levels 1-4:
# smooth > b1, basically smooth b2-b1, light b3-b2, moderate b4-b3, severe <= b4). Unverified
# second-hand figures (docs/analytics.md): configurable.
SPEED_BANDS_KMH: Final[dict[str, tuple[float, float, float, float]]] = {
    "expressway": (65.0, 50.0, 35.0, 20.0),
    "arterial": (40.0, 30.0, 20.0, 15.0),
    "secondary": (35.0, 25.0, 15.0, 10.0),
    "branch": (35.0, 25.0, 15.0, 10.0),
}

# -- HCM level of service ----------------------------------------------------------------------
LOS_LETTERS: Final = np.array(list("ABCDEF"))
# Urban street segments (HCM 2010, Exhibit 16-4): travel speed as % of base free-flow speed.
URBAN_LOS_PCT: Final = np.array([85.0, 67.0, 50.0, 40.0, 30.0])  # A > 85 ... E > 30, F <= 30
# Basic freeway segments (HCM 6th ed., Exhibit 12-15): density pc/mi/ln upper bounds A..E.
FREEWAY_LOS_PCMILN: Final = np.array([11.0, 18.0, 26.0, 35.0, 45.0])
KM_PER_MILE: Final = 1.609344

# -- HJ 633: the tables and the six-pollutant AQI are in aqi.py; iaqi() and aqi() below are the
# particulates-only forms kept for callers of this module.

# -- GB 3096-2008: environmental noise limits, Leq dB(A) ---------------------------------------
NOISE_LIMITS_DBA: Final[dict[str, tuple[float, float]]] = {  # zone: (day, night)
    "0": (50.0, 40.0),
    "1": (55.0, 45.0),
    "2": (60.0, 50.0),
    "3": (65.0, 55.0),
    "4a": (70.0, 55.0),
    "4b": (70.0, 60.0),
}
DAY_STARTS_H: Final = 6.0
NIGHT_STARTS_H: Final = 22.0

# Band edges are compared on a fixed decimal grid: a ratio or speed is rounded to 9 decimals
# first, so a value that is on an edge in decimal (free flow 24 km/h, speed 9.6: DTP 0.6) is on
# it in binary too, not one ulp to either side (1 - 9.6/24 = 0.6000000000000001).
GRID_DECIMALS: Final = 9


def on_grid(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the comparison grid (1e-9): what every band test looks at."""
    result: np.ndarray = np.round(values, GRID_DECIMALS)
    return result


def delay_proportion(speed_kmh: np.ndarray, free_flow_kmh: np.ndarray) -> np.ndarray:
    """DTP = (T - T0) / T = 1 - v / vf for a fixed length; 0 when faster than free flow."""
    dtp: np.ndarray = np.clip(on_grid(1.0 - speed_kmh / free_flow_kmh), 0.0, 1.0)
    return dtp


def tpi_from_dtp(dtp: np.ndarray) -> np.ndarray:
    """GB/T 33171 TPI 0-10, linear inside each band."""
    tpi: np.ndarray = np.interp(dtp, TPI_DTP_BANDS, TPI_BANDS)
    return np.where(np.isnan(dtp), np.nan, tpi)


def tpi_level(tpi: np.ndarray) -> np.ndarray:
    """1 smooth, 2 basically smooth, 3 light, 4 moderate, 5 severe (0: no data)."""
    level = np.searchsorted(np.array([2.0, 4.0, 6.0, 8.0]), on_grid(tpi), side="right") + 1
    return np.where(np.isnan(tpi), 0, level)


def speed_bands(road_class: np.ndarray) -> np.ndarray:
    """The (n, 4) speed band bounds of each segment's road class."""
    bands: np.ndarray = np.array([SPEED_BANDS_KMH[str(c)] for c in road_class]).reshape(-1, 4)
    return bands


def congestion_level(speed_kmh: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """1 (smooth) to 5 (severe) from the speed bands of each segment (:func:`speed_bands`);
    0: no data."""
    level = 1 + np.sum(on_grid(speed_kmh)[:, None] <= bands, axis=1)
    return np.where(np.isnan(speed_kmh), 0, level)


def urban_los(speed_kmh: np.ndarray, free_flow_kmh: np.ndarray, vc: np.ndarray) -> np.ndarray:
    """HCM 2010 urban street LOS from speed as % of free flow; v/c > 1 forces F."""
    pct = on_grid(100.0 * speed_kmh / free_flow_kmh)
    index = np.sum(pct[:, None] <= URBAN_LOS_PCT, axis=1)  # 0 = A ... 5 = F
    index = np.where(vc > 1.0, 5, index)
    return np.where(np.isnan(speed_kmh), "", LOS_LETTERS[index])


def freeway_los(density_vpkmpl: np.ndarray, vc: np.ndarray) -> np.ndarray:
    """HCM basic freeway LOS from density (vehicles taken as passenger cars); v/c > 1 is F."""
    per_mile = on_grid(density_vpkmpl * KM_PER_MILE)
    index = np.sum(per_mile[:, None] > FREEWAY_LOS_PCMILN, axis=1)
    index = np.where(vc > 1.0, 5, index)
    return np.where(np.isnan(density_vpkmpl), "", LOS_LETTERS[index])


def level_of_service(
    road_class: np.ndarray,
    speed_kmh: np.ndarray,
    free_flow_kmh: np.ndarray,
    density_vpkmpl: np.ndarray,
    vc: np.ndarray,
) -> np.ndarray:
    freeway = road_class == "expressway"
    return np.where(
        freeway, freeway_los(density_vpkmpl, vc), urban_los(speed_kmh, free_flow_kmh, vc)
    )


def iaqi(pollutant: str, concentration: np.ndarray, table: str = "HJ633-2012") -> np.ndarray:
    """Individual AQI of PM2.5 or PM10 on the 24-hour breakpoints (:func:`aqi.iaqi`)."""
    return hj633.iaqi(f"{pollutant}_24h", concentration, table)


def aqi(
    pm25: np.ndarray, pm10: np.ndarray, table: str = "HJ633-2012"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AQI, primary pollutants, category 1-6) from the particulates alone: tied primary
    pollutants are all named ("pm25,pm10"), none when AQI <= 50."""
    report = hj633.combine({"pm25": iaqi("pm25", pm25, table), "pm10": iaqi("pm10", pm10, table)})
    return report.aqi, report.primary, report.category


def energy(level_db: np.ndarray) -> np.ndarray:
    """Sound energy 10^(L/10): what Leq averages."""
    result: np.ndarray = np.power(10.0, level_db / 10.0)
    return result


def leq(mean_energy: np.ndarray) -> np.ndarray:
    """Equivalent continuous level from the mean energy of equal-length samples."""
    with np.errstate(divide="ignore", invalid="ignore"):
        result: np.ndarray = 10.0 * np.log10(mean_energy)
    return np.where(mean_energy > 0, result, np.nan)


def noise_period(local_hour: float) -> Literal["day", "night"]:
    return "day" if DAY_STARTS_H <= local_hour % 24 < NIGHT_STARTS_H else "night"


def noise_limit(zones: np.ndarray, period: Literal["day", "night"]) -> np.ndarray:
    column = 0 if period == "day" else 1
    return np.array([NOISE_LIMITS_DBA[str(z)][column] for z in zones])
