"""Ingest benchmark: the same stream consumed three ways, figures from one run.

    python -m bench.ingest [--messages 200000]

1. Local mosquitto, InfluxDB 1.x and VictoriaMetrics start on free ports.
2. Each consumer's persistent session is registered (QoS 1), then the whole stream is published
   once, so every consumer finds the same backlog waiting: the figure is the consumer's own
   speed, not the publisher's.
3. Each consumer drains its backlog in turn, timed from process start to the last message:
   * ``mosquitto_sub -q 1`` to /dev/null: the ceiling (no decoding, no storage);
   * the naive script (paho + influxdb-client, one Point per message) into VictoriaMetrics'
     /api/v2/write (influxdb-client cannot write to InfluxDB 1.x before 1.8);
   * cityflux end to end into InfluxDB 1.x (/write), and into VictoriaMetrics (/api/v2/write).
   Peak RSS (VmHWM) of each consumer process is read from /proc.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.stream import mixed_stream, points_in
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.servers import LocalInfluxDB, LocalMosquitto, LocalVictoriaMetrics, free_port
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import BatchEncoder
from tests.support import config_env, count_points, publish_all


@dataclass
class Result:
    name: str
    seconds: float
    peak_rss_mb: float

    def rate(self, n: int) -> float:
        return n / self.seconds


def register_session(port: int, client_id: str) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.connect("127.0.0.1", port)
    client.loop_start()
    info = client.subscribe("cityflux/v1/#", qos=1)
    time.sleep(0.3)
    assert info[0] == 0
    client.disconnect()
    client.loop_stop()


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def timed(name: str, command: list[str], done: object, env: dict[str, str] | None = None) -> Result:
    """Run command until done() is true (or it exits); sample its peak RSS meanwhile."""
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss = 0.0
    try:
        while not done():  # type: ignore[operator]
            rss = max(rss, peak_rss_mb(process.pid))
            if process.poll() is not None and not done():  # type: ignore[operator]
                raise RuntimeError(f"{name} exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.02)
        seconds = time.monotonic() - start
        rss = max(rss, peak_rss_mb(process.pid))
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(30)
    return Result(name, seconds, rss)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--naive-messages",
        type=int,
        default=20_000,
        help="the naive consumer takes this prefix of its backlog (it runs at ~1.4k msg/s; its "
        "rate is per message, so a prefix measures it in seconds instead of minutes)",
    )
    parser.add_argument(
        "--no-gzip", action="store_true", help="cityflux sends uncompressed bodies (loopback)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a cityflux setting for the cityflux runs, e.g. --set ingest.batch_size=10000",
    )
    args = parser.parse_args()
    n = args.messages
    stream = mixed_stream(n)
    points = points_in(stream)
    results: list[Result] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cityflux-bench-")))
        broker = stack.enter_context(LocalMosquitto(tmp / "mosquitto", max_queued=10 * n))
        influx = stack.enter_context(LocalInfluxDB(tmp / "influxdb"))
        victoria = stack.enter_context(LocalVictoriaMetrics(tmp / "vm"))
        ids = ["bench-ceiling", "bench-naive", "bench-cityflux-v1", "bench-cityflux-v2"]
        for client_id in ids:
            register_session(broker.port, client_id)
        print(f"publishing {n:,} messages ({points:,} points) ...", flush=True)
        t0 = time.monotonic()
        publish_all(broker.port, stream)
        print(f"  published in {time.monotonic() - t0:.1f}s", flush=True)

        sub = [
            Path("/usr/bin/mosquitto_sub").as_posix(),
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-c",
            "-i",
            ids[0],
            "-t",
            "cityflux/v1/#",
            "-C",
            str(n),
        ]
        results.append(_run_to_exit("mosquitto_sub (ceiling)", sub))

        naive_n = min(n, args.naive_messages)
        naive = [sys.executable, "-m", "bench.naive_consumer", str(broker.port), victoria.url]
        naive_result = _run_to_exit(
            "naive paho + influxdb-client -> VM v2", [*naive, ids[1], str(naive_n)]
        )
        # reported as the time the whole stream takes at the rate it sustained on the prefix
        naive_result.seconds *= n / naive_n
        results.append(naive_result)

        for client_id, api, url in ((ids[2], "v1", influx.url), (ids[3], "v2", victoria.url)):
            metrics_port = free_port()
            config = Config().with_overrides(
                {
                    "mqtt.url": broker.url,
                    "mqtt.client_id": client_id,
                    "influx.url": url,
                    "influx.api": api,
                    "influx.token": "bench",
                    "influx.database": "bench",
                    "spool.dir": str(tmp / f"spool-{api}"),
                    "metrics.port": metrics_port,
                    "influx.gzip": not args.no_gzip,
                    **dict(item.split("=", 1) for item in args.set),
                }
            )
            target = "InfluxDB 1.x /write" if api == "v1" else "VM /api/v2/write"
            results.append(
                timed(
                    f"cityflux -> {target}",
                    [sys.executable, "-m", "cityflux", "run"],
                    lambda port=metrics_port: _accepted(port) >= n,
                    env=config_env(config),
                )
            )
            if api == "v1":
                stored = sum(
                    count_points(InfluxWriter(config.influx), m, f)
                    for m, f in (
                        ("pole", "pm25_ugm3"),
                        ("manhole", "battery_pct"),
                        ("traffic", "count"),
                    )
                )
                print(f"  InfluxDB holds {stored:,} of {points:,} points", flush=True)
                assert stored == points, "cityflux lost points"
        results.append(_database_alone(influx, stream))
    _report(results, n)


def _database_alone(influx: LocalInfluxDB, stream: list[tuple[str, bytes]]) -> Result:
    """InfluxDB 1.x's own ingest rate for this stream: cityflux's batches, pre-encoded, posted
    by two threads, no MQTT. No consumer that writes to this database can beat it."""
    config = Config().with_overrides({"influx.url": influx.url, "influx.database": "alone"})
    decoder, encoder = BatchDecoder(config.ingest, "cityflux/v1"), BatchEncoder()
    writer = InfluxWriter(config.influx)
    writer.ensure_database()
    bodies = []
    for start in range(0, len(stream), config.ingest.batch_size):
        chunk = stream[start : start + config.ingest.batch_size]
        now = time.time_ns()
        decoded = decoder.decode([t for t, _ in chunk], [p for _, p in chunk], now)
        lines = [
            line
            for columns in decoded.columns.values()
            for line in encoder.encode(validate(columns, config.ingest, now)[0])
        ]
        bodies.append(writer.encode_body(lines))
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda body: writer.send(body, writer.gzip), bodies))
    return Result("(InfluxDB 1.x alone: pre-encoded batches)", time.monotonic() - start, 0.0)


def _run_to_exit(name: str, command: list[str]) -> Result:
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    rss = 0.0
    while process.poll() is None:
        rss = max(rss, peak_rss_mb(process.pid))
        time.sleep(0.02)
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed with {process.returncode}")
    return Result(name, time.monotonic() - start, rss)


def _accepted(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cityflux_readings_accepted_total{")
    )


def _report(results: list[Result], n: int) -> None:
    ceiling, naive = results[0], results[1]
    print(
        f"\n{'consumer':42} {'seconds':>8} {'msg/s':>9} {'x ceiling':>9} {'x naive':>8} "
        f"{'peak RSS MB':>11}"
    )
    for result in results:
        print(
            f"{result.name:42} {result.seconds:8.2f} {result.rate(n):9,.0f} "
            f"{result.rate(n) / ceiling.rate(n):9.2f} {result.rate(n) / naive.rate(n):8.2f} "
            f"{result.peak_rss_mb:11.0f}"
        )
    print(
        f"\n{n:,} messages, {os.cpu_count()} CPUs; targets: cityflux >= 0.5x ceiling, >= 3x naive"
    )


if __name__ == "__main__":
    main()
