"""The simulated city, step by step: traffic, poles, manholes, faults -> MQTT messages.

:class:`Simulation` owns the models and yields one :class:`Tick` per model step with the
messages due in it (topic, payload, retain) and the devices whose connection drops or returns.
It does no I/O, so the same ticks feed a broker (:mod:`cityflux.mqtt.publisher`), a test or
a benchmark. It also keeps :class:`Expected`, the exact count of what cityflux should store and
reject, and the scenario's ground truth (:class:`GroundTruth`) for scoring the analytics.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from cityflux.model.citymap import CityMap, load_city_map
from cityflux.simulators.citygen import generate_city
from cityflux.simulators.environment import (
    ManholeState,
    PoleState,
    bell,
    manhole_readings,
    pole_readings,
)
from cityflux.simulators.faults import MALFORMED, FaultPlan, malformed_message
from cityflux.simulators.scenario import Haze, Rain, Scenario
from cityflux.simulators.traffic import (
    Network,
    TrafficModel,
    build_network,
    detector_bank,
    lane_numbers,
)


@dataclass(slots=True)
class Tick:
    sim_s: float
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    disconnect: list[int] = field(default_factory=list)  # device numbers whose will fires
    reconnect: list[int] = field(default_factory=list)  # they come back (birth on own link)


@dataclass(slots=True)
class Expected:
    """What cityflux must end up with, counted as the messages are made."""

    points: Counter[str] = field(default_factory=Counter)  # per InfluxDB measurement
    readings: Counter[str] = field(default_factory=Counter)  # per kind
    readings_by_district: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)  # per dead-letter reason
    messages: int = 0
    duplicates: int = 0
    offline_now: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "duplicates": self.duplicates,
            "points": dict(self.points),
            "readings": dict(self.readings),
            "readings_by_district": dict(self.readings_by_district),
            "rejections": dict(self.rejections),
        }


class TruthEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str  # incident, flood, rain, haze, outage, lamp_fault, cover_open, gas, stuck, drift
    entity: str
    district: str
    start: str  # RFC 3339
    end: str | None = None
    start_ms: int
    end_ms: int | None = None
    details: dict[str, Any] = {}


class GroundTruth(msgspec.Struct, kw_only=True):
    scenario: str
    start: str
    start_ms: int
    end_ms: int
    events: list[TruthEvent] = []


@dataclass(slots=True)
class Devices:
    """Every device of the city, numbered: poles, then manholes, then detectors."""

    kind: list[str]
    ids: list[str]
    district: list[str]
    topic: list[str]
    offset: dict[str, int]  # first device number of each kind

    def number(self, kind: str, index: int) -> int:
        return self.offset[kind] + index

    def status_topic(self, number: int) -> str:
        return f"{self.topic[number]}/status"


def load_city(scenario: Scenario) -> CityMap:
    if scenario.city.map:
        return load_city_map(scenario.city.map)
    return generate_city(scenario.city)


def _iso(epoch_s: float, offset_h: float) -> str:
    tz = dt.timezone(dt.timedelta(hours=offset_h))
    return dt.datetime.fromtimestamp(epoch_s, tz).isoformat(timespec="seconds")


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        start_s: float,
        topic_root: str = "cityflux/v1",
        city: CityMap | None = None,
    ) -> None:
        self.scenario = scenario
        self.city = city or load_city(scenario)
        self.start_s = start_s
        self.end_s = start_s + scenario.clock.duration_s
        self.step_s = scenario.clock.step_s
        self.rng = np.random.default_rng(scenario.city.seed + 1_000)
        self.expected = Expected()
        self.devices = _devices(self.city, topic_root)
        self.district_index = {d.id: i for i, d in enumerate(self.city.districts)}
        self.truth = GroundTruth(
            scenario=scenario.name,
            start=_iso(start_s, scenario.clock.utc_offset_h),
            start_ms=round(start_s * 1000),
            end_ms=round(self.end_s * 1000),
        )
        self._setup_traffic()
        self._setup_poles()
        self._setup_manholes()
        self.faults = FaultPlan(
            scenario.faults, self.devices, self.rng, start_s, scenario.clock.duration_s, self._truth
        )
        self._malformed = itertools.cycle(MALFORMED)
        self._held: list[tuple[float, str, bytes]] = []  # (release at, topic, payload)
        self._buffers: dict[int, list[bytes]] = {}  # readings_per_message > 1
        self._flooded = np.zeros(len(self.city.manholes), dtype=bool)
        self._flood_start = np.zeros(len(self.city.manholes))
        self._truth_environment()

    # -- set-up ---------------------------------------------------------------------------
    def _setup_traffic(self) -> None:
        self.network: Network = build_network(self.city, self.step_s, self.rng)
        self.model = TrafficModel(self.network, self.step_s, self.rng)
        self.bank = detector_bank(self.city, self.network, self.rng)
        self.lane_no = lane_numbers(self.bank.lanes)
        self.profile = self.scenario.traffic
        self.incidents = [self._place_incident(i) for i in self.scenario.incidents]

    def _place_incident(self, incident: Any) -> tuple[int, float, float, float]:
        """(cell, start, end, capacity left); the cell is just downstream of a detector."""
        net, city = self.network, self.city
        det_cells = {int(c): i for i, c in enumerate(self.bank.cells.tolist())}
        segment_id = incident.segment or self._busiest_arterial(incident.direction)
        link = net.link_index[(segment_id, incident.direction)]
        on_link = [
            i
            for i, d in enumerate(city.detectors)
            if d.segment == segment_id and d.direction == incident.direction
        ]
        cell = int(self.bank.cells[on_link[0]]) + 1 if on_link else int(net.link_first_cell[link])
        if cell >= net.cells or net.cell_link[cell] != link:
            cell -= 1
        up = [city.detectors[i].id for i in on_link]
        start = self.start_s + incident.start_s
        end = start + incident.duration_s
        segment = city.segment(segment_id)
        downstream_det = [
            city.detectors[i].id
            for c, i in det_cells.items()
            if c > cell and net.cell_link[c] != link and c - cell < 40
        ][:1]
        self._truth(
            "incident", segment_id, segment.district, start, end,
            direction=incident.direction, capacity_left=incident.capacity_left,
            upstream_detectors=up, downstream_detectors=downstream_det,
        )  # fmt: skip
        return cell, start, end, incident.capacity_left

    def _busiest_arterial(self, direction: str) -> str:
        net = self.network
        best, best_factor = None, -1.0
        for origin, factor in zip(
            net.origins.tolist(), self.model.corridor_factor.tolist(), strict=True
        ):
            link = int(net.cell_link[origin])
            segment = self.city.segment(net.link_segment[link])
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

    def _setup_poles(self) -> None:
        poles, rng, n = self.city.poles, self.rng, len(self.city.poles)
        self.pole_state = PoleState(
            lon=np.array([p.lon for p in poles]),
            lat=np.array([p.lat for p in poles]),
            rated_w=np.array([p.lamp_rated_w for p in poles]),
            district=np.array([self.district_index[p.district] for p in poles], dtype=np.int64),
            background_pm25=rng.uniform(15, 35, n),
            coarse_ratio=rng.uniform(1.4, 1.9, n),
            lamp_mode=self._lamp_modes(n),
        )
        first_cell = {}
        for link, (segment, direction) in enumerate(
            zip(self.network.link_segment, self.network.link_direction, strict=True)
        ):
            if direction == "forward":
                first_cell[segment] = int(self.network.link_first_cell[link])
        self.pole_cell = np.array([first_cell.get(p.segment or "", 0) for p in poles], dtype=int)
        self.pole_phase = rng.uniform(0, self.scenario.intervals.pole_s, n)

    def _lamp_modes(self, n: int) -> np.ndarray:
        modes = np.zeros(n, dtype=np.int64)
        share = self.scenario.faults.lamp_failure_share
        failing: list[int] = (
            self.rng.choice(n, size=round(n * share), replace=False).tolist() if n else []
        )
        for index in failing:
            modes[index] = int(self.rng.integers(1, 4))
            pole = self.city.poles[index]
            mode = ("burns_by_day", "dark_at_night", "power_off_rating")[modes[index] - 1]
            self._truth("lamp_fault", pole.id, pole.district, self.start_s, None, mode=mode)
        return modes

    def _setup_manholes(self) -> None:
        holes, rng, n = self.city.manholes, self.rng, len(self.city.manholes)
        self.manhole_state = ManholeState(
            district=np.array([self.district_index[m.district] for m in holes], dtype=np.int64),
            depth_cm=np.array([m.depth_cm for m in holes]),
            gain_cm_per_mm=rng.lognormal(np.log(3.0), 0.6, n),
            base_level_cm=rng.uniform(2, 20, n),
            battery_pct=rng.uniform(15, 100, n),
            drain_pct_per_day=rng.uniform(0.05, 0.3, n),
        )
        self.manhole_phase = rng.uniform(0, self.scenario.intervals.manhole_s, n)
        duration = self.scenario.clock.duration_s
        events = self.scenario.manholes
        for kind, count in (("cover_open", events.cover_opens), ("gas", events.gas_spikes)):
            for index in rng.choice(n, size=min(count, n), replace=False) if n else []:
                start = self.start_s + float(rng.uniform(0.1, 0.7)) * duration
                end = start + float(rng.uniform(600, 1_800))
                state = self.manhole_state
                if kind == "cover_open":
                    state.open_from[index], state.open_until[index] = start, end
                else:
                    state.gas_from[index], state.gas_until[index] = start, end
                    state.gas_peak[index] = float(rng.uniform(25, 60))
                hole = holes[index]
                self._truth(kind, hole.id, hole.district, start, end)

    def _truth_environment(self) -> None:
        every = [d.id for d in self.city.districts]
        episodes: list[Rain | Haze] = [*self.scenario.rain, *self.scenario.haze]
        for episode in episodes:
            start = self.start_s + episode.start_s
            kind = "rain" if isinstance(episode, Rain) else "haze"
            details = msgspec.structs.asdict(episode)
            for district in episode.districts or every:
                self._truth(kind, district, district, start, start + episode.duration_s, **details)

    def _truth(
        self, kind: str, entity: str, district: str, start: float, end: float | None, **details: Any
    ) -> None:
        offset = self.scenario.clock.utc_offset_h
        self.truth.events.append(
            TruthEvent(
                type=kind,
                entity=entity,
                district=district,
                start=_iso(start, offset),
                end=_iso(end, offset) if end is not None else None,
                start_ms=round(start * 1000),
                end_ms=round(end * 1000) if end is not None else None,
                details=details,
            )
        )

    # -- the run --------------------------------------------------------------------------
    @staticmethod
    def birth_payload(at_s: float) -> bytes:
        return b'{"state":"online","ts":%d}' % round(at_s * 1000)

    def births(self) -> Tick:
        """Retained ``online`` status of every device that has no connection of its own.

        Devices with their own connection (those that will go offline) publish their birth on
        it when the runner connects them; they are counted here too.
        """
        tick = Tick(self.start_s)
        own = self.faults.own_connection
        self.expected.points["device_status"] += len(own)
        self.expected.messages += len(own)
        if not self.scenario.publish.births:
            return tick
        payload = self.birth_payload(self.start_s)
        for number in range(len(self.devices.ids)):
            if number not in own:
                tick.messages.append((self.devices.status_topic(number), payload, True))
        self.expected.points["device_status"] += len(tick.messages)
        self.expected.messages += len(tick.messages)
        return tick

    def ticks(self) -> Iterator[Tick]:
        steps = round(self.scenario.clock.duration_s / self.step_s)
        for step in range(1, steps + 1):
            yield self._tick(self.start_s + step * self.step_s)
        yield self.finish(self.end_s)

    def finish(self, at_s: float) -> Tick:
        """The end of the run (complete or stopped early at ``at_s``): close the ground truth
        and release every held or buffered message, so all counted messages get published."""
        self.end_s = min(self.end_s, at_s)
        self.truth.end_ms = round(self.end_s * 1000)
        self._close_truth()
        tick = self._flush_held(float("inf"))  # release everything still held ...
        tick.sim_s = self.end_s  # ... at the end of the run
        return tick

    def _tick(self, t: float) -> Tick:
        tick = Tick(t)
        previous = t - self.step_s
        local_hour = ((t + self.scenario.clock.utc_offset_h * 3600) % 86_400) / 3600
        weekend = dt.datetime.fromtimestamp(t, dt.UTC).weekday() >= 5
        self.model.capacity_factor[:] = 1.0
        for cell, start, end, left in self.incidents:
            if start <= t < end:
                self.model.capacity_factor[cell] = left
        self.model.step(self.profile.share(local_hour, weekend))
        self.bank.accumulate(self.model)
        rain, haze = self._weather(t)
        self.manhole_state.step(self.step_s, rain)
        self._track_floods(t)
        tick.disconnect, tick.reconnect = self.faults.transitions(previous, t)
        self.expected.points["device_status"] += len(tick.disconnect) + len(tick.reconnect)
        self.expected.messages += len(tick.reconnect)  # the births; wills come from the broker
        self.expected.offline_now = len(self.faults.offline)
        interval = self.scenario.intervals.traffic_s
        if int(t // interval) != int(previous // interval):
            self._traffic_messages(tick, int(t // interval) * interval - interval)
        self._pole_messages(tick, previous, t, local_hour, rain, haze)
        self._manhole_messages(tick, previous, t)
        tick.messages += self._flush_held(t).messages
        return tick

    def _weather(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        districts = len(self.city.districts)
        rain, haze = np.zeros(districts), np.zeros(districts)
        events: list[tuple[Rain | Haze, np.ndarray, float]] = [
            *((r, rain, r.peak_mm_h) for r in self.scenario.rain),
            *((h, haze, h.pm25_ugm3) for h in self.scenario.haze),
        ]
        for event, target, value in events:
            weight = value * bell(t, self.start_s + event.start_s, event.duration_s)
            chosen = [self.district_index[d] for d in event.districts] or list(range(districts))
            target[chosen] += weight
        return rain, haze

    def _track_floods(self, t: float) -> None:
        now = self.manhole_state.flooded()
        for index in np.flatnonzero(now & ~self._flooded).tolist():
            self._flood_start[index] = t
        for index in np.flatnonzero(~now & self._flooded).tolist():
            self._flood_truth(index, t)
        self._flooded = now

    def _flood_truth(self, index: int, end: float | None) -> None:
        hole = self.city.manholes[index]
        self._truth(
            "flood", hole.id, hole.district, float(self._flood_start[index]), end,
            depth_cm=hole.depth_cm,
        )  # fmt: skip

    def _close_truth(self) -> None:
        for index in np.flatnonzero(self._flooded).tolist():
            self._flood_truth(index, None)
        self.faults.close_truth(self.end_s)

    # -- messages per kind ----------------------------------------------------------------
    def _traffic_messages(self, tick: Tick, interval_start: float) -> None:
        owner, counts, occupancy, speed = self.bank.sample(self.model, self.rng)
        speed = self.faults.stuck_values("traffic", owner, speed, tick.sim_s)
        occupancy_l = np.round(occupancy, 1).tolist()
        speed_l = np.round(speed, 1).tolist()
        counts_l = counts.tolist()
        lane_l = self.lane_no.tolist()
        interval_s = self.scenario.intervals.traffic_s
        bounds = np.concatenate([[0], np.cumsum(self.bank.lanes)]).tolist()
        offset = self.devices.offset["traffic"]
        for det in range(len(self.bank.lanes)):
            number = offset + det
            if number in self.faults.offline:
                continue
            lanes = []
            for j in range(bounds[det], bounds[det + 1]):
                lane: dict[str, Any] = {
                    "lane": lane_l[j],
                    "count": counts_l[j],
                    "occupancy_pct": occupancy_l[j],
                }
                if counts_l[j]:
                    lane["speed_kmh"] = speed_l[j]
                lanes.append(lane)
            reading = {"interval_s": interval_s, "lanes": lanes}
            self._emit(tick, number, interval_start, reading, points=len(lanes))

    def _due(self, phase: np.ndarray, interval: int, previous: float, t: float) -> np.ndarray:
        return np.flatnonzero(((t - phase) // interval) != ((previous - phase) // interval))

    def _pole_messages(
        self,
        tick: Tick,
        previous: float,
        t: float,
        local_hour: float,
        rain: np.ndarray,
        haze: np.ndarray,
    ) -> None:
        interval = self.scenario.intervals.pole_s
        due = self._due(self.pole_phase, interval, previous, t)
        if not len(due):
            return
        at = ((t - self.pole_phase[due]) // interval) * interval + self.pole_phase[due]
        cells = self.pole_cell[due]
        share = np.clip(self.model.outflow_vph[cells] / self.network.q_max[cells], 0, 1)
        columns = pole_readings(self.pole_state, due, t, local_hour, share, rain, haze, self.rng)
        hours = (t - self.start_s) / 3600
        columns["pm25_ugm3"] = self.faults.drifted(due, columns["pm25_ugm3"], hours)
        columns["pm25_ugm3"] = self.faults.stuck_values("pole", due, columns["pm25_ugm3"], t)
        self._emit_columns(tick, "pole", due, at, columns)

    def _manhole_messages(self, tick: Tick, previous: float, t: float) -> None:
        interval = self.scenario.intervals.manhole_s
        due = self._due(self.manhole_phase, interval, previous, t)
        if not len(due):
            return
        at = ((t - self.manhole_phase[due]) // interval) * interval + self.manhole_phase[due]
        columns = manhole_readings(self.manhole_state, due, t, self.rng)
        self._emit_columns(tick, "manhole", due, at, columns)

    def _emit_columns(
        self,
        tick: Tick,
        kind: str,
        index: np.ndarray,
        at: np.ndarray,
        columns: dict[str, np.ndarray],
    ) -> None:
        names = list(columns)
        rows = zip(*(columns[name].tolist() for name in names), strict=True)
        offset = self.devices.offset[kind]
        for i, ts, values in zip(index.tolist(), at.tolist(), rows, strict=True):
            number = offset + i
            if number not in self.faults.offline:
                self._emit(tick, number, ts, dict(zip(names, values, strict=True)), points=1)

    def _emit(
        self, tick: Tick, number: int, ts: float, reading: dict[str, Any], points: int
    ) -> None:
        kind = self.devices.kind[number]
        reading["ts"] = round((ts + self.faults.skew_s(number)) * 1000)
        self.expected.points[kind] += points
        self.expected.readings[kind] += 1
        self.expected.readings_by_district[self.devices.district[number]] += 1
        body = msgspec.json.encode(reading)
        per_message = self.scenario.publish.readings_per_message
        if per_message > 1:
            buffer = self._buffers.setdefault(number, [])
            buffer.append(body)
            if len(buffer) < per_message:
                return
            body = b"[" + b",".join(buffer) + b"]"
            buffer.clear()
        self._send(tick, number, body)

    def _send(self, tick: Tick, number: int, body: bytes) -> None:
        topic = self.devices.topic[number]
        fate = self.faults.fate(self.rng)
        if fate == "late":
            self._held.append((tick.sim_s + self.scenario.faults.late_s, topic, body))
        elif fate == "out_of_order":
            interval = self.scenario.intervals.traffic_s
            self._held.append((tick.sim_s + interval + self.step_s, topic, body))
        else:
            tick.messages.append((topic, body, False))
            if fate == "duplicate":
                tick.messages.append((topic, body, False))
                self.expected.duplicates += 1
                self.expected.messages += 1
        self.expected.messages += 1
        if self.rng.random() < self.scenario.faults.malformed_share:
            reason = next(self._malformed)
            kind, ts_ms = self.devices.kind[number], round(tick.sim_s * 1000)
            tick.messages.append(malformed_message(reason, topic, kind, ts_ms))
            self.expected.rejections[reason] += 1
            self.expected.messages += 1

    def _flush_held(self, t: float) -> Tick:
        tick = Tick(t)
        if self._held:
            due = [h for h in self._held if h[0] <= t]
            self._held = [h for h in self._held if h[0] > t]
            tick.messages += [(topic, body, False) for _, topic, body in due]
        if t == float("inf"):
            for number, buffer in self._buffers.items():
                if buffer:  # the end of the run: gateways forward what they hold
                    payload = b"[" + b",".join(buffer) + b"]"
                    tick.messages.append((self.devices.topic[number], payload, False))
                    self.expected.messages += 1
            self._buffers.clear()
        return tick


def _devices(city: CityMap, root: str) -> Devices:
    kinds: list[str] = []
    ids: list[str] = []
    districts: list[str] = []
    offset = {}
    for kind, members in city.devices_by_kind().items():
        offset[kind] = len(ids)
        kinds += [kind] * len(members)
        ids += [device for device, _ in members]
        districts += [district for _, district in members]
    topics = [f"{root}/{d}/{k}/{i}" for k, i, d in zip(kinds, ids, districts, strict=True)]
    return Devices(kind=kinds, ids=ids, district=districts, topic=topics, offset=offset)
