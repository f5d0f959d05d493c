"""The analytics scored against the simulator's scenarios, end to end: simulator -> real
mosquitto -> cityflux (ingest + analytics) -> real InfluxDB and the alert database."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import msgspec

from cityflux.cli.scenario import execute
from cityflux.config import Config
from cityflux.simulators.report import render
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter
from tests.support import select

WEDNESDAY = 1_795_536_000.0  # 2026-11-25T00:00+08:00: scenario dates are pinned to weekdays


def run(
    name: str, config: Config, tmp_path: Path, speed: float = math.inf, **overrides: Any
) -> tuple[Simulation, dict]:
    scenario = load_scenario(name, overrides)
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf))
    city_map = tmp_path / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(sim.city))
    figures = execute(config.with_overrides({"analytics.city_map": str(city_map)}), sim, speed)
    return sim, figures


def scores(figures: dict) -> dict[str, dict]:
    return {s["event_type"]: s for s in figures["scores"]}


def test_incident_is_detected_at_its_segment_within_five_intervals(
    config: Config, db: InfluxWriter, tmp_path: Path
) -> None:
    sim, figures = run("rush-hour-incident", config, tmp_path)
    incident = next(e for e in sim.truth.events if e.type == "incident")
    raised = [a for a in figures["alerts"] if a["rule"] == "traffic_incident"]
    assert [a["entity"].split(":")[0] for a in raised] == [incident.entity]
    delay_s = (raised[0]["started_ns"] / 1e9) - incident.start_ms / 1000
    assert 0 <= delay_s <= 5 * 60  # within five 1-minute intervals
    score = scores(figures)["incident"]
    assert score["precision"] == 1.0 and score["recall"] == 1.0
    # the indices behind it are in InfluxDB: the incident segment's TPI went up
    rows = select(db, f"SELECT max(\"tpi\") FROM \"traffic_segment\" WHERE \"segment\" = "
                      f"'{incident.entity}' AND \"window\" = '1m' AND time >= "
                      f"{incident.start_ms}ms AND time <= {incident.end_ms}ms")  # fmt: skip
    assert rows and rows[0]["max"] >= 6.0
    assert figures["district_tpi"]["city"]  # rollups were written


def test_normal_weekday_raises_no_incident_flood_or_deadman_alert(
    config: Config, tmp_path: Path
) -> None:
    _, figures = run("normal-weekday", config, tmp_path, **{"clock.duration_s": 9000.0})
    quiet = {"traffic_incident", "manhole_water_high", "device_offline",
             "traffic_detector_silent", "pole_silent", "manhole_silent"}  # fmt: skip
    assert quiet.isdisjoint(figures["alert_counts"])
    assert figures["points"]["traffic"] > 0


def test_rainstorm_raises_the_flood_alerts(config: Config, tmp_path: Path) -> None:
    sim, figures = run("rainstorm", config, tmp_path)
    floods = {e.entity for e in sim.truth.events if e.type == "flood"}
    assert len(floods) >= 5
    raised = {a["entity"] for a in figures["alerts"] if a["rule"] == "manhole_water_high"}
    assert raised == floods
    score = scores(figures)
    assert score["flood"]["recall"] == 1.0 and score["flood"]["precision"] == 1.0
    assert score["flood"]["max_time_to_detect_s"] <= 300  # manholes report every minute here
    assert score["cover_open"]["recall"] == 1.0 and score["gas"]["recall"] == 1.0


def test_device_failure_raises_the_deadman_alerts(config: Config, tmp_path: Path) -> None:
    # paced, not --speed max: at max speed 0.25 s of wall time is ~600 simulated seconds, and
    # a last will (sent by the broker when the link drops) can be overtaken by that much of
    # the other links' readings on a loaded machine: its alert is then timed that much late
    sim, figures = run("device-failure", config, tmp_path, speed=1000)
    outages = {e.entity for e in sim.truth.events if e.type == "outage"}
    wills = {a["entity"] for a in figures["alerts"] if a["rule"] == "device_offline"}
    silent = {a["entity"] for a in figures["alerts"] if a["rule"].endswith("_silent")}
    assert wills == outages  # every last will became an offline alert
    assert silent <= outages, sorted(silent - outages)
    assert len(silent) >= len(outages) // 2
    score = scores(figures)["outage"]
    spans = {e.entity: (e.start_ms / 1e3, (e.end_ms or 0) / 1e3) for e in sim.truth.events
             if e.type == "outage"}  # fmt: skip
    unmatched = [(a["rule"], a["entity"], a["started_ns"] / 1e9 - sim.start_s,
                  [t - sim.start_s for t in spans.get(a["entity"], ())]) for a in figures["alerts"]
                 if a["rule"] == "device_offline" or a["rule"].endswith("_silent")
                 if not spans.get(a["entity"]) or not spans[a["entity"]][0] - 60
                 <= a["started_ns"] / 1e9 <= spans[a["entity"]][1] + 900]  # fmt: skip
    assert score["recall"] == 1.0 and score["precision"] == 1.0, unmatched
    stuck = scores(figures)["stuck"]  # frozen detector speeds found and excluded
    assert stuck["recall"] == 1.0 and stuck["precision"] == 1.0
    # the will arrives at once; its time is the newest reading before it, which the
    # scenario's clock-skewed devices (+90 s) can put ahead
    first = sorted(
        (a["started_ns"] / 1e9 - spans[a["entity"]][0], a["rule"], a["entity"])
        for a in figures["alerts"]
        if a["entity"] in spans
    )
    assert score["max_time_to_detect_s"] <= 120, first[-5:]  # the latest detections, if not
    offline = [a for a in figures["alerts"] if a["rule"] == "device_offline"]
    assert {a["state"] for a in offline} == {"cleared"}  # they all came back


def test_haze_raises_air_quality_alerts_in_every_district(config: Config, tmp_path: Path) -> None:
    sim, figures = run("haze", config, tmp_path, **{"clock.duration_s": 14_400.0})
    score = scores(figures)["haze"]
    assert score["recall"] == 1.0 and score["precision"] == 1.0
    # the report's six-pollutant AQI (HJ 633): every district over 100 at its peak, named
    # by its primary pollutants, read back from air_quality_district in InfluxDB
    air = figures["air_quality"]
    assert set(air) == {d.id for d in sim.city.districts}
    for district, peak in air.items():
        assert peak["aqi"] > 100, (district, peak)
        primaries = set(peak["primary"].split(","))
        assert primaries <= {"pm25", "pm10", "so2", "no2", "co", "o3_1h", "o3_8h"}
        assert primaries & {"pm25", "pm10"}, (district, peak)  # haze: particles lead
        assert set(peak["exceeding"].split(",")) >= primaries - {""}
    html = render(figures)
    assert "highest hourly AQI (HJ 633-2012)" in html
    for peak in air.values():
        assert f"<td>{peak['primary']}</td>" in html
