"""Analytics benchmark, figures from one run:

    python -m bench.analytics [--devices 100000] [--minutes 20] [--rate 5000] [--probes 300]
                              [--runs 5] [--rate 10000 ...] [--skip-in-process]

1. In-process: the analytics engine on numpy column batches (traffic lane rows of a
   100,000-device city, decoded and validated beforehand, not timed): rows/s for the traffic
   indices (panes, stations, links, rollups, 5-minute sliding window, California, alerts).
   Target >= 1,000,000 readings/s. The engine hands out result tables and alert points; as
   the pipeline does, they are encoded here with the store's encoder (store.lineprotocol
   .TableEncoder), inside the timing: the first figure encodes only the alert points, the
   second every index point too (the same work as when the engine encoded them itself).
2. End to end: local mosquitto and InfluxDB, ``cityflux run`` as a child process with the
   analytics on the 100,000-device city; the simulator publishes the city at about ``--rate``
   msg/s while probes (manhole covers opening, one manhole each) are published every 100 ms;
   latency = from publishing a probe to receiving its alert on ``cityflux/v1/alerts/...``.
   Target p99 < 100 ms at 5,000 msg/s. Ingest runs with ``ingest.flush_interval_s = 0.02``
   (the latency setting: batches are taken every 20 ms instead of 200 ms).
3. Peak RSS (VmHWM) of that ``cityflux run`` process. Target < 300 MB.
Each end-to-end run starts fresh servers and a fresh ``cityflux run``; ``--runs`` repeats it
(issue 11: p99 < 100 ms in 5 of 5 runs), ``--rate`` may be given several times. Every figure
carries the load average; all go to bench/results/analytics-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.figures import envelope, fmt_load, loadavg, utc_stamp, write_json
from cityflux.analytics.engine import AnalyticsEngine
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.servers import LocalInfluxDB, LocalMosquitto
from cityflux.simulators.citygen import CitySpec, generate_city
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.lineprotocol import TableEncoder
from tests.support import ROOT, config_env, wait_for


def in_process(devices: int, minutes: int, tmp: Path) -> tuple[int, float, float]:
    """(traffic lane rows, seconds computing indices and alerts, seconds including the line
    protocol of every index point) for the engine alone."""
    scenario = load_scenario(
        "normal-weekday", {"clock.duration_s": minutes * 60.0, "publish.births": False}
    )
    city = generate_city(CitySpec.for_devices(devices, seed=scenario.city.seed))
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), math.inf), city=city)
    config = Config().with_overrides({
        "analytics.checkpoint_dir": str(tmp / "inproc"),
        "analytics.alerts_db": str(tmp / "inproc" / "alerts.sqlite"),
        "analytics.checkpoint_interval_s": 1e9, "ingest.max_past_s": 10**9,
    })  # fmt: skip
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    batches = []
    topics: list[str] = []
    payloads: list[bytes] = []
    for tick in [*sim.ticks(), None]:  # None: the end, cut the last batch
        for topic, payload, _ in tick.messages if tick else []:
            if "/traffic/" in topic:
                topics.append(topic)
                payloads.append(payload)
        if len(topics) >= 10_000 or (tick is None and topics):
            now = time.time_ns()
            columns = decoder.decode(topics, payloads, now).columns["traffic"]
            batches.append(validate(columns, config.ingest, now)[0])
            topics, payloads = [], []
    rows = sum(len(b) for b in batches)
    timings = []
    for encode in (False, True):
        engine = AnalyticsEngine(config.analytics, city=city, index_tables=encode)
        encoder = TableEncoder()  # series prefixes are built once per run, in the timing
        began = time.perf_counter()
        for batch in batches:
            encoder.encode(engine.process({"traffic": batch}).results)
        encoder.encode(engine.flush().results)
        timings.append(time.perf_counter() - began)
        engine.close()
    return rows, timings[0], timings[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def end_to_end(devices: int, rate: float, probes: int, tmp: Path) -> dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario("normal-weekday", {"publish.births": False})
    city = generate_city(CitySpec.for_devices(devices, seed=scenario.city.seed))
    city_map = tmp / "city.json"
    city_map.write_bytes(msgspec.json.encode(city))
    per_sim_second = len(city.poles) / 60 + len(city.manholes) / 300 + len(city.detectors) / 60
    speed = rate / per_sim_second
    with LocalMosquitto(tmp / "mosquitto") as broker, LocalInfluxDB(tmp / "influxdb") as influx:
        config = Config().with_overrides({
            "mqtt.url": broker.url, "mqtt.client_id": "cityflux-bench", "influx.url": influx.url,
            "spool.dir": str(tmp / "spool"), "metrics.port": 0,
            "ingest.flush_interval_s": 0.02, "analytics.city_map": str(city_map),
            "analytics.checkpoint_dir": str(tmp / "analytics"),
            "analytics.alerts_db": str(tmp / "analytics" / "alerts.sqlite"),
        })  # fmt: skip
        log = (tmp / "run.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "cityflux", "run"], env=config_env(config),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            return _measure(config, city, scenario, speed, probes, process)
        finally:
            process.terminate()
            process.wait(30)


def _measure(config, city, scenario, speed, probes, process) -> dict[str, float]:  # type: ignore[no-untyped-def]
    received: dict[str, float] = {}
    ready = threading.Event()
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    listener.on_connect = lambda c, *a: c.subscribe("cityflux/v1/alerts/+/manhole_cover_open/#", 1)
    listener.on_subscribe = lambda *a: ready.set()

    def on_alert(client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        alert = msgspec.json.decode(message.payload)
        if alert["state"] == "active":
            received.setdefault(alert["entity"], time.perf_counter())

    listener.on_message = on_alert
    listener.connect(config.mqtt.host, config.mqtt.port)
    listener.loop_start()
    assert ready.wait(10)
    wait_for(lambda: _connected(config), timeout=30, what="cityflux run connected")
    # the load comes from another process, as devices would: its bursts must not delay
    # this process's probes and timestamps
    scenario_file = Path(config.spool.dir).parent / "load.toml"
    scenario_file.write_text(
        (ROOT / "cityflux" / "simulators" / "scenarios" / "normal-weekday.toml")
        .read_text()
        .replace("[traffic]", "[publish]\nbirths = false\n\n[traffic]")
    )
    began = time.time()
    start_s = scenario.start_epoch_s(began, speed)
    loader = subprocess.Popen(
        [sys.executable, "-m", "cityflux", "simulate", str(scenario_file), "--devices",
         str(len(city.detectors) + len(city.poles) + len(city.manholes)), "--speed", f"{speed}",
         "--mqtt-url", config.mqtt.url, "--out-dir", str(scenario_file.parent / "out"),
         "--duration", f"{(8 + probes * 0.1 + 4) * speed:.0f}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip

    def sim_now_s() -> float:
        return start_s + (time.time() - began) * speed

    time.sleep(8)  # the load settles
    prober = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    prober.connect(config.mqtt.host, config.mqtt.port)
    prober.loop_start()
    sent: dict[str, float] = {}
    holes = city.manholes[:probes]
    for hole in holes:
        payload = msgspec.json.encode({
            "ts": round(sim_now_s() * 1000), "cover_open": True, "tilt_deg": 25.0,
            "water_level_cm": 10.0, "battery_pct": 80.0,
        })  # fmt: skip
        sent[hole.id] = time.perf_counter()
        prober.publish(f"cityflux/v1/{hole.district}/manhole/{hole.id}", payload, qos=1)
        time.sleep(0.1)
    _, errors = loader.communicate(timeout=120)  # the load ends by itself
    rate = _load_rate(errors.decode(errors="replace"))
    if loader.returncode != 0 or math.isnan(rate):
        raise RuntimeError(f"the load generator failed:\n{errors.decode(errors='replace')[-2000:]}")
    prober.loop_stop()
    listener.loop_stop()
    latencies = np.array([received[k] - sent[k] for k in sent if k in received]) * 1000
    return {
        "probes": len(sent),
        "answered": len(latencies),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(latencies.max()),
        "load_msg_s": rate,
        "rss_mb": peak_rss_mb(process.pid),
    }


def _load_rate(progress: str) -> float:
    """The simulator's rate, from its summary ("wall time  S s (R msg/s)")."""
    rates = re.findall(r"\(([\d,]+)\s+msg/s\)", progress)
    return float(rates[-1].replace(",", "")) if rates else float("nan")


def _connected(config: Config) -> bool:
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
    got = threading.Event()
    probe.on_message = lambda *a: got.set()
    probe.on_connect = lambda c, *a: c.subscribe("cityflux/v1/health/cityflux-bench/status", 1)
    probe.connect(config.mqtt.host, config.mqtt.port)
    probe.loop_start()
    ok = got.wait(2)
    probe.loop_stop()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="msg/s of the end-to-end load; repeat for several (default 5000)",
    )
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="end-to-end runs per rate")
    parser.add_argument("--skip-in-process", action="store_true")
    args = parser.parse_args()
    rates = args.rate or [5_000.0]
    stamp = utc_stamp()
    figures: dict[str, Any] = {**envelope("analytics", stamp), "devices": args.devices,
                               "end_to_end": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cityflux-bench-") as name:
        tmp = Path(name)
        if not args.skip_in_process:
            rows, compute, encoded = in_process(args.devices, args.minutes, tmp)
            print(
                f"in-process traffic indices: {rows:,} lane readings in {compute:.2f} s = "
                f"{rows / compute:,.0f} readings/s (target 1,000,000); with the line protocol "
                f"of every index point: {encoded:.2f} s = {rows / encoded:,.0f} readings/s "
                f"(load {fmt_load(loadavg())})"
            )
            figures["in_process"] = {"rows": rows, "compute_s": compute, "encoded_s": encoded,
                                     "loadavg": loadavg()}  # fmt: skip
        for rate in rates:
            for run in range(args.runs):
                result = end_to_end(args.devices, rate, args.probes, tmp / f"e2e-{rate}-{run}")
                result |= {"rate_target": rate, "loadavg": loadavg()}
                figures["end_to_end"].append(result)
                print(
                    f"end to end at {result['load_msg_s']:,.0f} msg/s (run {run + 1}): "
                    f"{result['answered']}/{result['probes']} probes answered; publish -> alert "
                    f"p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, p99 "
                    f"{result['p99_ms']:.1f} ms (target < 100), max {result['max_ms']:.1f} ms; "
                    f"peak RSS {result['rss_mb']:.0f} MB (target < 300); load "
                    f"{fmt_load(result['loadavg'])}",
                    flush=True,
                )
    print(f"JSON: {write_json('analytics', stamp, figures)}")
    os.sync()


if __name__ == "__main__":
    main()
