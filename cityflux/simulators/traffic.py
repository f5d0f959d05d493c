"""Macroscopic traffic: the cell transmission model with Greenshields' fundamental diagram.

Each direction of each segment is a *link*, cut into cells at least one free-flow step long
(the CFL condition). Every step moves vehicles between neighbouring cells with the Godunov
scheme of the cell transmission model (Daganzo 1994; Lebacque 1996):

    flow(i -> j) = min(demand_i, supply_j)
    demand(k) = q(min(k, kc)),  supply(k) = q(max(k, kc)),  q(k) = vf k (1 - k / kj)

so a cell can never pass more than its capacity q_max = vf kj / 4 (Greenshields 1935), speed is
v = vf (1 - k / kj) everywhere, and a queue at a bottleneck grows upstream cell by cell
(spill-back). Vehicles enter at the upstream end of each corridor from a time-of-day demand
profile (an unbounded origin queue keeps demand that cannot enter) and leave at the downstream
end through an exit whose capacity stands for the junction there. An incident scales a cell's
capacity down, which is what a lane blockage does: occupancy rises upstream and falls
downstream.

Everything is numpy arrays over all cells of the city; one step is a handful of vector ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import msgspec
import numpy as np

from cityflux.model.citymap import CityMap

EFFECTIVE_LENGTH_M: Final = 7.0  # vehicle + loop length: occupancy = k * 7 m (5.5 m + 1.5 m loop)
EXIT_FACTOR: Final = {"expressway": 1.0, "arterial": 0.85, "secondary": 0.8, "branch": 0.8}
# Lane share of a direction's flow, kerb lane (1) first: kerb lanes carry less (turning, buses).
LANE_SPEED_FACTOR_KERB: Final = 0.93


class DemandProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Demand as a share of a corridor's entry capacity, by local hour of day.

    Weekdays: a base plus Gaussian morning and evening peaks on a daytime plateau; weekends: one
    broad midday hump. Peak hours and heights come from the scenario.
    """

    am_peak_h: float = 8.0
    pm_peak_h: float = 18.0
    peak_width_h: float = 1.0
    peak_share: float = 0.55
    day_share: float = 0.35
    night_share: float = 0.06

    def share(self, local_hour: float, weekend: bool) -> float:
        h = local_hour % 24.0
        day = 1.0 / (1.0 + math.exp(-(h - 6.5) * 2.0)) / (1.0 + math.exp((h - 21.5) * 1.5))
        if weekend:
            return self.night_share + 0.8 * self.day_share * day + 0.2 * _bump(h, 13.0, 3.0)
        peaks = _bump(h, self.am_peak_h, self.peak_width_h) + 0.9 * _bump(
            h, self.pm_peak_h, self.peak_width_h * 1.2
        )
        return self.night_share + self.day_share * day + self.peak_share * peaks


def _bump(h: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((h - centre) / width) ** 2)


@dataclass(slots=True)
class Network:
    """The city's links and cells as flat arrays (cell index = position in every array)."""

    link_segment: list[str]  # per link: segment id
    link_direction: list[str]  # per link: "forward" or "reverse"
    link_first_cell: np.ndarray
    cell_link: np.ndarray
    cell_length_km: np.ndarray
    cell_lanes: np.ndarray
    vf: np.ndarray  # free-flow speed km/h
    kj: np.ndarray  # jam density veh/km (all lanes)
    q_max: np.ndarray  # capacity veh/h (all lanes)
    downstream: np.ndarray  # next cell index, or -1: the corridor's exit
    exit_capacity: np.ndarray  # veh/h through the exit (used where downstream == -1)
    origins: np.ndarray  # cells where demand enters (no upstream cell)
    link_index: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def cells(self) -> int:
        return len(self.cell_link)

    def cell_at(self, segment: str, direction: str, position_m: float, length_m: float) -> int:
        """The cell holding a point of a segment (positions are along the forward geometry)."""
        link = self.link_index[(segment, direction)]
        first = int(self.link_first_cell[link])
        count = int(np.sum(self.cell_link == link))
        along = position_m if direction == "forward" else length_m - position_m
        return first + min(int(along / length_m * count), count - 1)


def build_network(city: CityMap, step_s: float, rng: np.random.Generator) -> Network:
    segments = {s.id: s for s in city.segments}
    links: list[tuple[str, str]] = [(s.id, "forward") for s in city.segments]
    links += [(s.id, "reverse") for s in city.segments if not s.oneway]
    index = {link: i for i, link in enumerate(links)}
    first_cell: list[int] = []
    cell_link: list[int] = []
    lengths: list[float] = []
    for i, (segment_id, _) in enumerate(links):
        segment = segments[segment_id]
        min_cell_km = segment.free_flow_kmh * step_s / 3_600  # CFL: one step crosses <= 1 cell
        count = max(1, math.floor(segment.length_m / 1_000 / min_cell_km))
        first_cell.append(len(cell_link))
        cell_link += [i] * count
        lengths += [segment.length_m / 1_000 / count] * count
    links_arr = np.asarray(cell_link)
    seg_of = [segments[s] for s, _ in links]
    lanes = np.array([seg_of[link].lanes for link in cell_link], dtype=float)
    vf = np.array([seg_of[link].free_flow_kmh for link in cell_link])
    q_max = np.array([seg_of[link].capacity_vphpl for link in cell_link]) * lanes
    kj = 4 * q_max / vf  # Greenshields: q_max = vf kj / 4
    downstream = np.arange(1, len(cell_link) + 1)
    last_cells = [*first_cell[1:], len(cell_link)]
    upstream_of: dict[int, int] = {}
    previous = {s.next[0]: s.id for s in city.segments if s.next}
    for i, (segment_id, direction) in enumerate(links):
        last = last_cells[i] - 1
        if direction == "forward":
            nxt = segments[segment_id].next
            after = index.get((nxt[0], "forward")) if nxt else None
        else:  # reverse: towards the segment whose first `next` is this one
            before = previous.get(segment_id)
            after = index.get((before, "reverse")) if before else None
        downstream[last] = first_cell[after] if after is not None else -1
        if after is not None:
            upstream_of[after] = i
    exit_factor = np.array(
        [EXIT_FACTOR[seg_of[link].road_class] for link in cell_link]
    ) * rng.uniform(0.9, 1.05, size=len(cell_link))
    origins = np.array([first_cell[i] for i in range(len(links)) if i not in upstream_of])
    return Network(
        link_segment=[s for s, _ in links],
        link_direction=[d for _, d in links],
        link_first_cell=np.asarray(first_cell),
        cell_link=links_arr,
        cell_length_km=np.asarray(lengths),
        cell_lanes=lanes,
        vf=vf,
        kj=kj,
        q_max=q_max,
        downstream=downstream,
        exit_capacity=q_max * np.minimum(exit_factor, 1.0),
        origins=origins,
        link_index=index,
    )


class TrafficModel:
    """State (density per cell, origin queues) and the CTM step."""

    def __init__(self, network: Network, step_s: float, rng: np.random.Generator) -> None:
        self.net = network
        self.step_h = step_s / 3_600
        self.density = np.zeros(network.cells)  # veh/km, all lanes
        self.origin_queue = np.zeros(len(network.origins))  # vehicles waiting to enter
        self.capacity_factor = np.ones(network.cells)  # < 1 where an incident blocks lanes
        # how strongly each corridor is used, relative to the profile (seeded, fixed)
        self.corridor_factor = rng.uniform(0.6, 1.05, size=len(network.origins))
        self.outflow_vph = np.zeros(network.cells)  # flow out of each cell in the last step
        self._has_downstream = network.downstream >= 0
        self._target = np.where(self._has_downstream, network.downstream, 0)

    def speed(self) -> np.ndarray:
        """Greenshields' speed of each cell, km/h."""
        speed: np.ndarray = self.net.vf * np.clip(1.0 - self.density / self.net.kj, 0.0, 1.0)
        return speed

    def step(self, demand_share: float) -> None:
        net, k = self.net, self.density
        q_cap = net.q_max * self.capacity_factor
        kc = net.kj / 2
        demand = np.minimum(_flow(np.minimum(k, kc), net), q_cap)
        supply = np.minimum(_flow(np.maximum(k, kc), net), q_cap)
        # flow into each downstream cell, shared pro rata where several cells merge into one
        wanted = np.bincount(
            self._target[self._has_downstream],
            weights=demand[self._has_downstream],
            minlength=net.cells,
        )
        ratio = np.minimum(1.0, supply / np.maximum(wanted, 1e-9))
        out = np.where(
            self._has_downstream,
            demand * ratio[self._target],
            np.minimum(demand, net.exit_capacity),
        )
        inflow = np.bincount(
            self._target[self._has_downstream],
            weights=out[self._has_downstream],
            minlength=net.cells,
        )
        arrivals = net.q_max[net.origins] * demand_share * self.corridor_factor
        waiting = self.origin_queue / self.step_h + arrivals
        entering = np.minimum(waiting, supply[net.origins])
        self.origin_queue = np.maximum(self.origin_queue + (arrivals - entering) * self.step_h, 0)
        inflow[net.origins] += entering
        self.density = np.clip(k + (inflow - out) * self.step_h / net.cell_length_km, 0, net.kj)
        self.outflow_vph = out


def _flow(k: np.ndarray, net: Network) -> np.ndarray:
    flow: np.ndarray = net.vf * k * (1.0 - k / net.kj)
    return flow


@dataclass(slots=True)
class DetectorBank:
    """Accumulates each detector's cell over an interval and emits per-lane readings."""

    cells: np.ndarray  # cell of each detector
    lanes: np.ndarray  # lanes of each detector
    lane_share: list[np.ndarray]  # per detector: share of flow per lane (sums to 1)
    vehicles: np.ndarray = field(init=False)
    density_sum: np.ndarray = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.vehicles = np.zeros(len(self.cells))
        self.density_sum = np.zeros(len(self.cells))
        self.steps = 0

    def accumulate(self, model: TrafficModel) -> None:
        self.vehicles += model.outflow_vph[self.cells] * model.step_h
        self.density_sum += model.density[self.cells]
        self.steps += 1

    def sample(
        self, model: TrafficModel, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per lane of every detector: (detector index, count, occupancy %, mean speed km/h).

        Counts are Poisson around the model's flow; occupancy is lane density x effective
        vehicle length with a little measurement noise; speed is Greenshields' speed at the
        lane's density, kerb lanes a little slower, with spot-speed noise.
        """
        steps = max(self.steps, 1)
        density = self.density_sum / steps  # veh/km, all lanes
        owner = np.repeat(np.arange(len(self.cells)), self.lanes)
        share = np.concatenate(self.lane_share)
        counts = rng.poisson(self.vehicles[owner] * share)
        per_lane = density[owner] * share  # veh/km in this lane
        occupancy = np.clip(
            per_lane * EFFECTIVE_LENGTH_M / 10 + rng.normal(0, 0.3, size=len(owner)), 0, 100
        )
        cell = self.cells[owner]
        kj_lane = model.net.kj[cell] / model.net.cell_lanes[cell]
        speed = model.net.vf[cell] * np.clip(1 - per_lane / kj_lane, 0.03, 1)
        kerb = _kerb_mask(self.lanes)
        speed = speed * np.where(kerb, LANE_SPEED_FACTOR_KERB, 1.0)
        speed = np.clip(speed + rng.normal(0, 2.0, size=len(owner)), 1.0, 200.0)
        self.reset()
        return owner, counts, occupancy, speed


def _kerb_mask(lanes: np.ndarray) -> np.ndarray:
    """True for lane 1 of every detector with more than one lane."""
    starts = np.concatenate([[0], np.cumsum(lanes)[:-1]])
    mask = np.zeros(int(lanes.sum()), dtype=bool)
    mask[starts[lanes > 1]] = True
    return mask


def lane_numbers(lanes: np.ndarray) -> np.ndarray:
    """1..n for each detector's lanes, concatenated."""
    starts = np.repeat(np.cumsum(lanes) - lanes, lanes)
    numbers: np.ndarray = np.arange(int(lanes.sum())) - starts + 1
    return numbers


def detector_bank(city: CityMap, net: Network, rng: np.random.Generator) -> DetectorBank:
    segments = {s.id: s for s in city.segments}
    cells = np.array(
        [
            net.cell_at(d.segment, d.direction, d.position_m, segments[d.segment].length_m)
            for d in city.detectors
        ],
        dtype=np.int64,
    )
    lanes = np.array([d.lanes for d in city.detectors], dtype=np.int64)
    shares = []
    for n in lanes.tolist():
        weights = np.ones(n) + rng.normal(0, 0.05, size=n)
        if n > 1:
            weights[0] *= 0.8  # the kerb lane
        shares.append(weights / weights.sum())
    return DetectorBank(cells=cells, lanes=lanes, lane_share=shares)
