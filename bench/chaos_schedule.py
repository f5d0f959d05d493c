"""The chaos run's schedule: what breaks when, drawn from a seed (so ``--seed N`` repeats a
run's schedule), and :class:`System`, the servers and injectors the events act on.

In a run of M minutes, each kind of event at a random moment in each of equal slices of the
run: 1.5 M SIGKILLs of ``cityflux run`` (at least 2), each restarted 2-6 s later; an InfluxDB
outage of 60 s every 5 minutes (at least 1; frozen, then stopped, alternately); a mosquitto
restart every 3 minutes (at least 1); hostile payloads and malformed packets every 2 minutes
(at least 2 each).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.chaos_city import HostileInjector, MalformedInjector
from bench.chaos_watch import BrokerSys, ChaosInfluxDB, ChaosMosquitto, CityfluxProcess, log

INFLUX_OUTAGE_S = 60.0


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    name: str
    action: Callable[[], str]


@dataclass
class System:
    broker: ChaosMosquitto
    influx: ChaosInfluxDB
    cityflux: CityfluxProcess
    sys: BrokerSys
    hostile: HostileInjector
    malformed: MalformedInjector
    per_kind: int
    influx_paused: bool = False
    done: list[str] = field(default_factory=list)  # chaos events as they happened

    def restart_broker(self) -> str:
        t = time.monotonic()
        self.broker.stop()
        self.sys.restarted()
        self.broker.start()
        return f"back after {time.monotonic() - t:.1f}s"

    def pause_influx(self) -> str:
        self.influx.pause()
        self.influx_paused = True
        return "SIGSTOP"

    def resume_influx(self) -> str:
        self.influx.resume()
        self.influx_paused = False
        return "SIGCONT"

    def stop_influx(self) -> str:
        self.influx.stop()
        return "SIGTERM"

    def restart_influx(self) -> str:
        self.influx.start(timeout=60)
        return "started on the same data directory"


def _slots(rng: random.Random, n: int, low: float, high: float) -> list[float]:
    """n moments, one at random in each of n equal slices of [low, high]."""
    width = max(high - low, 1.0) / n
    return [rng.uniform(low + (k + 0.1) * width, low + (k + 0.9) * width) for k in range(n)]


def schedule(system: System, rng: random.Random, duration: float) -> list[Event]:
    minutes = duration / 60
    events: list[Event] = []
    for at in _slots(rng, max(2, round(minutes * 1.5)), 0.1 * duration, 0.8 * duration):
        down = rng.uniform(2, 6)
        events.append(Event(at, "kill cityflux (SIGKILL)", system.cityflux.kill))
        events.append(
            Event(at + down, f"restart cityflux ({down:.1f}s after)", system.cityflux.restart)
        )
    last_start = max(0.1 * duration, 0.9 * duration - INFLUX_OUTAGE_S)
    for i, at in enumerate(_slots(rng, max(1, int(minutes // 5)), 0.1 * duration, last_start)):
        if i % 2 == 0:
            events.append(Event(at, "freeze InfluxDB", system.pause_influx))
            events.append(Event(at + INFLUX_OUTAGE_S, "thaw InfluxDB", system.resume_influx))
        else:
            events.append(Event(at, "stop InfluxDB", system.stop_influx))
            events.append(Event(at + INFLUX_OUTAGE_S, "start InfluxDB", system.restart_influx))
    for at in _slots(rng, max(1, int(minutes // 3)), 0.2 * duration, 0.85 * duration):
        events.append(Event(at, "restart mosquitto (SIGTERM, start)", system.restart_broker))
    for at in _slots(rng, max(2, int(minutes // 2)), 0.05 * duration, 0.85 * duration):
        events.append(
            Event(
                at,
                f"hostile payloads ({system.per_kind} of each)",
                lambda: system.hostile.inject(system.per_kind),
            )
        )
    for at in _slots(rng, max(2, int(minutes // 2)), 0.05 * duration, 0.9 * duration):
        events.append(Event(at, "malformed packets", system.malformed.inject))
    return sorted(events, key=lambda e: e.at)


def run_schedule(
    events: list[Event], start: float, stop: threading.Event, done: list[str]
) -> list[threading.Thread]:
    """Fire each event at its time on its own thread; ``done`` collects what happened."""
    threads = []
    for event in events:
        if stop.wait(max(0.0, start + event.at - time.monotonic())):
            break

        def fire(event: Event = event) -> None:
            kind = event.name.split(" (")[0]
            try:
                log(f"{event.name}: {event.action()}")
                done.append(kind)
            except Exception as exc:  # a failed chaos action is a finding, not the end
                log(f"{event.name}: FAILED {type(exc).__name__}: {exc}")
                done.append(f"{kind} FAILED")

        thread = threading.Thread(target=fire, name=event.name, daemon=True)
        thread.start()
        threads.append(thread)
    return threads
