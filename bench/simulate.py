"""Simulator and replay benchmark: one process, a 100,000-device city, figures from one run.

    python -m bench.simulate [--devices 100000] [--sim-seconds 300]

1. A local mosquitto starts on a free port (configured as in deploy/, sized for backlogs).
   ``mosquitto_sub -q 1`` subscribes to everything, so every run below has the broker
   forwarding each message to a consumer, as in production.
2. ``cityflux simulate`` in-process: the normal-weekday scenario on a generated city of
   ``--devices`` devices, as fast as possible, QoS 1, every message acknowledged by the broker.
   The rate counts from the first birth to the last PUBACK; city and model set-up are reported
   apart.
3. The same messages are written to a recording (the documented .cfxrec format) and replayed
   with ``--speed max`` (QoS 1, acknowledged).
4. The ceiling: ``mosquitto_pub -l -q 1`` publishing the same payloads from a file.
Target (issue 3): the simulator sustains 10,000 msg/s for a 100,000-device city.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from cityflux.config import Config
from cityflux.servers import LocalMosquitto, require_binary
from cityflux.simulators.citygen import CitySpec, generate_city
from cityflux.simulators.recording import Header, RecordingWriter, ReplayPlan
from cityflux.simulators.runner import run_replay, run_simulation
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation


def make_sim(devices: int, sim_seconds: float) -> tuple[Simulation, float]:
    began = time.monotonic()
    scenario = load_scenario("normal-weekday", {"clock.duration_s": sim_seconds})
    city = generate_city(CitySpec.for_devices(devices, seed=scenario.city.seed))
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf), city=city)
    return sim, time.monotonic() - began


def write_recording(sim: Simulation, path: Path, lines: Path) -> int:
    """The simulation's messages as a recording (offsets = simulated time) and as a text file
    of payloads for mosquitto_pub -l."""
    writer = RecordingWriter(path, Header(source="bench", topic="cityflux/v1/#"))
    count = 0
    with lines.open("wb") as text:
        ticks = [sim.births(), *sim.ticks()]
        for tick in ticks:
            at_ns = round(tick.sim_s * 1e9)
            for topic, payload, retain in tick.messages:
                writer.write(at_ns, topic, payload, retain)
                text.write(payload.replace(b"\n", b" ") + b"\n")
                count += 1
    writer.close()
    return count


def mosquitto_pub_rate(port: int, lines: Path, count: int) -> float:
    began = time.monotonic()
    with lines.open("rb") as stdin:
        subprocess.run(
            [require_binary("mosquitto_pub"), "-p", str(port), "-q", "1", "-t",
             "cityflux/v1/bench/pole/ceiling", "-l"],
            stdin=stdin, check=True, timeout=1_800,
        )  # fmt: skip
    return count / (time.monotonic() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--sim-seconds", type=float, default=300.0)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="cityflux-bench-") as tmp,
        LocalMosquitto(Path(tmp) / "mosquitto") as broker,
    ):
        mqtt = Config().with_overrides({"mqtt.url": broker.url}).mqtt
        # a consumer, so the broker forwards every message as it would to cityflux
        sink = subprocess.Popen(
            [require_binary("mosquitto_sub"), "-p", str(broker.port), "-q", "1", "-t", "#"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        sim, setup_s = make_sim(args.devices, args.sim_seconds)
        devices = len(sim.devices.ids)
        first: list[tuple[float, int]] = []  # after the births: the steady readings phase

        def note(sim_now: float, published: int) -> None:
            if not first:
                first.append((time.monotonic(), published))

        summary = run_simulation(sim, mqtt, math.inf, on_progress=note)
        ended = time.monotonic()
        sim_rate = summary.rate
        steady = (summary.messages - first[0][1]) / (ended - first[0][0])
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        recording, lines = Path(tmp) / "run.cfxrec", Path(tmp) / "payloads.txt"
        again, _ = make_sim(args.devices, args.sim_seconds)
        count = write_recording(again, recording, lines)
        replay = run_replay(recording, ReplayPlan(speed=math.inf), mqtt)
        ceiling = mosquitto_pub_rate(broker.port, lines, count)
        size_mb = recording.stat().st_size / 1e6
        sink.terminate()
        sink.wait(10)
    print(f"city: {devices:,} devices; set-up {setup_s:.1f} s; {args.sim_seconds:.0f} simulated s")
    print(f"recording: {count:,} messages, {size_mb:.1f} MB")
    print(f"ceiling  mosquitto_pub -l -q 1        {ceiling:>9,.0f} msg/s")
    print(
        f"cityflux simulate --speed max         {sim_rate:>9,.0f} msg/s "
        f"({sim_rate / ceiling:.2f}x ceiling; target 10,000 msg/s) "
        f"{summary.messages:,} msgs in {summary.wall_s:.1f} s, peak RSS {rss_mb:.0f} MB"
    )
    print(f"  of which readings (after births)    {steady:>9,.0f} msg/s ({steady / ceiling:.2f}x)")
    print(
        f"cityflux replay --speed max           {replay.rate:>9,.0f} msg/s "
        f"({replay.rate / ceiling:.2f}x ceiling)"
    )


if __name__ == "__main__":
    main()
