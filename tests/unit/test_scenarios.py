"""Scenario files: they load, their clock fits before now, and they write their ground truth."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from cityflux.errors import ConfigError
from cityflux.simulators.scenario import list_scenarios, load_scenario
from cityflux.simulators.simulation import Simulation

NOW = 1_795_570_800.0  # 2026-11-25T08:00:00+08:00, a Wednesday


def test_the_five_documented_scenarios_ship() -> None:
    assert set(list_scenarios()) >= {
        "normal-weekday",
        "rush-hour-incident",
        "rainstorm",
        "haze",
        "device-failure",
    }


@pytest.mark.parametrize("name", list_scenarios())
def test_start_is_the_latest_matching_day_that_fits_before_now(name: str) -> None:
    scenario = load_scenario(name)
    start = scenario.start_epoch_s(NOW, math.inf)
    assert start + scenario.clock.duration_s <= NOW
    assert NOW - start < 8 * 86_400
    tz = dt.timezone(dt.timedelta(hours=scenario.clock.utc_offset_h))
    local = dt.datetime.fromtimestamp(start, tz)
    assert local.strftime("%H:%M") == scenario.clock.start
    if scenario.clock.day == "weekday":
        assert local.weekday() < 5


def test_real_time_runs_start_so_that_they_never_outrun_the_wall_clock() -> None:
    scenario = load_scenario("normal-weekday")  # 06:00 for 4 h; at speed 1 it may start today
    start = scenario.start_epoch_s(NOW, 1.0)
    assert start <= NOW
    assert dt.datetime.fromtimestamp(start, dt.UTC).date() == dt.date(2026, 11, 24)  # 06:00 CST


def test_overrides_and_unknown_keys() -> None:
    scenario = load_scenario("haze", {"clock.duration_s": 600, "city.poles": 10})
    assert scenario.clock.duration_s == 600
    assert scenario.city.poles == 10
    with pytest.raises(ConfigError, match="unknown field"):
        load_scenario("haze", {"clock.speed": 3})
    with pytest.raises(ConfigError):
        load_scenario("no-such-scenario")


def _truth_types(name: str) -> dict[str, int]:
    scenario = load_scenario(name, {"publish.births": False})
    sim = Simulation(scenario, scenario.start_epoch_s(NOW, math.inf))
    for _ in sim.ticks():
        pass
    counts: dict[str, int] = {}
    for event in sim.truth.events:
        counts[event.type] = counts.get(event.type, 0) + 1
        assert event.start_ms >= sim.truth.start_ms
        assert event.end_ms is None or event.end_ms <= sim.truth.end_ms
    return counts


def test_ground_truth_names_what_each_scenario_makes_happen() -> None:
    assert _truth_types("normal-weekday") == {}
    assert _truth_types("rush-hour-incident") == {"incident": 1}
    rain = _truth_types("rainstorm")
    assert rain["rain"] == 2 and rain["flood"] >= 5
    assert rain["cover_open"] == 3 and rain["gas"] == 2
    haze = _truth_types("haze")
    assert haze["haze"] == 4 and haze["lamp_fault"] >= 5
    failure = _truth_types("device-failure")
    assert failure["outage"] >= 20 and failure["stuck"] >= 1 and failure["clock_skew"] >= 1


def test_start_now_runs_live_at_real_time_and_never_ahead_of_the_clock() -> None:
    scenario = load_scenario("city-tour", {"clock.start": "now"})
    assert scenario.start_epoch_s(NOW, 1.0) == NOW  # live: simulated time is wall time
    assert scenario.start_epoch_s(NOW, 0.5) == NOW
    # faster: starts early enough that its last reading is stamped no later than it is sent
    assert scenario.start_epoch_s(NOW, 10.0) == NOW - 0.9 * scenario.clock.duration_s
