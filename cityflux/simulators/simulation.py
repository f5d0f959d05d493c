"""The simulated city, step by step: traffic, poles, manholes, faults -> MQTT messages.

:class:`Simulation` owns the models and yields one :class:`Tick` per model step with the
messages due in it (topic, payload, retain) and the devices whose connection drops or returns.
It does no I/O, so the same ticks feed a broker (:mod:`cityflux.mqtt.publisher`), a test or
a benchmark. It also keeps :class:`Expected`, the exact count of what cityflux should store and
reject, and the scenario's ground truth (:class:`GroundTruth`) for scoring the analytics.

The parts: :mod:`~cityflux.simulators.placement` sets the scenario on the map,
:mod:`~cityflux.simulators.outbox` turns readings into messages with the delivery faults,
:mod:`~cityflux.simulators.truth` keeps the ground truth; this module steps the models and
samples the readings due in each step.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np

from cityflux.model.citymap import CityMap, load_city_map
from cityflux.simulators.citygen import generate_city
from cityflux.simulators.environment import bell, manhole_readings, pole_readings
from cityflux.simulators.faults import FaultPlan
from cityflux.simulators.outbox import Devices, Expected, Outbox, Tick
from cityflux.simulators.placement import (
    place_incident,
    place_manholes,
    place_poles,
)
from cityflux.simulators.scenario import Haze, Rain, Scenario
from cityflux.simulators.traffic import (
    Network,
    TrafficModel,
    build_network,
    detector_bank,
    lane_numbers,
)
from cityflux.simulators.truth import Floods, GroundTruth, TruthEvent, TruthLog, iso

# Names this module has always offered: its users import them from here.
__all__ = [
    "Devices",
    "Expected",
    "GroundTruth",
    "Simulation",
    "Tick",
    "TruthEvent",
    "load_city",
]


def load_city(scenario: Scenario) -> CityMap:
    if scenario.city.map:
        return load_city_map(scenario.city.map)
    return generate_city(scenario.city)


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
        self.gas_rng = np.random.default_rng(scenario.city.seed + 2_000)  # gases, Lmax
        self.haze_no2 = np.zeros(len(self.city.districts))
        self.expected = Expected()
        self.devices = Devices.of(self.city, topic_root)
        self.district_index = {d.id: i for i, d in enumerate(self.city.districts)}
        self.truth = GroundTruth(
            scenario=scenario.name,
            start=iso(start_s, scenario.clock.utc_offset_h),
            start_ms=round(start_s * 1000),
            end_ms=round(self.end_s * 1000),
        )
        self._truth = TruthLog(self.truth, scenario.clock.utc_offset_h)
        # The order of these set-ups is the order of the seeded draws: keep it.
        self._setup_traffic()
        poles = place_poles(
            self.city, scenario, self.network, self.district_index, self.rng, start_s, self._truth
        )
        self.pole_state, self.pole_cell, self.pole_phase = poles.state, poles.cell, poles.phase
        holes = place_manholes(
            self.city, scenario, self.district_index, self.rng, start_s, self._truth
        )
        self.manhole_state, self.manhole_phase = holes.state, holes.phase
        self.faults = FaultPlan(
            scenario.faults, self.devices, self.rng, start_s, scenario.clock.duration_s, self._truth
        )
        self.outbox = Outbox(scenario, self.devices, self.faults, self.rng, self.expected)
        self.floods = Floods(self.city, self._truth)
        self._truth_environment()

    def _setup_traffic(self) -> None:
        self.network: Network = build_network(self.city, self.step_s, self.rng)
        self.model = TrafficModel(self.network, self.step_s, self.rng)
        self.bank = detector_bank(self.city, self.network, self.rng)
        self.lane_no = lane_numbers(self.bank.lanes)
        self.profile = self.scenario.traffic
        net, corridors = self.network, self.model.corridor_factor
        self.incidents = [
            place_incident(i, self.city, net, self.bank, corridors, self.start_s, self._truth)
            for i in self.scenario.incidents
        ]

    def _truth_environment(self) -> None:
        every = [d.id for d in self.city.districts]
        episodes: list[Rain | Haze] = [*self.scenario.rain, *self.scenario.haze]
        for episode in episodes:
            start = self.start_s + episode.start_s
            kind = "rain" if isinstance(episode, Rain) else "haze"
            details = msgspec.structs.asdict(episode)
            for district in episode.districts or every:
                self._truth(kind, district, district, start, start + episode.duration_s, **details)

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
        self.floods.close()
        self.faults.close_truth(self.end_s)
        tick = self.outbox.flush(float("inf"))  # release everything still held ...
        tick.sim_s = self.end_s  # ... at the end of the run
        return tick

    def _tick(self, t: float) -> Tick:
        tick = Tick(t)
        previous = t - self.step_s
        local_hour = ((t + self.scenario.clock.utc_offset_h * 3600) % 86_400) / 3600
        weekend = dt.datetime.fromtimestamp(t, dt.UTC).weekday() >= 5
        self.model.capacity_factor[:] = 1.0
        for incident in self.incidents:
            if incident.start_s <= t < incident.end_s:
                self.model.capacity_factor[incident.cell] = incident.capacity_left
        self.model.step(self.profile.share(local_hour, weekend))
        self.bank.accumulate(self.model)
        rain, haze = self._weather(t)
        self.manhole_state.step(self.step_s, rain)
        self.floods.track(self.manhole_state.flooded(), t)
        tick.disconnect, tick.reconnect = self.faults.transitions(previous, t)
        self.expected.points["device_status"] += len(tick.disconnect) + len(tick.reconnect)
        self.expected.messages += len(tick.reconnect)  # the births; wills come from the broker
        self.expected.offline_now = len(self.faults.offline)
        interval = self.scenario.intervals.traffic_s
        if int(t // interval) != int(previous // interval):
            self._traffic_messages(tick, int(t // interval) * interval - interval)
        self._pole_messages(tick, previous, t, local_hour, rain, haze)
        self._manhole_messages(tick, previous, t)
        tick.messages += self.outbox.flush(t).messages
        return tick

    def _weather(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        districts = len(self.city.districts)
        rain, haze = np.zeros(districts), np.zeros(districts)
        events: list[tuple[Rain | Haze, np.ndarray, float]] = [
            *((r, rain, r.peak_mm_h) for r in self.scenario.rain),
            *((h, haze, h.pm25_ugm3) for h in self.scenario.haze),
        ]
        self.haze_no2 = np.zeros(districts)
        events += [(h, self.haze_no2, h.no2_ugm3) for h in self.scenario.haze]
        for event, target, value in events:
            weight = value * bell(t, self.start_s + event.start_s, event.duration_s)
            chosen = [self.district_index[d] for d in event.districts] or list(range(districts))
            target[chosen] += weight
        return rain, haze

    # -- readings per kind ----------------------------------------------------------------
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
            self.outbox.emit(tick, number, interval_start, reading, points=len(lanes))

    @staticmethod
    def _due(phase: np.ndarray, interval: int, previous: float, t: float) -> np.ndarray:
        """Devices whose reporting instant (``phase`` into each interval) is in (previous, t]."""
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
        columns = pole_readings(
            self.pole_state, due, t, local_hour, share, rain, haze, self.rng, self.haze_no2,
            self.gas_rng,
        )  # fmt: skip
        hours = (t - self.start_s) / 3600
        columns["pm25_ugm3"] = self.faults.drifted(due, columns["pm25_ugm3"], hours)
        columns["pm25_ugm3"] = self.faults.stuck_values("pole", due, columns["pm25_ugm3"], t)
        self.outbox.emit_columns(tick, "pole", due, at, columns)

    def _manhole_messages(self, tick: Tick, previous: float, t: float) -> None:
        interval = self.scenario.intervals.manhole_s
        due = self._due(self.manhole_phase, interval, previous, t)
        if not len(due):
            return
        at = ((t - self.manhole_phase[due]) // interval) * interval + self.manhole_phase[due]
        columns = manhole_readings(self.manhole_state, due, t, self.rng)
        self.outbox.emit_columns(tick, "manhole", due, at, columns)
