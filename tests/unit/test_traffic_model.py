"""The traffic model against traffic-flow theory (Greenshields; the CTM; incident signatures)."""

from __future__ import annotations

import math
from collections import defaultdict

import msgspec
import numpy as np

from cityflux.simulators.citygen import CitySpec, generate_city
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.simulators.traffic import DemandProfile, TrafficModel, build_network

WEDNESDAY_0000_CST = 1_795_536_000.0  # 2026-11-25T00:00:00+08:00 (a Wednesday)


def _model(peak_share: float = 1.2) -> tuple[TrafficModel, DemandProfile]:
    city = generate_city(CitySpec(seed=9, districts=2, road_km=16, poles=0, manholes=0))
    rng = np.random.default_rng(0)
    net = build_network(city, 5.0, rng)
    return TrafficModel(net, 5.0, rng), DemandProfile(peak_share=peak_share)


def test_flow_never_exceeds_capacity_and_density_stays_physical() -> None:
    model, profile = _model(peak_share=1.5)  # demand well over capacity at the peaks
    max_ratio = 0.0
    for step in range(24 * 720):
        hour = step * 5 / 3600
        model.step(profile.share(hour, weekend=False))
        max_ratio = max(max_ratio, float(np.max(model.outflow_vph / model.net.q_max)))
        assert np.all(model.density >= 0)
        assert np.all(model.density <= model.net.kj + 1e-9)
    assert 0.9 < max_ratio <= 1.0 + 1e-9  # the peaks reach capacity, never beyond
    assert model.origin_queue.sum() >= 0


def test_speed_falls_as_density_rises_greenshields() -> None:
    model, profile = _model()
    for step in range(8 * 720 + 360):  # to 08:30, the morning peak, queues formed
        model.step(profile.share(step * 5 / 3600, weekend=False))
    k, v = model.density, model.speed()
    expected = model.net.vf * (1 - k / model.net.kj)
    assert np.allclose(v, expected)
    congested = k > model.net.kj / 2
    assert congested.any() and (~congested).any()
    order = np.argsort(k / model.net.kj)
    ratio = (v / model.net.vf)[order]
    assert np.all(np.diff(ratio) <= 1e-12)  # monotone: more density, less speed
    # flow at the congested cells is below capacity: q = v k (the congested branch)
    assert np.all(model.outflow_vph[congested] <= model.net.q_max[congested])


def test_demand_peaks_at_the_configured_hours() -> None:
    profile = DemandProfile(am_peak_h=7.5, pm_peak_h=17.0)
    hours = np.arange(0, 24, 0.05)
    shares = np.array([profile.share(h, weekend=False) for h in hours])
    morning, evening = hours < 12, hours >= 12
    assert abs(hours[morning][np.argmax(shares[morning])] - 7.5) <= 0.25
    assert abs(hours[evening][np.argmax(shares[evening])] - 17.0) <= 0.25
    weekend = np.array([profile.share(h, weekend=True) for h in hours])
    assert weekend.max() < shares.max()  # no commuter peaks at the weekend


def _readings(sim: Simulation, detectors: set[str]) -> dict[str, list[tuple[int, float, int]]]:
    """(ts ms, mean occupancy, total count) per detector, decoded from the published payloads."""
    out: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    for tick in sim.ticks():
        for topic, payload, _ in tick.messages:
            device = topic.rsplit("/", 1)[1]
            if device in detectors:
                reading = msgspec.json.decode(payload)
                lanes = reading["lanes"]
                occupancy = sum(lane["occupancy_pct"] for lane in lanes) / len(lanes)
                out[device].append((reading["ts"], occupancy, sum(la["count"] for la in lanes)))
    return out


def test_detector_counts_peak_at_the_configured_hours() -> None:
    scenario = load_scenario(
        "normal-weekday",
        {
            "clock.start": "00:00",
            "clock.duration_s": 86_400,
            "traffic.am_peak_h": 9.0,
            "traffic.pm_peak_h": 16.5,
            "city.districts": 1,
            "city.road_km": 8,
            "city.poles": 0,
            "city.manholes": 0,
            "publish.births": False,
        },
    )
    sim = Simulation(scenario, WEDNESDAY_0000_CST)
    totals: dict[int, int] = defaultdict(int)
    for tick in sim.ticks():
        for _, payload, _ in tick.messages:
            reading = msgspec.json.decode(payload)
            hour = int(((reading["ts"] / 1000 - WEDNESDAY_0000_CST) % 86_400) // 1800)  # 30 min
            totals[hour] += sum(lane["count"] for lane in reading["lanes"])
    halves = np.array([totals[h] for h in range(48)])
    assert abs(np.argmax(halves[:24]) / 2 - 9.0) <= 1.0
    assert abs((24 + np.argmax(halves[24:])) / 2 - 16.5) <= 1.0
    assert halves[2:8].sum() < 0.2 * halves[16:22].sum()  # 01:00-04:00 quiet vs 08:00-11:00


def test_incident_raises_occupancy_upstream_and_lowers_it_downstream() -> None:
    scenario = load_scenario("rush-hour-incident", {"publish.births": False})
    sim = Simulation(scenario, WEDNESDAY_0000_CST + 7 * 3600)  # 07:00 local
    incident = next(e for e in sim.truth.events if e.type == "incident")
    upstream = incident.details["upstream_detectors"][0]
    downstream = incident.details["downstream_detectors"][0]
    series = _readings(sim, {upstream, downstream})

    def mean_occupancy(device: str, start_ms: int, end_ms: int) -> float:
        values = [o for ts, o, _ in series[device] if start_ms <= ts < end_ms]
        return sum(values) / len(values)

    start, end = incident.start_ms, incident.end_ms or 0
    before = (start - 15 * 60_000, start)
    during = (start + 10 * 60_000, end)
    up_before, up_during = mean_occupancy(upstream, *before), mean_occupancy(upstream, *during)
    down_before = mean_occupancy(downstream, *before)
    down_during = mean_occupancy(downstream, *during)
    assert up_during > up_before + 15  # the queue reaches the upstream station
    assert up_during > 2 * down_during  # OCCDF and OCCRDF of the California algorithm
    assert down_during < down_before  # DOCCTD: flow downstream is starved
    after = (end + 40 * 60_000, end + 55 * 60_000)
    assert mean_occupancy(upstream, *after) < up_during  # the queue clears
    assert math.isclose(incident.details["capacity_left"], 0.25)
