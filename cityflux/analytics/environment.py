"""Air, noise and lamps per pole; water, gas, covers and batteries per manhole.

* Air quality (HJ 633, ``aqi.py``): the six pollutants averaged over the last hour (12 panes of
  5 minutes); SO2, NO2, CO and O3 on the 1-hour breakpoints, the O3 8-hour moving average on
  the 8-hour ones, PM2.5 and PM10 on the 24-hour ones (they have no 1-hour breakpoints); on the
  hour also the daily (24-hour) AQI. The hourly means of the last 24 clock hours are kept per
  pole (:class:`HourlyMeans`) for the O3 8-hour average, the SO2 fallback and the daily AQI.
* Noise (GB 3096): Leq over the last hour = 10 log10(mean(10^(L/10))) of the readings (each
  reading is itself an Leq over equal intervals), against the zone's day or night limit for the
  period the hour **starts** in (a clock hour never straddles 06:00 or 22:00). At night the
  maximum level (``noise_lmax_dba``): frequent noise (at least ``FREQUENT_READINGS`` readings
  above limit + 10 dB in the hour) or a sporadic one above limit + 15 dB is a violation.
* Lamps: a reading is faulty when the lamp is on while the sun is up, off while it is down,
  draws more than ``lamp_power_tolerance`` off its rated power while on, or reports a driver
  fault; the pole's fault share per pane goes to the alert rules.
* Manholes are checked reading by reading (no window: an open cover cannot wait a minute):
  cover open, tilt, water level as % of depth and its rise rate, CH4, H2S, battery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from cityflux.analytics import aqi as hj633
from cityflux.analytics import indices, quality
from cityflux.model.citymap import CityMap
from cityflux.model.units import NS
from cityflux.sun import SUN_BELOW_DEG, solar_elevation_deg

Array = npt.NDArray[Any]
# the pollutants of a pole reading and their name in the AQI functions
GASES: Final = {"so2_ugm3": "so2", "no2_ugm3": "no2", "co_mgm3": "co", "o3_ugm3": "o3"}
AIR: Final = {"pm25_ugm3": "pm25", "pm10_ugm3": "pm10"} | GASES
POLE_INPUTS: Final = (*AIR, "noise_dba", "noise_lmax_dba", "lamp_on", "lamp_power_w",
                      "lamp_fault")  # fmt: skip
POLE_PARTIALS = (*(f"{n}_{k}" for n in AIR.values() for k in ("sum", "n")), "energy_sum",
                 "noise_n", "lamp_rows", "lamp_bad", "lmax_max", "lmax_n", "lmax_over10_n",
                 *(f"{n}_{k}" for n in quality.STUCK_ITEMS for k in ("min", "max")))  # fmt: skip
FREQUENT_READINGS: Final = 3  # readings above limit + 10 dB in an hour: frequent noise
FREQUENT_MARGIN_DBA: Final = 10.0  # GB 3096 5.3: frequent noise at night, limit + 10
SPORADIC_MARGIN_DBA: Final = 15.0  # sporadic noise at night, limit + 15
HOUR_NS: Final = 3600 * NS
DAILY_MIN_HOURS: Final = 20  # GB 3095: a 24-hour mean needs 20 hourly means
EIGHT_HOUR_MIN: Final = 6  # GB 3095: an 8-hour mean needs 6 hourly means
DAILY_8H_MIN: Final = 14  # HJ 663: the day's highest O3 8-hour mean needs 14 of them


@dataclass(slots=True)
class PoleSites:
    """What the map says of each pole, as arrays built once (no per-pole loops per pane)."""

    ids: Array
    district: Array
    district_index: Array  # into district_ids
    district_ids: list[str]
    rated_w: Array
    day_limit: Array
    night_limit: Array

    @classmethod
    def of(cls, city: CityMap) -> PoleSites:
        limits = np.array([indices.NOISE_LIMITS_DBA[str(p.noise_zone)] for p in city.poles])
        limits = limits.reshape(-1, 2)
        district_ids = [d.id for d in city.districts]
        number = {d: i for i, d in enumerate(district_ids)}
        return cls(
            ids=np.array([p.id for p in city.poles], dtype=object),
            district=np.array([p.district for p in city.poles], dtype=object),
            district_index=np.array([number[p.district] for p in city.poles], dtype=np.int64),
            district_ids=district_ids,
            rated_w=np.array([p.lamp_rated_w for p in city.poles], dtype=np.float64),
            day_limit=limits[:, 0].copy(),
            night_limit=limits[:, 1].copy(),
        )


def pole_partials(
    sites: PoleSites, rows: dict[str, Array], tolerance: float, lon: Array, lat: Array
) -> dict[str, Array]:
    """Sums per pole from one pane's de-duplicated readings."""
    n = len(sites.ids)
    pole = rows["entity"]

    def total(weights: Array) -> Array:
        summed: Array = np.bincount(pole, weights=weights, minlength=n)
        return summed

    def column(name: str) -> Array:  # rows recovered from an older store may lack new fields
        found = rows.get(name)
        return np.full(len(pole), np.nan) if found is None else found

    parts: dict[str, Array] = {}
    for name, short in AIR.items():
        values = column(name)
        parts[f"{short}_sum"] = total(np.nan_to_num(values))
        parts[f"{short}_n"] = total((~np.isnan(values)).astype(np.float64))
        if short in quality.STUCK_ITEMS:  # the range of a pane's values: a stuck sensor's is 0
            has = ~np.isnan(values)
            low, high = np.full(n, np.inf), np.full(n, -np.inf)
            np.minimum.at(low, pole[has], values[has])
            np.maximum.at(high, pole[has], values[has])
            parts[f"{short}_min"], parts[f"{short}_max"] = low, high
    noise, lmax = column("noise_dba"), column("noise_lmax_dba")
    has_lmax = ~np.isnan(lmax)
    lmax_max = np.zeros(n)
    np.maximum.at(lmax_max, pole[has_lmax], lmax[has_lmax])
    over10 = has_lmax & (lmax > sites.night_limit[pole] + FREQUENT_MARGIN_DBA)
    lamp_on, power, fault = column("lamp_on"), column("lamp_power_w"), column("lamp_fault")
    known = lamp_on >= 0
    bad = lamp_faults(rows["ts_ns"], lamp_on, power, fault, pole, tolerance, lon, lat, sites)
    return parts | {
        "energy_sum": total(np.where(np.isnan(noise), 0.0, indices.energy(noise))),
        "noise_n": total((~np.isnan(noise)).astype(np.float64)),
        "lamp_rows": total(known.astype(np.float64)),
        "lamp_bad": total((known & bad).astype(np.float64)),
        "lmax_max": lmax_max,
        "lmax_n": total(has_lmax.astype(np.float64)),
        "lmax_over10_n": total(over10.astype(np.float64)),
    }


def hour_of(parts: list[dict[str, Array]]) -> dict[str, Array]:
    """The partials of panes combined: sums and counts add, maxima and minima take theirs."""

    def combined(key: str) -> Array:
        columns = np.array([p[key] for p in parts])
        reduce = np.max if key.endswith("_max") else np.min if key.endswith("_min") else np.sum
        result: Array = reduce(columns, axis=0)
        return result

    return {k: combined(k) for k in POLE_PARTIALS}


def lamp_faults(
    ts_ns: Array,
    lamp_on: Array,
    power: Array,
    fault: Array,
    pole: Array,
    tolerance: float,
    lon: Array,
    lat: Array,
    sites: PoleSites,
) -> Array:
    rated = sites.rated_w[pole]
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


class HourlyMeans:
    """The 1-hour means of the last ``HOURS`` clock hours per pole (float32: 0.7 KB a pole),
    by hour number (epoch hours). A pane writes the hour its end lies in: the last pane of an
    hour leaves that clock hour's exact mean, earlier ones a provisional rolling one."""

    HOURS: Final = 24
    ITEMS: Final = ("so2", "no2", "co", "o3", "pm10", "pm25", "o3_8h")

    def __init__(self, poles: int) -> None:
        self.values = np.full((self.HOURS, len(self.ITEMS), poles), np.nan, dtype=np.float32)
        self.hour = np.full(self.HOURS, -1, dtype=np.int64)

    def put(self, hour: int, item: str, means: Array) -> None:
        slot = hour % self.HOURS
        if self.hour[slot] != hour:
            self.values[slot] = np.nan
            self.hour[slot] = hour
        self.values[slot, self.ITEMS.index(item)] = means

    def last(self, hour: int, hours: int, item: str) -> Array:
        """(hours, poles): ``item`` in the ``hours`` clock hours up to ``hour``, NaN where
        not kept."""
        wanted = np.arange(hour - hours + 1, hour + 1)
        slots = wanted % self.HOURS
        taken: Array = self.values[slots, self.ITEMS.index(item)].astype(np.float64)
        taken[self.hour[slots] != wanted] = np.nan
        return taken


def mean_of(values: Array, at_least: int) -> Array:
    """Column means of (hours, poles), NaN where fewer than ``at_least`` hours have data."""
    valid = ~np.isnan(values)
    count = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, values, 0.0).sum(axis=0) / count
    result: Array = np.where(count >= max(at_least, 1), mean, np.nan)
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
    report: hj633.Index  # the hourly report: every IAQI, exceedance pollutants, colours
    means: dict[str, Array]  # 1-hour means of the six, and o3_8h
    daily: hj633.Index | None  # on the hour: the 24-hour report (None between hours)
    period: str  # "day" | "night": the period the hour starts in
    lmax_dba: Array  # the hour's highest maximum level, NaN without noise_lmax_dba
    lmax_frequent_n: Array  # readings above the night limit + 10 dB
    lmax_violation: Array  # 1 night-time Lmax rule broken, 0 kept (or day), NaN no data
    quality: quality.Quality  # sensor quality control of each pole
    district: hj633.Index  # hourly AQI per district, flagged poles left out
    district_means: dict[str, Array]  # per district, over the poles kept
    district_poles: Array  # poles with air data per district, flagged ones not counted
    district_flagged: Array  # poles flagged per district


def air_noise(
    sites: PoleSites,
    hour: dict[str, Array],
    pane: dict[str, Array],
    recent: dict[str, Array],
    history: HourlyMeans,
    end_ns: int,
    start_local_hour: float,
    table: str,
) -> AirNoise:
    """Hourly AQI and Leq from the last hour's partials; lamp share from the last pane;
    sensor quality from the hour and the ``recent`` panes' partials; the hourly means go into
    ``history`` (the clock hour ``end_ns`` lies in)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lamp_share = np.where(pane["lamp_rows"] > 0, pane["lamp_bad"] / pane["lamp_rows"], np.nan)
    means, so2_24h = _air_means(hour, history, end_ns)
    report = hj633.hourly(means, so2_24h, table)
    qc = quality.check(means, recent, sites.district_index, len(sites.district_ids))
    districts = _districts(sites, means, so2_24h, qc, table)
    noise = _noise(sites, hour, start_local_hour)
    return AirNoise(
        aqi=report.aqi,
        primary=report.primary,
        category=report.category,
        iaqi_pm25=report.iaqi["pm25"],
        iaqi_pm10=report.iaqi["pm10"],
        pm25_1h=means["pm25"],
        pm10_1h=means["pm10"],
        lamp_fault_share=lamp_share,
        report=report,
        means=means,
        daily=_daily(history, (end_ns - 1) // HOUR_NS, table) if end_ns % HOUR_NS == 0 else None,
        quality=qc,
        **districts,
        **noise,
    )


def _air_means(
    hour: dict[str, Array], history: HourlyMeans, end_ns: int
) -> tuple[dict[str, Array], Array]:
    """(the 1-hour means on their reporting grid and the O3 8-hour average, the SO2 24-hour
    mean); the means go into ``history`` first."""
    with np.errstate(divide="ignore", invalid="ignore"):
        means = {
            short: np.where(hour[f"{short}_n"] > 0, hour[f"{short}_sum"] / hour[f"{short}_n"],
                            np.nan)
            for short in AIR.values()
        }  # fmt: skip
    # HJ 633: concentrations are rounded to their reporting grid before the IAQI (GB/T 8170)
    means = {k: hj633.reported(k, v) for k, v in means.items()}
    clock_hour = (end_ns - 1) // HOUR_NS
    for item, values in means.items():
        history.put(clock_hour, item, values)
    eight = mean_of(history.last(clock_hour, 8, "o3"), EIGHT_HOUR_MIN)
    means["o3_8h"] = hj633.reported("o3", eight)
    history.put(clock_hour, "o3_8h", means["o3_8h"])
    # the SO2 fallback takes the 24-hour mean of however many hours are kept
    so2_24h = hj633.reported("so2", mean_of(history.last(clock_hour, 24, "so2"), 1))
    return means, so2_24h


def _districts(
    sites: PoleSites, means: dict[str, Array], so2_24h: Array, qc: quality.Quality, table: str
) -> dict[str, Any]:
    """The district AQI from the means over each district's unflagged poles."""
    count = len(sites.district_ids)
    has_air = ~np.all(np.isnan(np.vstack(list(means.values()))), axis=0)
    kept = has_air & ~qc.flagged
    per_district = quality.district_means(
        means | {"so2_24h": so2_24h}, kept, sites.district_index, count
    )
    per_district = {k: hj633.reported(k, v) for k, v in per_district.items()}
    return {
        "district": hj633.hourly(per_district, per_district["so2_24h"], table),
        "district_means": per_district,
        "district_poles": np.bincount(sites.district_index[kept], minlength=count),
        "district_flagged": np.bincount(sites.district_index[qc.flagged], minlength=count),
    }


def _noise(sites: PoleSites, hour: dict[str, Array], start_local_hour: float) -> dict[str, Any]:
    """Leq against the limit of the period the hour starts in, and the night-time Lmax."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_energy = np.where(hour["noise_n"] > 0, hour["energy_sum"] / hour["noise_n"], np.nan)
    level = indices.leq(mean_energy)
    period = indices.noise_period(start_local_hour)
    night = period == "night"
    limits = sites.night_limit if night else sites.day_limit
    has_lmax = hour["lmax_n"] > 0
    lmax = np.where(has_lmax, hour["lmax_max"], np.nan)
    frequent = hour["lmax_over10_n"]
    broken = (frequent >= FREQUENT_READINGS) | (lmax > sites.night_limit + SPORADIC_MARGIN_DBA)
    return {
        "leq_dba": level,
        "limit_dba": limits,
        "exceed_dba": level - limits,
        "period": period,
        "lmax_dba": lmax,
        "lmax_frequent_n": np.where(has_lmax & night, frequent, np.nan),
        "lmax_violation": np.where(has_lmax, (broken & night).astype(np.float64), np.nan),
    }


def _daily(history: HourlyMeans, clock_hour: int, table: str) -> hj633.Index:
    """The 24-hour report over the 24 clock hours up to ``clock_hour``: each item from at least
    ``DAILY_MIN_HOURS`` hourly values."""

    def day(item: str) -> Array:
        return history.last(clock_hour, 24, item)

    def highest(values: Array, at_least: int) -> Array:
        enough = (~np.isnan(values)).sum(axis=0) >= at_least
        top = np.where(np.isnan(values), -np.inf, values).max(axis=0)
        result: Array = np.where(enough, top, np.nan)
        return result

    c = {item: hj633.reported(item, mean_of(day(item), DAILY_MIN_HOURS))
         for item in ("so2", "no2", "co", "pm10", "pm25")}  # fmt: skip
    o3 = {
        "o3_1h_max": highest(day("o3"), DAILY_MIN_HOURS),
        "o3_8h_max": highest(day("o3_8h"), DAILY_8H_MIN),
    }
    return hj633.daily(c | o3, table)


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
