"""The indices the operations centre uses, as vectorised functions over numpy arrays.

Every table here comes with its source in docs/analytics.md; figures marked unverified there
are configurable. Inputs are arrays (one value per segment, pole, ...); NaN means "no data" and
propagates: a missing detector never becomes a zero.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np

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

# -- HJ 633: IAQI breakpoints (24-hour concentrations, µg/m³) --------------------------------------
IAQI_POINTS: Final = np.array([0.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0])
AQI_BREAKPOINTS: Final[dict[str, dict[str, np.ndarray]]] = {
    "HJ633-2012": {
        "pm25": np.array([0.0, 35.0, 75.0, 115.0, 150.0, 250.0, 350.0, 500.0]),
        "pm10": np.array([0.0, 50.0, 150.0, 250.0, 350.0, 420.0, 500.0, 600.0]),
    },
    # The 2026 revision tightens the good/light boundary (second-hand, unverified): PM2.5 60,
    # PM10 120 at IAQI 100; the other breakpoints are kept.
    "HJ633-2026": {
        "pm25": np.array([0.0, 35.0, 60.0, 115.0, 150.0, 250.0, 350.0, 500.0]),
        "pm10": np.array([0.0, 50.0, 120.0, 250.0, 350.0, 420.0, 500.0, 600.0]),
    },
}
AQI_CATEGORIES: Final = (
    "excellent",
    "good",
    "lightly polluted",
    "moderately polluted",
    "heavily polluted",
    "severely polluted",
)
AQI_CATEGORY_UPPER: Final = np.array([50.0, 100.0, 150.0, 200.0, 300.0])

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


def delay_proportion(speed_kmh: np.ndarray, free_flow_kmh: np.ndarray) -> np.ndarray:
    """DTP = (T - T0) / T = 1 - v / vf for a fixed length; 0 when faster than free flow."""
    dtp: np.ndarray = np.clip(1.0 - speed_kmh / free_flow_kmh, 0.0, 1.0)
    return dtp


def tpi_from_dtp(dtp: np.ndarray) -> np.ndarray:
    """GB/T 33171 TPI 0-10, linear inside each band."""
    tpi: np.ndarray = np.interp(dtp, TPI_DTP_BANDS, TPI_BANDS)
    return np.where(np.isnan(dtp), np.nan, tpi)


def tpi_level(tpi: np.ndarray) -> np.ndarray:
    """1 smooth, 2 basically smooth, 3 light, 4 moderate, 5 severe (0: no data)."""
    level = np.searchsorted(np.array([2.0, 4.0, 6.0, 8.0]), tpi, side="right") + 1
    return np.where(np.isnan(tpi), 0, level)


def speed_bands(road_class: np.ndarray) -> np.ndarray:
    """The (n, 4) speed band bounds of each segment's road class."""
    bands: np.ndarray = np.array([SPEED_BANDS_KMH[str(c)] for c in road_class]).reshape(-1, 4)
    return bands


def congestion_level(speed_kmh: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """1 (smooth) to 5 (severe) from the speed bands of each segment (:func:`speed_bands`);
    0: no data."""
    level = 1 + np.sum(speed_kmh[:, None] <= bands, axis=1)
    return np.where(np.isnan(speed_kmh), 0, level)


def urban_los(speed_kmh: np.ndarray, free_flow_kmh: np.ndarray, vc: np.ndarray) -> np.ndarray:
    """HCM 2010 urban street LOS from speed as % of free flow; v/c > 1 forces F."""
    pct = 100.0 * speed_kmh / free_flow_kmh
    index = np.sum(pct[:, None] <= URBAN_LOS_PCT, axis=1)  # 0 = A ... 5 = F
    index = np.where(vc > 1.0, 5, index)
    return np.where(np.isnan(speed_kmh), "", LOS_LETTERS[index])


def freeway_los(density_vpkmpl: np.ndarray, vc: np.ndarray) -> np.ndarray:
    """HCM basic freeway LOS from density (vehicles taken as passenger cars); v/c > 1 is F."""
    per_mile = density_vpkmpl * KM_PER_MILE
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
    """Individual AQI: linear between breakpoints, rounded up to an integer (HJ 633 section 5);
    above the last breakpoint it stays 500."""
    points = AQI_BREAKPOINTS[table][pollutant]
    value = np.ceil(np.interp(concentration, points, IAQI_POINTS) - 1e-9)
    return np.where(np.isnan(concentration), np.nan, value)


def aqi(
    pm25: np.ndarray, pm10: np.ndarray, table: str = "HJ633-2012"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AQI, primary pollutant, category 1-6). The primary pollutant is named when AQI > 50."""
    i25, i10 = iaqi("pm25", pm25, table), iaqi("pm10", pm10, table)
    stacked = np.vstack([i25, i10])
    value = np.nanmax(np.where(np.isnan(stacked), -1.0, stacked), axis=0)
    value = np.where(value < 0, np.nan, value)
    primary = np.where(i25 >= np.nan_to_num(i10, nan=-1.0), "pm25", "pm10")
    primary = np.where((value > 50) & ~np.isnan(value), primary, "")
    category = np.searchsorted(AQI_CATEGORY_UPPER, value, side="left") + 1
    return value, primary, np.where(np.isnan(value), 0, category)


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
