"""The scenario placed on the city at the start of a run: where incidents block a road, each
pole's and manhole's fixed traits and state, which lamps are faulty, when covers open and gas
leaks; each placed event is written to the ground truth.

Everything is drawn from the run's one seeded generator, so the order of the draws here is
part of a scenario's outcome: change it and every scenario's readings change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cityflux.model.citymap import CityMap
from cityflux.simulators.environment import ManholeState, PoleState
from cityflux.simulators.scenario import Incident, Scenario
from cityflux.simulators.traffic import DetectorBank, Network
from cityflux.simulators.truth import TruthLog

LAMP_FAULTS = ("burns_by_day", "dark_at_night", "power_off_rating")  # PoleState.lamp_mode 1..3


@dataclass(frozen=True, slots=True)
class PlacedIncident:
    cell: int  # just downstream of a detector, so the queue reaches it
    start_s: float
    end_s: float
    capacity_left: float


def place_incident(
    incident: Incident,
    city: CityMap,
    net: Network,
    bank: DetectorBank,
    corridor_factor: np.ndarray,
    start_s: float,
    log: TruthLog,
) -> PlacedIncident:
    det_cells = {int(c): i for i, c in enumerate(bank.cells.tolist())}
    segment_id = incident.segment or _busiest_arterial(
        city, net, corridor_factor, incident.direction
    )
    link = net.link_index[(segment_id, incident.direction)]
    on_link = [
        i
        for i, d in enumerate(city.detectors)
        if d.segment == segment_id and d.direction == incident.direction
    ]
    cell = int(bank.cells[on_link[0]]) + 1 if on_link else int(net.link_first_cell[link])
    if cell >= net.cells or net.cell_link[cell] != link:
        cell -= 1
    up = [city.detectors[i].id for i in on_link]
    start = start_s + incident.start_s
    end = start + incident.duration_s
    segment = city.segment(segment_id)
    downstream_det = [
        city.detectors[i].id
        for c, i in det_cells.items()
        if c > cell and net.cell_link[c] != link and c - cell < 40
    ][:1]
    log(
        "incident", segment_id, segment.district, start, end,
        direction=incident.direction, capacity_left=incident.capacity_left,
        upstream_detectors=up, downstream_detectors=downstream_det,
    )  # fmt: skip
    return PlacedIncident(cell, start, end, incident.capacity_left)


def _busiest_arterial(
    city: CityMap, net: Network, corridor_factor: np.ndarray, direction: str
) -> str:
    """The middle segment of the arterial corridor in ``direction`` with the most demand."""
    best, best_factor = None, -1.0
    for origin, factor in zip(net.origins.tolist(), corridor_factor.tolist(), strict=True):
        link = int(net.cell_link[origin])
        segment = city.segment(net.link_segment[link])
        arterial = segment.road_class == "arterial" and net.link_direction[link] == direction
        if arterial and factor > best_factor:
            best, best_factor = origin, factor
    if best is None:
        raise ValueError(f"no {direction} arterial corridor for an incident")
    chain = [int(best)]
    while net.downstream[chain[-1]] >= 0:
        chain.append(int(net.downstream[chain[-1]]))
    links = list(dict.fromkeys(int(net.cell_link[c]) for c in chain))
    return net.link_segment[links[len(links) // 2]]


@dataclass(frozen=True, slots=True)
class PlacedPoles:
    state: PoleState
    cell: np.ndarray  # the traffic cell whose flow a pole's noise and PM follow
    phase: np.ndarray  # seconds into the reporting interval at which each pole reports


def place_poles(
    city: CityMap,
    scenario: Scenario,
    net: Network,
    district_index: dict[str, int],
    rng: np.random.Generator,
    start_s: float,
    log: TruthLog,
) -> PlacedPoles:
    poles, n = city.poles, len(city.poles)
    state = PoleState(
        lon=np.array([p.lon for p in poles]),
        lat=np.array([p.lat for p in poles]),
        rated_w=np.array([p.lamp_rated_w for p in poles]),
        district=np.array([district_index[p.district] for p in poles], dtype=np.int64),
        background_pm25=rng.uniform(15, 35, n),
        coarse_ratio=rng.uniform(1.4, 1.9, n),
        lamp_mode=_lamp_modes(city, scenario.faults.lamp_failure_share, rng, start_s, log),
    )
    first_cell = {}
    for link, (segment, direction) in enumerate(
        zip(net.link_segment, net.link_direction, strict=True)
    ):
        if direction == "forward":
            first_cell[segment] = int(net.link_first_cell[link])
    cell = np.array([first_cell.get(p.segment or "", 0) for p in poles], dtype=int)
    phase = rng.uniform(0, scenario.intervals.pole_s, n)
    return PlacedPoles(state, cell, phase)


def _lamp_modes(
    city: CityMap, share: float, rng: np.random.Generator, start_s: float, log: TruthLog
) -> np.ndarray:
    n = len(city.poles)
    modes = np.zeros(n, dtype=np.int64)
    failing: list[int] = rng.choice(n, size=round(n * share), replace=False).tolist() if n else []
    for index in failing:
        modes[index] = int(rng.integers(1, 4))
        pole = city.poles[index]
        log("lamp_fault", pole.id, pole.district, start_s, None, mode=LAMP_FAULTS[modes[index] - 1])
    return modes


@dataclass(frozen=True, slots=True)
class PlacedManholes:
    state: ManholeState
    phase: np.ndarray  # seconds into the reporting interval at which each manhole reports


def place_manholes(
    city: CityMap,
    scenario: Scenario,
    district_index: dict[str, int],
    rng: np.random.Generator,
    start_s: float,
    log: TruthLog,
) -> PlacedManholes:
    holes, n = city.manholes, len(city.manholes)
    state = ManholeState(
        district=np.array([district_index[m.district] for m in holes], dtype=np.int64),
        depth_cm=np.array([m.depth_cm for m in holes]),
        gain_cm_per_mm=rng.lognormal(np.log(3.0), 0.6, n),
        base_level_cm=rng.uniform(2, 20, n),
        battery_pct=rng.uniform(15, 100, n),
        drain_pct_per_day=rng.uniform(0.05, 0.3, n),
    )
    phase = rng.uniform(0, scenario.intervals.manhole_s, n)
    duration = scenario.clock.duration_s
    events = scenario.manholes
    for kind, count in (("cover_open", events.cover_opens), ("gas", events.gas_spikes)):
        for index in rng.choice(n, size=min(count, n), replace=False) if n else []:
            start = start_s + float(rng.uniform(0.1, 0.7)) * duration
            end = start + float(rng.uniform(600, 1_800))
            if kind == "cover_open":
                state.open_from[index], state.open_until[index] = start, end
            else:
                state.gas_from[index], state.gas_until[index] = start, end
                state.gas_peak[index] = float(rng.uniform(25, 60))
            hole = holes[index]
            log(kind, hole.id, hole.district, start, end)
    return PlacedManholes(state, phase)
