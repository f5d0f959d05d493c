"""Drive a :class:`Simulation` against a broker on a simulated clock."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cityflux.config import MqttConfig
from cityflux.mqtt.publisher import BulkPublisher, DeviceLinks, Message
from cityflux.simulators.recording import ReplayPlan, replay_batches
from cityflux.simulators.simulation import Simulation

SPREAD_CHUNKS = 20  # a paced step is published in up to this many slices
WILL_SETTLE_S = 0.1  # a dropped connection's will is out well within this on one host


class SimClock:
    """Maps simulated time to wall time: ``speed`` x real time, or ``inf`` for no waiting."""

    def __init__(self, start_s: float, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive (inf: as fast as possible)")
        self.start_s = start_s
        self.speed = speed
        self.wall_start = time.monotonic()

    def wall_for(self, sim_s: float) -> float:
        return self.wall_start + (sim_s - self.start_s) / self.speed

    def wait_until(self, sim_s: float, stop: threading.Event | None = None) -> None:
        if math.isinf(self.speed) or not math.isfinite(sim_s):
            return
        delay = self.wall_for(sim_s) - time.monotonic()
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)

    def spread(
        self,
        messages: list[Message],
        sim_s: float,
        step_s: float,
        publish: Callable[[list[Message]], None],
        stop: threading.Event,
    ) -> None:
        """Publish a step's messages spread over the step's wall time, as devices reporting
        at their own moments would, instead of one burst per step (bursts queue behind each
        other at the broker and the consumer). As fast as possible: one burst."""
        chunks = max(1, min(SPREAD_CHUNKS, len(messages) // 50))
        if math.isinf(self.speed) or chunks == 1:
            publish(messages)
            return
        size = -(-len(messages) // chunks)
        for k in range(chunks):
            self.wait_until(sim_s + step_s * k / chunks, stop)
            publish(messages[k * size : (k + 1) * size])


def parse_speed(text: str) -> float:
    """``max`` (as fast as possible) or a positive multiple of real time."""
    if text.strip().lower() in ("max", "inf"):
        return math.inf
    speed = float(text)
    if speed <= 0:
        raise ValueError("speed must be positive or 'max'")
    return speed


@dataclass(slots=True)
class RunSummary:
    messages: int  # published by the simulator or replayer (``births_on_links`` included)
    wall_s: float
    sim_s: float
    completed: bool
    births_on_links: int = 0  # retained births of devices on connections of their own
    wills: int = 0  # connections dropped: the broker publishes each one's will (offline)

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0


def run_simulation(
    sim: Simulation,
    mqtt: MqttConfig,
    speed: float,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[float, int], None] | None = None,
    max_inflight: int = 20_000,
) -> RunSummary:
    """Publish the whole scenario (or until ``stop``); returns when the broker acked it all."""
    stop = stop or threading.Event()
    prefix = f"cityflux-sim-{uuid.uuid4().hex[:8]}"
    publisher = BulkPublisher(mqtt, prefix, qos=sim.scenario.publish.qos, max_inflight=max_inflight)
    links = DeviceLinks(mqtt, prefix)
    clock = SimClock(sim.start_s, speed)
    began = time.monotonic()
    sim_now, completed, wills = sim.start_s, True, 0
    try:
        for number in sorted(sim.faults.own_connection):
            links.connect(number, sim.devices.status_topic(number), sim.birth_payload(sim.start_s))
        publisher.publish(sim.births().messages)
        for tick in sim.ticks():
            clock.wait_until(tick.sim_s, stop)
            sim_now = min(tick.sim_s, sim.end_s)
            if tick.disconnect:
                # Keep event order across connections: the broker must have every earlier
                # reading before a will fires, and the will before any later reading (at full
                # speed the simulator runs minutes ahead of what the broker has processed).
                publisher.flush()
                for number in tick.disconnect:
                    links.drop(number)
                wills += len(tick.disconnect)
                time.sleep(WILL_SETTLE_S)
            for number in tick.reconnect:
                links.connect(number, sim.devices.status_topic(number), sim.birth_payload(sim_now))
            clock.spread(tick.messages, sim_now, sim.step_s, publisher.publish, stop)
            if on_progress is not None:  # the same count as the summary's messages
                on_progress(sim_now, publisher.published + links.published)
            if stop.is_set():  # what was counted for this tick has been published
                completed = False
                publisher.publish(sim.finish(sim_now).messages)
                break
        publisher.flush()
    finally:
        links.close()
        publisher.close()
    return RunSummary(
        messages=publisher.published + links.published,
        wall_s=time.monotonic() - began,
        sim_s=sim_now - sim.start_s,
        completed=completed,
        births_on_links=links.published,
        wills=wills,
    )


def run_replay(
    path: Path,
    plan: ReplayPlan,
    mqtt: MqttConfig,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[float, int], None] | None = None,
) -> RunSummary:
    """Publish a recording with its inter-arrival times divided by ``plan.speed``."""
    stop = stop or threading.Event()
    publisher = BulkPublisher(mqtt, f"cityflux-replay-{uuid.uuid4().hex[:8]}")
    began = time.monotonic()
    at, completed = 0.0, True
    try:
        for at, batch in replay_batches(path, plan):
            if stop.is_set():
                completed = False
                break
            delay = began + at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            publisher.publish(batch)
            if on_progress is not None:
                on_progress(at, publisher.published)
        publisher.flush()
    finally:
        publisher.close()
    return RunSummary(publisher.published, time.monotonic() - began, at, completed)
