"""Every scenario, shortened, through real mosquitto -> cityflux -> real InfluxDB: what lands
in InfluxDB is exactly what the simulator says it published, and every malformed payload is
rejected with the reason the simulator chose."""

from __future__ import annotations

import math
import time

import pytest

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.simulators.runner import run_simulation
from cityflux.simulators.scenario import list_scenarios, load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter
from tests.support import count_points, running, wait_for

COUNTED_FIELD = {
    "pole": "noise_dba",
    "manhole": "battery_pct",
    "traffic": "occupancy_pct",
    "device_status": "online",
}
SHORTENED_S = {"device-failure": 3_000.0}  # long enough for the outages' last wills


def stored(db: InfluxWriter) -> dict[str, int]:
    return {m: count_points(db, m, f) for m, f in COUNTED_FIELD.items()}


@pytest.mark.parametrize("name", list_scenarios())
def test_scenario_lands_exactly(name: str, config: Config, db: InfluxWriter) -> None:
    scenario = load_scenario(name, {"clock.duration_s": SHORTENED_S.get(name, 1_200.0)})
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf))
    with running(Pipeline(config)) as pipeline:
        summary = run_simulation(sim, config.mqtt, math.inf)
        expected = {m: sim.expected.points.get(m, 0) for m in COUNTED_FIELD}
        wait_for(lambda: stored(db) == expected, timeout=60, what=f"{expected} in InfluxDB")
        rejected = {
            reason: pipeline.metrics.value("rejections_total", reason=reason)
            for reason in sim.expected.rejections
        }
    assert summary.completed and summary.messages == sim.expected.messages
    assert stored(db) == expected
    assert all(expected[k] > 0 for k in ("pole", "traffic", "device_status"))
    assert rejected == dict(sim.expected.rejections)
    if name == "device-failure":
        assert sum(sim.expected.rejections.values()) >= 7  # every reason exercised
        assert sim.expected.duplicates > 0


def test_array_payloads_from_gateways_land_exactly(config: Config, db: InfluxWriter) -> None:
    scenario = load_scenario(
        "normal-weekday", {"clock.duration_s": 900.0, "publish.readings_per_message": 5}
    )
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf))
    with running(Pipeline(config)):
        summary = run_simulation(sim, config.mqtt, math.inf)
        expected = {m: sim.expected.points.get(m, 0) for m in COUNTED_FIELD}
        wait_for(lambda: stored(db) == expected, timeout=60, what=f"{expected} in InfluxDB")
    readings = sum(sim.expected.readings.values())
    births = sim.expected.points["device_status"]
    assert summary.messages - births < readings / 4  # readings really went in arrays


def test_a_paced_run_keeps_to_its_clock_and_finishes(config: Config, db: InfluxWriter) -> None:
    scenario = load_scenario("haze", {"clock.duration_s": 300.0})
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), 150.0))
    with running(Pipeline(config)):
        summary = run_simulation(sim, config.mqtt, 150.0)  # 300 simulated s in about 2 s
        expected = {m: sim.expected.points.get(m, 0) for m in COUNTED_FIELD}
        wait_for(lambda: stored(db) == expected, timeout=60, what=f"{expected} in InfluxDB")
    assert summary.completed
    assert 1.8 <= summary.wall_s <= 4.0
