"""Simulator and replay benchmark: one process, a 100,000-device city, every message counted.

    python -m bench.simulate [--devices 100000] [--sim-seconds 300]

Each publisher below runs against a fresh local mosquitto (configured as in deploy/, sized for
backlogs) with one consumer, ``mosquitto_sub -q 1`` on ``#``, which counts every message it
receives (one byte each on an unbuffered pipe). Every publisher publishes at QoS 1 and waits
for every PUBACK; after it, the consumer's count must reach what was published, or the run
reports the loss and exits 1.

1. ``cityflux simulate`` in-process: the normal-weekday scenario on a generated city of
   ``--devices`` devices, as fast as possible. The rate counts from the first birth to the
   last PUBACK; city and model set-up are reported apart.
2. The same messages, written to a recording (the documented .cfxrec format), replayed with
   ``--speed max``.
3. ``mosquitto_pub -l -q 1`` (C, one topic) publishing the same payloads, fed in pieces of
   ``--pub-piece`` lines, one process each: one ``-l`` process for the whole recording is
   disconnected by the broker ("out of memory") after ~60,000 messages.
4. paho-mqtt as documented: ``publish(qos=1)`` per message on a default client (20 in
   flight), ``wait_for_publish()`` on each, the recording's topics and retain flags.
Each figure carries the load average at its end and the CPU-seconds of the publisher (this
process for 1, 2 and 4; the mosquitto_pub processes for 3). JSON: bench/results/simulate-*.json.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.figures import (
    BenchError,
    envelope,
    fmt_load,
    loadavg,
    per_100k,
    server_cpu,
    utc_stamp,
    write_json,
)
from cityflux.config import Config
from cityflux.servers import LocalMosquitto, require_binary
from cityflux.simulators.citygen import CitySpec, generate_city
from cityflux.simulators.recording import Header, RecordingWriter, ReplayPlan, read_recording
from cityflux.simulators.runner import run_replay, run_simulation
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from tests.support import mosquitto_pub


@dataclass
class Row:
    key: str
    name: str
    messages: int  # published and acknowledged
    seconds: float
    msg_per_s: float
    received: int  # counted by the consumer
    cpu_s: float  # the publisher's
    broker_cpu_s: float
    loadavg: list[float]
    note: str = ""

    @property
    def lost(self) -> int:
        return self.messages - self.received


class Sink:
    """``mosquitto_sub -q 1 -t '#'`` printing one byte per message, unbuffered, counted live."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._process = subprocess.Popen(
            [require_binary("stdbuf"), "-o0", require_binary("mosquitto_sub"), "-p", str(port),
             "-q", "1", "-t", "#", "-F", ".", "-N"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base = self._subscribed(port)

    def _read(self) -> None:
        assert self._process.stdout is not None
        while chunk := os.read(self._process.stdout.fileno(), 65_536):
            self.count += len(chunk)

    def _subscribed(self, port: int, timeout_s: float = 15.0) -> int:
        """Publish a marker until the consumer receives one: it has subscribed. What it
        counted by then (markers) is not the publisher's."""
        deadline = time.monotonic() + timeout_s
        while self.count == 0:
            if time.monotonic() > deadline:
                raise BenchError("the counting consumer did not subscribe")
            mosquitto_pub(port, "bench/ready", b"1")
            time.sleep(0.2)
        time.sleep(0.3)  # a late marker still on its way
        return self.count

    def received(self, expected: int, settle_s: float = 5.0, timeout_s: float = 300.0) -> int:
        """Messages counted since subscribing, once they reach ``expected`` or stop growing."""
        start = last_change = time.monotonic()
        last = -1
        while (got := self.count - self.base) < expected:
            now = time.monotonic()
            if got != last:
                last, last_change = got, now
            if now - last_change > settle_s or now - start > timeout_s:
                break
            time.sleep(0.1)
        return self.count - self.base

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(10)
        self._reader.join(5)


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
        for tick in [sim.births(), *sim.ticks()]:
            at_ns = round(tick.sim_s * 1e9)
            for topic, payload, retain in tick.messages:
                writer.write(at_ns, topic, payload, retain)
                text.write(payload.replace(b"\n", b" ") + b"\n")
                count += 1
    writer.close()
    return count


def split_lines(lines: Path, piece: int) -> list[Path]:
    pieces: list[Path] = []
    with lines.open("rb") as source:
        while chunk := [line for _, line in zip(range(piece), source, strict=False)]:
            pieces.append(lines.with_suffix(f".{len(pieces):04d}"))
            pieces[-1].write_bytes(b"".join(chunk))
    return pieces


def mosquitto_pub_pieces(port: int, pieces: list[Path]) -> tuple[float, float, list[int]]:
    """Seconds and CPU-seconds of publishing every piece, one mosquitto_pub -l each (each
    exits after its last PUBACK); the exit status of each that failed."""
    failed: list[int] = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    for piece in pieces:
        with piece.open("rb") as stdin:
            code = subprocess.run(
                [require_binary("mosquitto_pub"), "-p", str(port), "-q", "1", "-t",
                 "cityflux/v1/bench/pole/ceiling", "-l"],
                stdin=stdin, check=False, timeout=600,
            ).returncode  # fmt: skip
        if code:
            failed.append(code)
    seconds = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, failed


def paho_publish(port: int, recording: Path, chunk: int = 20_000) -> tuple[int, float, float]:
    """Messages, seconds and CPU-seconds of publishing the recording with paho's documented
    calls. The recording is read in chunks outside the clock (only publishing is timed)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.connect("127.0.0.1", port)
    client.loop_start()
    _, records = read_recording(recording)
    published, seconds, cpu = 0, 0.0, 0.0
    try:
        while batch := [record for _, record in zip(range(chunk), records, strict=False)]:
            began, cpu0 = time.monotonic(), time.process_time()
            infos = [
                client.publish(topic, payload, 1, retain) for _, topic, payload, retain in batch
            ]
            for info in infos:
                info.wait_for_publish(60)
                if not info.is_published():
                    raise BenchError(f"paho: message {info.mid} not acknowledged in 60 s")
            seconds += time.monotonic() - began
            cpu += time.process_time() - cpu0
            published += len(batch)
    finally:
        client.disconnect()
        client.loop_stop()
    return published, seconds, cpu


def phase(tmp: Path, key: str, name: str, publish: Callable[[int], dict[str, Any]]) -> Row:
    """``publish(port)`` against a fresh broker with a counting consumer."""
    with LocalMosquitto(tmp / f"mosquitto-{key}") as broker:
        sink = Sink(broker.port)
        try:
            values = publish(broker.port)
            received = sink.received(values["messages"])
        finally:
            sink.close()
        row = Row(key=key, name=name, received=received, broker_cpu_s=round(server_cpu(broker), 2),
                  loadavg=loadavg(), **values)  # fmt: skip
    lost = f"  LOST {row.lost:,} messages" if row.lost else ""
    print(
        f"  {name}: {row.msg_per_s:,.0f} msg/s, {row.received:,} of {row.messages:,} received, "
        f"load {fmt_load(row.loadavg)}{lost}",
        flush=True,
    )
    return row


def figures(messages: int, seconds: float, cpu: float, note: str = "") -> dict[str, Any]:
    return {
        "messages": messages,
        "seconds": round(seconds, 3),
        "msg_per_s": messages / seconds,
        "cpu_s": round(cpu, 2),
        "note": note,
    }


RATIOS = (
    ("simulate", "mosquitto_pub"),
    ("simulate", "paho"),
    ("readings", "mosquitto_pub"),
    ("replay", "mosquitto_pub"),
    ("replay", "paho"),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--sim-seconds", type=float, default=300.0)
    parser.add_argument(
        "--pub-piece",
        type=int,
        default=20_000,
        help="lines per mosquitto_pub -l process (the broker disconnects one that sends too "
        "many at once)",
    )
    args = parser.parse_args()
    stamp = utc_stamp()
    print(f"{os.cpu_count()} CPUs, load {fmt_load(loadavg())} at start", flush=True)
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cityflux-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        sim, setup_s = make_sim(args.devices, args.sim_seconds)

        def simulate(port: int) -> dict[str, Any]:
            mqtt = Config().with_overrides({"mqtt.url": f"mqtt://127.0.0.1:{port}"}).mqtt
            first: list[tuple[float, float, int]] = []  # after the births: the readings

            def note(sim_now: float, published: int) -> None:
                if not first:
                    first.append((time.monotonic(), time.process_time(), published))

            began, cpu0 = time.monotonic(), time.process_time()
            summary = run_simulation(sim, mqtt, math.inf, on_progress=note)
            ended, cpu1 = time.monotonic(), time.process_time()
            readings = summary.messages - first[0][2]
            extra["readings"] = figures(readings, ended - first[0][0], cpu1 - first[0][1])
            extra["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return figures(summary.messages, ended - began, cpu1 - cpu0)

        rows.append(phase(tmp, "simulate", "cityflux simulate --speed max", simulate))
        readings = extra.pop("readings")
        name = "  of which after the first tick (readings)"
        rows.append(Row("readings", name, received=readings["messages"], broker_cpu_s=0.0,
                        loadavg=rows[-1].loadavg, **readings))  # fmt: skip
        devices = len(sim.devices.ids)
        recording, lines = tmp / "run.cfxrec", tmp / "payloads.txt"
        again, _ = make_sim(args.devices, args.sim_seconds)
        count = write_recording(again, recording, lines)

        def replay(port: int) -> dict[str, Any]:
            mqtt = Config().with_overrides({"mqtt.url": f"mqtt://127.0.0.1:{port}"}).mqtt
            cpu0 = time.process_time()
            summary = run_replay(recording, ReplayPlan(speed=math.inf), mqtt)
            return figures(summary.messages, summary.wall_s, time.process_time() - cpu0)

        rows.append(phase(tmp, "replay", "cityflux replay --speed max", replay))
        pieces = split_lines(lines, args.pub_piece)

        def pub(port: int) -> dict[str, Any]:
            seconds, cpu, failed = mosquitto_pub_pieces(port, pieces)
            note = f"{len(pieces)} pieces of <= {args.pub_piece:,} lines"
            if failed:
                note += f"; {len(failed)} exited non-zero: {failed}"
            return figures(count, seconds, cpu, note)

        rows.append(phase(tmp, "mosquitto_pub", "mosquitto_pub -l -q 1 (C, in pieces)", pub))

        def paho_run(port: int) -> dict[str, Any]:
            return figures(*paho_publish(port, recording), note="default client, 20 in flight")

        rows.append(phase(tmp, "paho", "paho publish(qos=1) + wait_for_publish", paho_run))
        size_mb = recording.stat().st_size / 1e6
    report(rows, args, stamp, devices, setup_s, count, size_mb, extra["rss_mb"])


def report(
    rows: list[Row],
    args: argparse.Namespace,
    stamp: str,
    devices: int,
    setup_s: float,
    count: int,
    size_mb: float,
    rss_mb: float,
) -> None:
    rate = {row.key: row.msg_per_s for row in rows}
    print(
        f"\ncity: {devices:,} devices; set-up {setup_s:.1f} s; {args.sim_seconds:.0f} simulated s"
    )
    print(f"recording: {count:,} messages, {size_mb:.1f} MB; simulate peak RSS {rss_mb:.0f} MB")
    print(
        f"\n{'publisher':42} {'msgs':>9} {'seconds':>8} {'msg/s':>9} {'received':>9} {'CPU s':>6} "
        f"{'CPU/100k':>8} {'broker CPU':>10} {'load 1/5/15':>15}"
    )
    for row in rows:
        print(
            f"{row.name:42} {row.messages:9,} {row.seconds:8.2f} {row.msg_per_s:9,.0f} "
            f"{row.received:9,} {row.cpu_s:6.1f} {per_100k(row.cpu_s, row.messages):8.2f} "
            f"{row.broker_cpu_s:10.1f} {fmt_load(row.loadavg):>15}"
        )
    ratios = {f"{a}/{b}": rate[a] / rate[b] for a, b in RATIOS}
    print(f"\n{'ratio (msg/s over msg/s, same run)':42} {'value':>7}")
    for name, value in ratios.items():
        print(f"{name:42} {value:7.2f}")
    print("target (issue 3): simulate >= 10,000 msg/s for a 100,000-device city")
    path = write_json(
        "simulate",
        stamp,
        {
            **envelope("simulate", stamp),
            "devices": devices,
            "sim_seconds": args.sim_seconds,
            "setup_s": round(setup_s, 2),
            "messages": count,
            "recording_mb": round(size_mb, 1),
            "simulate_peak_rss_mb": round(rss_mb, 1),
            "rows": [
                {
                    **asdict(row),
                    "lost": row.lost,
                    "cpu_s_per_100k": round(per_100k(row.cpu_s, row.messages), 3),
                }
                for row in rows
            ],
            "ratios": {name: round(value, 3) for name, value in ratios.items()},
        },
    )
    print(f"\nJSON: {path}")
    lost = [row for row in rows if row.lost]
    for row in lost:
        print(f"LOST {row.lost:,} messages: {row.name}", file=sys.stderr)
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
