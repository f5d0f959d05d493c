"""Smart poles and manhole covers: air, noise, light, water, gas and batteries.

Simple, documented models (docs/simulators.md) whose point is to be *plausible and
controllable*, so the analytics can be scored against known episodes:

* PM2.5: a daily cycle (high at night and in the morning, low in the afternoon when the mixing
  layer is deep), a roadside term proportional to the traffic on the pole's segment, haze
  episodes added on top, washed out by rain; lognormal sensor noise. PM10 = PM2.5 x 1.4-1.9.
* Gases (a micro air station): NO2 and CO with the traffic on the pole's segment (so with the
  rush hours) over a small background, held in by haze episodes (stagnant air: + ``no2`` of the
  episode, CO x (1 + haze / 150)); O3 photochemical, following the sun about 2.5 hours late
  (peaking on sunny afternoons), dimmed by rain and haze, titrated by traffic NO; SO2 low.
* Noise: road traffic noise grows with 10 log10 of the flow (energy doubles with the flow),
  summed by energy with a day/night background; the interval's maximum (Lmax) is the Leq plus
  a pass-by peak that is larger when traffic is sparse (single vehicles stand out).
* Lamps: on while the sun is below the civil-dusk threshold (solar elevation from NOAA's
  approximations, cityflux/sun.py), drawing their rated power; failed lamps burn by day, stay
  dark at night or draw far from their rating.
* Manholes: a linear-reservoir water level (rain in, drainage out, each manhole's catchment
  gain differs), cover-open and tilt events, gas spikes (CH4 with some H2S), battery drain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from cityflux.sun import SUN_BELOW_DEG, solar_elevation_deg

FLOOD_FRACTION: Final = 0.5  # ground truth: water above half the chamber depth is a flood
STANDBY_W: Final = 0.5


def bell(t: float, start: float, duration: float) -> float:
    """0 outside [start, start + duration], a smooth sine hump of height 1 inside."""
    if not start <= t <= start + duration or duration <= 0:
        return 0.0
    return math.sin(math.pi * (t - start) / duration) ** 2


def daily_cycle(local_hour: float) -> float:
    """PM2.5 background multiplier: ~1.25 at 07:00 and at night, ~0.75 mid-afternoon."""
    return 1.0 + 0.25 * math.cos(2 * math.pi * (local_hour - 5.0) / 24.0)


@dataclass(slots=True)
class PoleState:
    """Per-pole constants and faults, arrays indexed like ``city.poles``."""

    lon: np.ndarray
    lat: np.ndarray
    rated_w: np.ndarray
    district: np.ndarray  # district index
    background_pm25: np.ndarray
    coarse_ratio: np.ndarray
    lamp_mode: np.ndarray  # 0 ok, 1 burns by day, 2 dark at night, 3 power off rating
    lamp_power_factor: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lamp_power_factor = np.where(self.lamp_mode == 3, 0.55, 1.0)


def pole_readings(
    state: PoleState,
    index: np.ndarray,
    epoch_s: float,
    local_hour: float,
    traffic_share: np.ndarray,
    rain_mm_h: np.ndarray,
    haze_ugm3: np.ndarray,
    rng: np.random.Generator,
    haze_no2_ugm3: np.ndarray | None = None,
    gas_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Readings of the poles in ``index`` at ``epoch_s``. Per-district arrays are by index.

    ``traffic_share`` is the flow on each pole's segment over its capacity (0..1). The gases
    and Lmax draw from ``gas_rng`` (default ``rng``): a generator of their own leaves the
    draws of everything else, and so the scenarios' other figures, as they were.
    """
    n = len(index)
    district = state.district[index]
    washout = 1.0 / (1.0 + rain_mm_h[district] / 5.0)
    pm25 = (
        state.background_pm25[index] * daily_cycle(local_hour) * washout
        + 25.0 * traffic_share
        + haze_ugm3[district]
    ) * rng.lognormal(0, 0.08, size=n)
    pm10 = pm25 * state.coarse_ratio[index] * rng.lognormal(0, 0.05, size=n)
    night = local_hour < 6 or local_hour >= 22
    background_db = 40.0 if night else 48.0
    traffic_db = 45.0 + 10.0 * np.log10(1.0 + traffic_share * 2_000.0 / 10.0)
    noise = 10 * np.log10(10 ** (traffic_db / 10) + 10 ** (background_db / 10))
    noise = noise + rng.normal(0, 1.5, size=n)
    dark = solar_elevation_deg(epoch_s, state.lon[index], state.lat[index]) < SUN_BELOW_DEG
    mode = state.lamp_mode[index]
    lamp_on = np.where(mode == 1, True, np.where(mode == 2, False, dark))
    power = np.where(
        lamp_on,
        state.rated_w[index] * state.lamp_power_factor[index] * rng.normal(1, 0.01, size=n),
        STANDBY_W,
    )
    temperature = 14.0 + 6.0 * math.sin(2 * math.pi * (local_hour - 9.0) / 24.0)
    humidity = np.clip(
        65.0 - 15.0 * math.sin(2 * math.pi * (local_hour - 9.0) / 24.0) + 5 * rain_mm_h[district],
        5,
        100,
    )
    no2_haze = np.zeros_like(haze_ugm3) if haze_no2_ugm3 is None else haze_no2_ugm3
    gases = gas_readings(
        state, index, epoch_s, traffic_share, rain_mm_h[district], haze_ugm3[district],
        no2_haze[district], gas_rng or rng,
    )  # fmt: skip
    sparse = 4.0 * (1.0 - np.clip(traffic_share * 4, 0, 1))  # lone vehicles stand out
    lmax = noise + 3.0 + sparse + (gas_rng or rng).exponential(1.0, size=n)
    return gases | {
        "noise_lmax_dba": np.round(np.clip(lmax, 20, 140), 1),
        "lamp_on": lamp_on,
        "lamp_power_w": np.round(power, 1),
        "lamp_fault": (mode == 2) & dark,  # a dark lamp's driver reports it; day-burners do not
        "pm25_ugm3": np.round(np.clip(pm25, 0, 1_000), 1),
        "pm10_ugm3": np.round(np.clip(pm10, 0, 2_000), 1),
        "noise_dba": np.round(np.clip(noise, 20, 140), 1),
        "temperature_c": np.round(temperature + rng.normal(0, 0.3, size=n), 1),
        "humidity_pct": np.round(humidity + rng.normal(0, 1.0, size=n), 1).clip(0, 100),
    }


def gas_readings(
    state: PoleState,
    index: np.ndarray,
    epoch_s: float,
    traffic_share: np.ndarray,
    rain_mm_h: np.ndarray,
    haze_ugm3: np.ndarray,
    haze_no2_ugm3: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """SO2, NO2, CO and O3 of the poles in ``index`` (per-pole arrays); see the module doc."""
    n = len(index)
    stagnant = 1.0 + haze_ugm3 / 150.0
    no2 = (18.0 + 70.0 * traffic_share) * stagnant + haze_no2_ugm3
    co = (0.35 + 1.1 * traffic_share) * stagnant
    # photochemistry lags the sun: the elevation 2.5 hours earlier, by each pole's position
    lagged = solar_elevation_deg(epoch_s - 9_000, state.lon[index], state.lat[index])
    sun = np.clip(np.sin(np.radians(lagged)), 0.0, 1.0)
    light = 1.0 / (1.0 + rain_mm_h / 2.0) / (1.0 + haze_ugm3 / 100.0)
    o3 = 22.0 + 170.0 * sun * light - 20.0 * traffic_share
    so2 = 6.0 + 4.0 * traffic_share
    return {
        "so2_ugm3": np.round(np.clip(so2 * rng.lognormal(0, 0.2, size=n), 0, 5_000)),
        "no2_ugm3": np.round(np.clip(no2 * rng.lognormal(0, 0.1, size=n), 0, 5_000)),
        "co_mgm3": np.round(np.clip(co * rng.lognormal(0, 0.1, size=n), 0, 200), 2),
        "o3_ugm3": np.round(np.clip(o3 * rng.lognormal(0, 0.08, size=n), 1, 2_000)),
    }


@dataclass(slots=True)
class ManholeState:
    """Per-manhole constants and evolving state, arrays indexed like ``city.manholes``."""

    district: np.ndarray
    depth_cm: np.ndarray
    gain_cm_per_mm: np.ndarray  # water level rise per mm of rain (catchment, low ground)
    base_level_cm: np.ndarray
    battery_pct: np.ndarray
    drain_pct_per_day: np.ndarray
    level_cm: np.ndarray = field(init=False)
    # events: the cover is open in [open_from, open_until), gas high in [gas_from, gas_until)
    open_from: np.ndarray = field(init=False)
    open_until: np.ndarray = field(init=False)
    gas_from: np.ndarray = field(init=False)
    gas_until: np.ndarray = field(init=False)
    gas_peak: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.level_cm = self.base_level_cm.copy()
        n = len(self.depth_cm)
        self.open_from, self.open_until = np.zeros(n), np.zeros(n)
        self.gas_from, self.gas_until, self.gas_peak = np.zeros(n), np.zeros(n), np.zeros(n)

    def step(self, step_s: float, rain_mm_h: np.ndarray) -> None:
        """Linear reservoir: dh/dt = gain x rain - (h - base) / 1 h."""
        hours = step_s / 3_600
        inflow = self.gain_cm_per_mm * rain_mm_h[self.district] * hours
        drained = (self.level_cm - self.base_level_cm) * min(hours / 1.0, 1.0)
        self.level_cm = np.clip(self.level_cm + inflow - drained, 0, self.depth_cm)
        self.battery_pct = np.maximum(
            self.battery_pct - self.drain_pct_per_day * step_s / 86_400, 0
        )

    def flooded(self) -> np.ndarray:
        return self.level_cm > FLOOD_FRACTION * self.depth_cm


def manhole_readings(
    state: ManholeState, index: np.ndarray, epoch_s: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n = len(index)
    is_open = (state.open_from[index] <= epoch_s) & (epoch_s < state.open_until[index])
    gas = (state.gas_from[index] <= epoch_s) & (epoch_s < state.gas_until[index])
    return {
        "cover_open": is_open,
        "tilt_deg": np.round(np.where(is_open, rng.uniform(12, 40, n), rng.uniform(0, 2, n)), 1),
        "water_level_cm": np.round(state.level_cm[index] + rng.normal(0, 0.5, n), 1).clip(0, 1_000),
        "ch4_pct_lel": np.round(np.where(gas, state.gas_peak[index], rng.uniform(0, 1.5, n)), 1),
        "h2s_ppm": np.round(np.where(gas, state.gas_peak[index] / 4, rng.uniform(0, 0.8, n)), 1),
        "battery_pct": np.round(state.battery_pct[index], 1),
        "temperature_c": np.round(12.0 + rng.normal(0, 0.5, n), 1),
    }
