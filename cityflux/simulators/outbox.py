"""Readings to MQTT messages, as devices and their gateways deliver them: clock skew, several
readings per message, late, out-of-order and duplicate delivery, malformed payloads; and
:class:`Expected`, the exact count of what cityflux must store and reject, kept as the messages
are made."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from cityflux.model.citymap import CityMap
from cityflux.model.devices import DeviceNumbers, number_devices
from cityflux.simulators.faults import MALFORMED, FaultPlan, malformed_message
from cityflux.simulators.scenario import Scenario


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


@dataclass(frozen=True, slots=True)
class Devices(DeviceNumbers):
    """The city's devices, numbered (:mod:`cityflux.model.devices`), with their MQTT topics."""

    topic: list[str]

    @classmethod
    def of(cls, city: CityMap, root: str) -> Devices:
        numbers = number_devices(city)
        return cls(
            kind=numbers.kind,
            ids=numbers.ids,
            district=numbers.district,
            offset=numbers.offset,
            topic=numbers.topics(root),
        )

    def status_topic(self, number: int) -> str:
        return f"{self.topic[number]}/status"


class Outbox:
    """Turns each device's reading into the messages due in a tick, counting them."""

    def __init__(
        self,
        scenario: Scenario,
        devices: Devices,
        faults: FaultPlan,
        rng: np.random.Generator,
        expected: Expected,
    ) -> None:
        self.devices = devices
        self.faults = faults
        self.rng = rng  # the simulation's: the draws here interleave with the models'
        self.expected = expected
        self._per_message = scenario.publish.readings_per_message
        self._late_s = scenario.faults.late_s
        self._interval_s = scenario.intervals.traffic_s
        self._step_s = scenario.clock.step_s
        self._malformed_share = scenario.faults.malformed_share
        self._malformed = itertools.cycle(MALFORMED)
        self._held: list[tuple[float, str, bytes]] = []  # (release at, topic, payload)
        self._buffers: dict[int, list[bytes]] = {}  # readings_per_message > 1

    def emit_columns(
        self,
        tick: Tick,
        kind: str,
        index: np.ndarray,
        at: np.ndarray,
        columns: dict[str, np.ndarray],
    ) -> None:
        """One reading per row: device ``index[i]`` of ``kind`` measured the row at ``at[i]``."""
        names = list(columns)
        rows = zip(*(columns[name].tolist() for name in names), strict=True)
        offset = self.devices.offset[kind]
        for i, ts, values in zip(index.tolist(), at.tolist(), rows, strict=True):
            number = offset + i
            if number not in self.faults.offline:
                self.emit(tick, number, ts, dict(zip(names, values, strict=True)), points=1)

    def emit(
        self, tick: Tick, number: int, ts: float, reading: dict[str, Any], points: int
    ) -> None:
        """Device ``number``'s ``reading`` measured at ``ts``, stored as ``points`` points."""
        kind = self.devices.kind[number]
        reading["ts"] = round((ts + self.faults.skew_s(number)) * 1000)
        self.expected.points[kind] += points
        self.expected.readings[kind] += 1
        self.expected.readings_by_district[self.devices.district[number]] += 1
        body = msgspec.json.encode(reading)
        if self._per_message > 1:
            buffer = self._buffers.setdefault(number, [])
            buffer.append(body)
            if len(buffer) < self._per_message:
                return
            body = b"[" + b",".join(buffer) + b"]"
            buffer.clear()
        self._send(tick, number, body)

    def _send(self, tick: Tick, number: int, body: bytes) -> None:
        topic = self.devices.topic[number]
        fate = self.faults.fate(self.rng)
        if fate == "late":
            self._held.append((tick.sim_s + self._late_s, topic, body))
        elif fate == "out_of_order":  # overtaken by the next interval's reading
            self._held.append((tick.sim_s + self._interval_s + self._step_s, topic, body))
        else:
            tick.messages.append((topic, body, False))
            if fate == "duplicate":
                tick.messages.append((topic, body, False))
                self.expected.duplicates += 1
                self.expected.messages += 1
        self.expected.messages += 1
        if self.rng.random() < self._malformed_share:
            reason = next(self._malformed)
            kind, ts_ms = self.devices.kind[number], round(tick.sim_s * 1000)
            tick.messages.append(malformed_message(reason, topic, kind, ts_ms))
            self.expected.rejections[reason] += 1
            self.expected.messages += 1

    def flush(self, t: float) -> Tick:
        """The held messages due by ``t``; at ``t`` = inf also what gateways still buffer."""
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
