"""Scenario files (``cityflux/simulators/scenarios/*.toml``, documented in docs/simulators.md).

A scenario says which city (a map file or a generated one), when the simulated day starts and
how long it runs, the reporting intervals, the traffic demand, and the events and faults that
make it interesting: incidents, rain, haze, outages, sensor faults, malformed payloads.
Event times are offsets in seconds from the start, so a scenario is independent of the date.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from cityflux.errors import ConfigError
from cityflux.simulators.citygen import CitySpec
from cityflux.simulators.traffic import DemandProfile

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"  # package data: found when installed


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CitySection(CitySpec, frozen=True, kw_only=True):
    map: str | None = None  # a city map file; else a generated city of this size


class ClockSection(_Section, frozen=True, kw_only=True):
    # local start time; the date is the latest past day (of ``day`` kind) on which the whole
    # run fits before now, unless ``date`` pins it (then mind the ingest's max_past_s).
    # "now": the latest start the run allows, whatever the time of day (live at speed 1).
    start: str = "06:00"
    utc_offset_h: float = 8.0
    day: Literal["weekday", "weekend", "any"] = "weekday"
    date: str | None = None  # YYYY-MM-DD
    duration_s: float = 4 * 3600.0
    step_s: float = 5.0  # traffic model step; the CFL condition sets cell lengths from it


class IntervalSection(_Section, frozen=True, kw_only=True):
    traffic_s: int = 60
    pole_s: int = 60
    manhole_s: int = 300


class PublishSection(_Section, frozen=True, kw_only=True):
    readings_per_message: int = 1  # > 1: devices send arrays (gateway store-and-forward)
    births: bool = True  # retained "online" status per device at the start
    qos: Literal[0, 1] = 1


class Incident(_Section, frozen=True, kw_only=True):
    segment: str = ""  # empty: the middle of the busiest two-way arterial corridor
    direction: Literal["forward", "reverse"] = "forward"
    start_s: float
    duration_s: float
    capacity_left: float = 0.3  # share of the cell's capacity the blockage leaves


class Rain(_Section, frozen=True, kw_only=True):
    start_s: float
    duration_s: float
    peak_mm_h: float
    districts: list[str] = []  # empty: all


class Haze(_Section, frozen=True, kw_only=True):
    start_s: float
    duration_s: float
    pm25_ugm3: float  # added at the peak of the episode
    no2_ugm3: float = 0.0  # NO2 added at the peak (traffic exhaust held in by stagnant air)
    districts: list[str] = []


class Outage(_Section, frozen=True, kw_only=True):
    kind: Literal["pole", "manhole", "traffic"]
    district: str = ""  # empty: any
    share: float = 1.0  # of the matching devices
    start_s: float
    duration_s: float


class ManholeEvents(_Section, frozen=True, kw_only=True):
    cover_opens: int = 0  # covers lifted during the run (random manholes and times)
    gas_spikes: int = 0


class Faults(_Section, frozen=True, kw_only=True):
    outages: list[Outage] = []
    stuck_share: float = 0.0  # sensors that freeze at one value (pole PM2.5, detector speed)
    drift_share: float = 0.0  # PM2.5 sensors drifting upwards
    drift_per_hour: float = 5.0
    clock_skew_share: float = 0.0
    clock_skew_s: float = 90.0  # < ingest.max_future_s so skewed readings are still accepted
    duplicate_share: float = 0.0  # messages sent twice (QoS 1 redelivery, gateway retries)
    out_of_order_share: float = 0.0  # messages delayed behind the device's next one
    late_share: float = 0.0
    late_s: float = 600.0
    malformed_share: float = 0.0  # payloads cityflux must reject (one reason each, rotating)
    lamp_failure_share: float = 0.0


class Scenario(_Section, frozen=True, kw_only=True):
    name: str
    description: str = ""
    city: CitySection = CitySection()
    clock: ClockSection = ClockSection()
    intervals: IntervalSection = IntervalSection()
    traffic: DemandProfile = DemandProfile()
    publish: PublishSection = PublishSection()
    incidents: list[Incident] = []
    rain: list[Rain] = []
    haze: list[Haze] = []
    manholes: ManholeEvents = ManholeEvents()
    faults: Faults = Faults()

    def start_epoch_s(self, now_s: float, speed: float) -> float:
        """Epoch seconds of the simulated start (see ClockSection)."""
        clock = self.clock
        # the run must not outrun the wall clock: start + duration <= now + duration / speed
        latest = now_s + clock.duration_s / speed - clock.duration_s
        if clock.start == "now":  # as late as that allows: live, at speed 1
            return min(now_s, latest)
        tz = dt.timezone(dt.timedelta(hours=clock.utc_offset_h))
        hh, mm = (int(part) for part in clock.start.split(":"))
        if clock.date:
            day = dt.date.fromisoformat(clock.date)
            return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=tz).timestamp()
        day = dt.datetime.fromtimestamp(latest, tz).date()
        for back in range(14):
            candidate = day - dt.timedelta(days=back)
            start = dt.datetime(candidate.year, candidate.month, candidate.day, hh, mm, tzinfo=tz)
            weekend = candidate.weekday() >= 5
            fits = start.timestamp() <= latest
            if fits and (clock.day == "any" or weekend == (clock.day == "weekend")):
                return start.timestamp()
        raise ConfigError(f"scenario {self.name}: no start day found")  # pragma: no cover


def load_scenario(name_or_path: str | Path, overrides: dict[str, object] | None = None) -> Scenario:
    """A scenario by file path or by name in ``cityflux/simulators/scenarios/``.

    ``overrides`` set dotted keys, e.g. ``{"clock.duration_s": 600}``.
    """
    path = Path(name_or_path)
    if not path.exists():
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"scenario {name_or_path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    try:
        scenario = msgspec.convert(data, Scenario)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"scenario {path}: {exc}") from exc
    if scenario.city.map and not Path(scenario.city.map).is_absolute():
        resolved = str((path.parent / scenario.city.map).resolve())
        scenario = msgspec.structs.replace(
            scenario, city=msgspec.structs.replace(scenario.city, map=resolved)
        )
    return scenario


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
