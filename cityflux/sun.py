"""Where the sun is: lamps should be on when it is down (simulator and analytics share this)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

SUN_BELOW_DEG = -3.0  # photocells switch lamps a little after sunset (civil twilight begins)


def solar_elevation_deg(
    epoch_s: float, lon: npt.NDArray[np.float64], lat: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Solar elevation angle (NOAA's low-accuracy formulas: about +-0.5 degree)."""
    days = epoch_s / 86_400.0 - 10_957.5  # days since J2000.0
    mean_long = math.radians((280.460 + 0.9856474 * days) % 360)
    anomaly = math.radians((357.528 + 0.9856003 * days) % 360)
    ecliptic = mean_long + math.radians(1.915 * math.sin(anomaly) + 0.020 * math.sin(2 * anomaly))
    obliquity = math.radians(23.439 - 0.0000004 * days)
    declination = math.asin(math.sin(obliquity) * math.sin(ecliptic))
    right_ascension = math.atan2(math.cos(obliquity) * math.sin(ecliptic), math.cos(ecliptic))
    sidereal_deg = (280.46061837 + 360.98564736629 * days) % 360
    hour_angle = np.radians(sidereal_deg + lon) - right_ascension
    lat_r = np.radians(lat)
    sin_el = np.sin(lat_r) * math.sin(declination) + np.cos(lat_r) * math.cos(declination) * np.cos(
        hour_angle
    )
    elevation: np.ndarray = np.degrees(np.arcsin(np.clip(sin_el, -1, 1)))
    return elevation
