"""Air, noise and lamps per pole; water, gas, covers and batteries per manhole.

* Air quality (HJ 633): PM2.5 and PM10 averaged over the last hour (12 panes of 5 minutes),
  IAQI from the 24-hour breakpoints as HJ 633 prescribes for real-time (hourly) reporting of
  particulates, which have no 1-hour breakpoints; IAQI rounded up to an integer; AQI = the
  largest IAQI; primary pollutant named when AQI > 50; category 1-6.
* Noise (GB 3096): Leq over the last hour = 10 log10(mean(10^(L/10))) of the readings (each
  reading is itself an Leq over equal intervals), against the zone's day or night limit for the
  period in which the hour ends.
* Lamps: a reading is faulty when the lamp is on while the sun is up, off while it is down,
  draws more than ``lamp_power_tolerance`` off its rated power while on, or reports a driver
  fault; the pole's fault share per pane goes to the alert rules.
* Manholes are checked reading by reading (no window: an open cover cannot wait a minute):
  cover open, tilt, water level as % of depth and its rise rate, CH4, H2S, battery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cityflux.analytics import indices
from cityflux.model.citymap import CityMap
from cityflux.model.units import NS
from cityflux.sun import SUN_BELOW_DEG, solar_elevation_deg

Array = npt.NDArray[Any]
POLE_PARTIALS = ("pm25_sum", "pm25_n", "pm10_sum", "pm10_n", "energy_sum", "noise_n",
                 "lamp_rows", "lamp_bad")  # fmt: skip


def pole_partials(
    city: CityMap, rows: dict[str, Array], tolerance: float, lon: Array, lat: Array
) -> dict[str, Array]:
    """Sums per pole from one pane's de-duplicated readings."""
    n = len(city.poles)
    pole = rows["entity"]

    def total(weights: Array) -> Array:
        summed: Array = np.bincount(pole, weights=weights, minlength=n)
        return summed

    pm25, pm10, noise = rows["pm25_ugm3"], rows["pm10_ugm3"], rows["noise_dba"]
    lamp_on, power, fault = rows["lamp_on"], rows["lamp_power_w"], rows["lamp_fault"]
    known = lamp_on >= 0
    bad = lamp_faults(rows["ts_ns"], lamp_on, power, fault, pole, tolerance, lon, lat, city)
    return {
        "pm25_sum": total(np.nan_to_num(pm25)),
        "pm25_n": total((~np.isnan(pm25)).astype(np.float64)),
        "pm10_sum": total(np.nan_to_num(pm10)),
        "pm10_n": total((~np.isnan(pm10)).astype(np.float64)),
        "energy_sum": total(np.where(np.isnan(noise), 0.0, indices.energy(noise))),
        "noise_n": total((~np.isnan(noise)).astype(np.float64)),
        "lamp_rows": total(known.astype(np.float64)),
        "lamp_bad": total((known & bad).astype(np.float64)),
    }


def lamp_faults(
    ts_ns: Array,
    lamp_on: Array,
    power: Array,
    fault: Array,
    pole: Array,
    tolerance: float,
    lon: Array,
    lat: Array,
    city: CityMap,
) -> Array:
    rated = np.array([p.lamp_rated_w for p in city.poles])[pole]
    dark = np.zeros(len(ts_ns), dtype=bool)
    if len(ts_ns):
        # one solar position per pane is precise enough (the sun moves 1.25 degrees in 5 min)
        elevation = solar_elevation_deg(float(np.median(ts_ns)) / NS, lon[pole], lat[pole])
        dark = elevation < SUN_BELOW_DEG
    on = lamp_on == 1
    wrong_state = (lamp_on >= 0) & (on != dark)
    off_rating = on & ~np.isnan(power) & (np.abs(power - rated) > tolerance * rated)
    result: Array = wrong_state | off_rating | (fault == 1)
    return result


@dataclass(slots=True)
class AirNoise:
    aqi: Array
    primary: Array
    category: Array
    iaqi_pm25: Array
    iaqi_pm10: Array
    pm25_1h: Array
    pm10_1h: Array
    leq_dba: Array
    limit_dba: Array
    exceed_dba: Array
    lamp_fault_share: Array


def air_noise(
    city: CityMap, hour: dict[str, Array], pane: dict[str, Array], local_hour: float, table: str
) -> AirNoise:
    """Hourly AQI and Leq from the last hour's partials; lamp share from the last pane."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pm25 = np.where(hour["pm25_n"] > 0, hour["pm25_sum"] / hour["pm25_n"], np.nan)
        pm10 = np.where(hour["pm10_n"] > 0, hour["pm10_sum"] / hour["pm10_n"], np.nan)
        mean_energy = np.where(hour["noise_n"] > 0, hour["energy_sum"] / hour["noise_n"], np.nan)
        lamp_share = np.where(pane["lamp_rows"] > 0, pane["lamp_bad"] / pane["lamp_rows"], np.nan)
    # HJ 633: concentrations are rounded to whole µg/m³ before the IAQI (GB/T 8170)
    pm25, pm10 = np.round(pm25), np.round(pm10)
    value, primary, category = indices.aqi(pm25, pm10, table)
    level = indices.leq(mean_energy)
    limits = indices.noise_limit(
        np.array([p.noise_zone for p in city.poles], dtype=object), indices.noise_period(local_hour)
    )
    return AirNoise(
        aqi=value,
        primary=primary,
        category=category,
        iaqi_pm25=indices.iaqi("pm25", pm25, table),
        iaqi_pm10=indices.iaqi("pm10", pm10, table),
        pm25_1h=pm25,
        pm10_1h=pm10,
        leq_dba=level,
        limit_dba=limits,
        exceed_dba=level - limits,
        lamp_fault_share=lamp_share,
    )


RISE_TIME_CONSTANT_S = 900.0  # the rise rate is smoothed over about 15 minutes


@dataclass(slots=True)
class ManholeState:
    """The last water level of each manhole and its smoothed rise rate.

    A rate from two readings a minute apart is mostly sensor noise (0.5 cm of noise is
    30 cm/h); an exponential moving average with a 15-minute time constant keeps the trend.
    """

    depth_cm: Array
    last_level: Array = field(init=False)
    last_ts: Array = field(init=False)
    rise: Array = field(init=False)  # cm/h, smoothed

    def __post_init__(self) -> None:
        self.last_level = np.full(len(self.depth_cm), np.nan)
        self.last_ts = np.zeros(len(self.depth_cm), dtype=np.int64)
        self.rise = np.zeros(len(self.depth_cm))

    def metrics(self, rows: dict[str, Array]) -> dict[str, Array]:
        """Per reading: the values the manhole rules look at."""
        hole, ts, level = rows["entity"], rows["ts_ns"], rows["water_level_cm"]
        order = np.lexsort((ts, hole))  # rates from consecutive readings of each manhole
        hole_o, ts_o, level_o = hole[order], ts[order], level[order]
        prev_level = np.empty(len(order))
        prev_ts = np.empty(len(order), dtype=np.int64)
        same = np.zeros(len(order), dtype=bool)
        same[1:] = hole_o[1:] == hole_o[:-1]
        prev_level[1:], prev_ts[1:] = level_o[:-1], ts_o[:-1]
        prev_level = np.where(same, prev_level, self.last_level[hole_o])
        prev_ts = np.where(same, prev_ts, self.last_ts[hole_o])
        seconds = (ts_o - prev_ts) / NS
        valid = (prev_ts > 0) & (seconds > 0) & ~np.isnan(prev_level)
        with np.errstate(divide="ignore", invalid="ignore"):
            instant = (level_o - prev_level) / seconds * 3600
        weight = np.where(valid, 1 - np.exp(-seconds / RISE_TIME_CONSTANT_S), 0.0)
        rise = np.full(len(order), np.nan)
        first = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0))
        rank = np.arange(len(order)) - first  # 0 for a manhole's first row in the batch, 1, ...
        for r in range(int(rank.max()) + 1 if len(order) else 0):  # usually a single round
            at = np.flatnonzero((rank == r) & valid)
            holes = hole_o[at]
            self.rise[holes] += weight[at] * (instant[at] - self.rise[holes])
            rise[at] = self.rise[holes]
        newest = ts_o >= self.last_ts[hole_o]
        self.last_level[hole_o[newest]] = level_o[newest]
        self.last_ts[hole_o[newest]] = ts_o[newest]
        rise_by_row = np.empty(len(order))
        rise_by_row[order] = rise
        return {
            "cover_open": rows["cover_open"].astype(np.float64),
            "tilt_deg": rows["tilt_deg"],
            "water_level_pct": 100.0 * level / self.depth_cm[hole],
            "rise_cm_per_h": rise_by_row,
            "ch4_pct_lel": rows["ch4_pct_lel"],
            "h2s_ppm": rows["h2s_ppm"],
            "battery_pct": rows["battery_pct"],
        }
