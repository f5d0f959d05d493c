"""Ingest benchmark: the same stream consumed six ways, every point counted, figures from one run.

    python -m bench.ingest [--messages 200000] [--set ingest.batch_size=5000 ...]

1. A local mosquitto and InfluxDB 1.x start on free ports; each consumer that writes to
   VictoriaMetrics gets a fresh instance of its own, and each InfluxDB consumer its own
   database, so every target starts empty and its count is unambiguous.
2. Each consumer's persistent session is registered (QoS 1), then the whole stream is published
   once, so every consumer finds the same backlog waiting: the figure is the consumer's own
   speed, not the publisher's.
3. Each consumer drains its backlog in turn, timed from its first message received to its last
   message written (cityflux: acknowledged after the database accepted it); the start-up of
   the Python consumers (imports, connecting) is left out for all of them alike and recorded
   in the JSON (mosquitto_sub: timed from process start, its start-up is milliseconds):
   * ``mosquitto_sub -q 1`` to /dev/null: the ceiling (no decoding, no storage);
   * naive, synchronous: paho callbacks + influxdb-client ``write_api(write_options=SYNCHRONOUS)``,
     one write per message, into VictoriaMetrics' /api/v2/write (influxdb-client cannot write
     to InfluxDB 1.x before 1.8); a prefix of the backlog (``--naive-sync-messages``);
   * naive, batching: the same with influxdb-client's default ``write_api()`` (WriteOptions
     defaults: batches of 1,000, flushed every second);
   * cityflux with the shipped defaults (cityflux/config.py; ``--set`` changes them and the
     header says so) into InfluxDB 1.x (/write) and into VictoriaMetrics (/api/v2/write);
   * InfluxDB 1.x alone: cityflux's batches pre-encoded, posted by two threads, no MQTT.
4. Every database is then counted (InfluxQL count(); VictoriaMetrics /api/v1/export after
   /internal/force_flush); a consumer whose points did not all land fails the run
   ("LOST n points", exit status 1) after the table is printed.
Each figure carries the load average at its end; CPU-seconds and peak RSS are the consumer
process's own. All figures go to bench/results/ingest-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.figures import (
    BenchError,
    envelope,
    fmt_load,
    loadavg,
    per_100k,
    run_child,
    server_cpu,
    utc_stamp,
    write_json,
)
from bench.stream import mixed_stream, points_in
from cityflux.config import Config
from cityflux.servers import (
    LocalInfluxDB,
    LocalMosquitto,
    LocalServer,
    LocalVictoriaMetrics,
    free_port,
    require_binary,
)
from cityflux.store.influx import InfluxWriter
from tests.support import config_env, count_points, publish_all

# a field every point of its measurement has: counting it counts the points
COUNTED = (("pole", "pm25_ugm3"), ("manhole", "battery_pct"), ("traffic", "count"))


@dataclass
class Figure:
    key: str
    name: str
    messages: int  # messages this consumer took
    seconds: float  # wall time of its run
    msg_per_s: float
    cpu_s: float
    peak_rss_mb: float | None
    loadavg: list[float]  # 1, 5, 15 min, at the end of the run
    points_expected: int
    points_stored: int
    broker_cpu_s: float = 0.0
    database_cpu_s: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.points_expected - self.points_stored

    @property
    def cpu_s_per_100k(self) -> float:
        return per_100k(self.cpu_s, self.messages)


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


def vm_count(vm: LocalVictoriaMetrics, expected: int, timeout_s: float = 60.0) -> int:
    """Points VictoriaMetrics holds (one sample per point in each counted series), read after
    /internal/force_flush until it reaches ``expected`` or stops changing for 5 s."""
    names = "|".join(f"{measurement}_{name}" for measurement, name in COUNTED)
    query = urllib.parse.urlencode({"match[]": f'{{__name__=~"{names}"}}'})
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while True:
        urllib.request.urlopen(f"{vm.url}/internal/force_flush", timeout=30).close()
        with urllib.request.urlopen(f"{vm.url}/api/v1/export?{query}", timeout=60) as response:
            count = sum(
                len(json.loads(line)["values"]) for line in response.read().splitlines() if line
            )
        if count != last:
            last, since = count, time.monotonic()
        if count >= expected or time.monotonic() - since > 5 or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def influx_count(influx: LocalInfluxDB, database: str) -> int:
    config = Config().with_overrides({"influx.url": influx.url, "influx.database": database})
    writer = InfluxWriter(config.influx)
    try:
        return sum(count_points(writer, m, f) for m, f in COUNTED)
    finally:
        writer.close()


class Bench:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.n = args.messages
        self.args = args
        self.overrides: dict[str, str] = dict(item.split("=", 1) for item in args.set)
        self.stream = mixed_stream(self.n)
        self.points = points_in(self.stream)
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cityflux-bench-")))
        self.stack = stack
        self.broker = stack.enter_context(
            LocalMosquitto(self.tmp / "mosquitto", max_queued=10 * self.n)
        )
        self.influx = stack.enter_context(LocalInfluxDB(self.tmp / "influxdb"))
        self.figures: list[Figure] = []

    def measured(
        self, key: str, name: str, database: LocalServer | None, run: Any, **kwargs: Any
    ) -> Figure:
        """Run ``run()`` (-> Figure fields) with the broker's and database's CPU around it."""
        broker0 = server_cpu(self.broker)
        db0 = server_cpu(database) if database else 0.0
        values = run()
        figure = Figure(key=key, name=name, loadavg=loadavg(), **values, **kwargs)
        figure.broker_cpu_s = round(server_cpu(self.broker) - broker0, 2)
        figure.database_cpu_s = round(server_cpu(database) - db0, 2) if database else 0.0
        self.figures.append(figure)
        lost = f"  LOST {figure.lost:,} points" if figure.lost else ""
        print(
            f"  {name}: {figure.msg_per_s:,.0f} msg/s, {figure.cpu_s:.1f} CPU-s, "
            f"load {fmt_load(figure.loadavg)}, {figure.points_stored:,} of "
            f"{figure.points_expected:,} points stored{lost}",
            flush=True,
        )
        return figure

    def ceiling(self) -> None:
        def run() -> dict[str, Any]:
            sub = [require_binary("mosquitto_sub"), "-p", str(self.broker.port), "-q", "1", "-c",
                   "-i", "bench-ceiling", "-t", "cityflux/v1/#", "-C", str(self.n)]  # fmt: skip
            child = run_child(sub, self.tmp / "ceiling.log", keep_stdout=False, timeout_s=600)
            # -C n exits only after n messages: all of them arrived
            return self._values(self.n, child.seconds, child.cpu_s, child.peak_rss_mb,
                                self.points, self.points)  # fmt: skip

        self.measured("ceiling", "mosquitto_sub -q 1 (ceiling)", None, run)

    def naive(self, mode: str, messages: int) -> None:
        messages = min(self.n, messages or self.n)

        def run() -> dict[str, Any]:
            command = [sys.executable, "-m", "bench.naive_consumer", str(self.broker.port),
                       vm.url, f"bench-naive-{mode}", str(messages), "--mode", mode]  # fmt: skip
            child = run_child(command, self.tmp / f"naive-{mode}.log", timeout_s=1_800)
            report = json.loads(child.stdout.strip().splitlines()[-1])
            if report["messages"] != messages:
                raise BenchError(f"naive {mode} took {report['messages']} of {messages}")
            expected = report["points"]
            if messages == self.n and expected != self.points:
                raise BenchError(f"naive {mode} made {expected} points, not {self.points}")
            stored = vm_count(vm, expected)
            rss = max(child.peak_rss_mb or 0.0, report["peak_rss_mb"])
            values = self._values(messages, child.seconds, report["steady_cpu_s"], rss,
                                  expected, stored)  # fmt: skip
            # its rate and CPU from its first message on: its start-up is left out (favours it)
            values["msg_per_s"] = messages / report["steady_s"]
            values["seconds"] = round(report["steady_s"], 3)
            values["extra"] = {"steady_s": report["steady_s"], "process_cpu_s": child.cpu_s}
            return values

        with LocalVictoriaMetrics(self.tmp / f"vm-naive-{mode}") as vm:
            label = "write_api(SYNCHRONOUS)" if mode == "sync" else "write_api() batching"
            note = "" if messages == self.n else f"first {messages:,} messages"
            self.measured(f"naive_{mode}", f"naive {label} -> VM", vm, run, note=note)

    def config(self, api: str, url: str, client_id: str) -> Config:
        return Config().with_overrides(
            {
                # where to connect and what to call things: not tuning
                "mqtt.url": self.broker.url,
                "mqtt.client_id": client_id,
                "influx.url": url,
                "influx.api": api,
                "influx.token": "bench",
                "influx.database": "bench",
                "influx.bucket": "bench",
                "spool.dir": str(self.tmp / f"spool-{api}"),
                "metrics.port": free_port(),
                **self.overrides,
            }
        )

    def cityflux(self, api: str) -> None:
        database: LocalServer
        if api == "v1":
            database = self.influx
        else:
            database = self.stack.enter_context(LocalVictoriaMetrics(self.tmp / "vm-cityflux"))
        config = self.config(api, database.url, f"bench-cityflux-{api}")

        def run() -> dict[str, Any]:
            port = config.metrics.port
            child = run_child(
                [sys.executable, "-m", "cityflux", "run"],
                self.tmp / f"cityflux-{api}.log",
                env=config_env(config),
                done=lambda: _metric(port, "cityflux_messages_acked_total") >= self.n,
                started=lambda: _metric(port, "cityflux_messages_received_total") > 0,
                timeout_s=900,
            )
            if isinstance(database, LocalVictoriaMetrics):
                stored = vm_count(database, self.points)
            else:
                stored = influx_count(self.influx, "bench")
            if child.steady_seconds is None or child.steady_cpu_s is None:
                raise BenchError("cityflux acknowledged everything before it was seen starting")
            values = self._values(self.n, child.seconds, child.steady_cpu_s, child.peak_rss_mb,
                                  self.points, stored)  # fmt: skip
            # measured as the naive consumers are: from its first message to its last write
            values["msg_per_s"] = self.n / child.steady_seconds
            values["seconds"] = round(child.steady_seconds, 3)
            values["extra"] = {"steady_s": child.steady_seconds, "process_cpu_s": child.cpu_s,
                               "startup_s": child.seconds - child.steady_seconds}  # fmt: skip
            return values

        target = "InfluxDB 1.x /write" if api == "v1" else "VM /api/v2/write"
        self.measured(f"cityflux_{api}", f"cityflux -> {target}", database, run)
        if isinstance(database, LocalVictoriaMetrics):
            database.stop()

    def database_alone(self) -> None:
        """InfluxDB 1.x's own ingest rate for this stream: cityflux's batches, pre-encoded,
        posted by two threads, no MQTT. No consumer that writes to this database beats it."""
        config = self.config("v1", self.influx.url, "unused").with_overrides(
            {"influx.database": "alone"}
        )
        writer = InfluxWriter(config.influx)
        writer.ensure_database()
        bodies = _encoded_bodies(config, self.stream)

        def run() -> dict[str, Any]:
            cpu0, start = time.process_time(), time.monotonic()
            with ThreadPoolExecutor(config.ingest.write_concurrency) as pool:
                list(pool.map(lambda body: writer.send(body, writer.gzip), bodies))
            seconds, cpu = time.monotonic() - start, time.process_time() - cpu0
            stored = influx_count(self.influx, "alone")
            return self._values(self.n, seconds, cpu, None, self.points, stored)

        self.measured("influxdb_alone", "InfluxDB 1.x alone (pre-encoded)", self.influx, run,
                      note="CPU: the posting threads")  # fmt: skip
        writer.close()

    @staticmethod
    def _values(
        messages: int, seconds: float, cpu: float, rss: float | None, expected: int, stored: int
    ) -> dict[str, Any]:
        return {
            "messages": messages,
            "seconds": round(seconds, 3),
            "msg_per_s": messages / seconds,
            "cpu_s": round(cpu, 2),
            "peak_rss_mb": None if rss is None else round(rss, 1),
            "points_expected": expected,
            "points_stored": stored,
        }


def _encoded_bodies(config: Config, stream: list[tuple[str, bytes]]) -> list[bytes]:
    """cityflux's own request bodies for the stream (its decoder, validation and encoder)."""
    from cityflux.ingest.decode import BatchDecoder
    from cityflux.ingest.validate import validate
    from cityflux.store.lineprotocol import BatchEncoder

    decoder, encoder = BatchDecoder(config.ingest, "cityflux/v1"), BatchEncoder()
    writer = InfluxWriter(config.influx)
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
    writer.close()
    return bodies


def _metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


RATIOS = (
    ("cityflux_v1", "ceiling"),
    ("cityflux_v1", "influxdb_alone"),
    ("cityflux_v1", "naive_batching"),
    ("cityflux_v1", "naive_sync"),
    ("cityflux_v2", "ceiling"),
    ("cityflux_v2", "naive_batching"),
    ("cityflux_v2", "naive_sync"),
)
TARGETS = {
    "cityflux_v1/ceiling": 0.5,
    "cityflux_v1/influxdb_alone": 0.6,
    "cityflux_v1/naive_batching": 5.0,
    "cityflux_v2/ceiling": 0.7,
}


def ratios(figures: list[Figure]) -> dict[str, float]:
    rate = {figure.key: figure.msg_per_s for figure in figures}
    return {f"{a}/{b}": rate[a] / rate[b] for a, b in RATIOS if a in rate and b in rate}


def report(bench: Bench, header: str, stamp: str) -> Path:
    figures = bench.figures
    ceiling = next((f for f in figures if f.key == "ceiling"), None)
    print(
        f"\n{'consumer':40} {'msgs':>8} {'seconds':>8} {'msg/s':>9} {'x ceil':>6} {'CPU s':>6} "
        f"{'CPU/100k':>8} {'RSS MB':>6} {'db CPU':>6} {'load 1/5/15':>15}"
    )
    for f in figures:
        x = f"{f.msg_per_s / ceiling.msg_per_s:6.2f}" if ceiling else "     -"
        rss = "-" if f.peak_rss_mb is None else f"{f.peak_rss_mb:.0f}"
        mark = "*" if f.key.startswith(("naive", "cityflux")) else ""
        print(
            f"{f.name + mark:40} {f.messages:8,} {f.seconds:8.2f} {f.msg_per_s:9,.0f} {x} "
            f"{f.cpu_s:6.1f} {f.cpu_s_per_100k:8.2f} {rss:>6} {f.database_cpu_s:6.1f} "
            f"{fmt_load(f.loadavg):>15}"
        )
    print(
        "* naive and cityflux alike: rate and CPU from the first message received to the last "
        "write (start-up left out; cityflux's start-up is in the JSON, startup_s and "
        "process_cpu_s)"
    )
    table = ratios(figures)
    print(f"\n{'ratio (msg/s over msg/s, same run)':40} {'value':>7} {'target':>7}")
    for name, value in table.items():
        target = TARGETS.get(name)
        print(f"{name:40} {value:7.2f} {'>= ' + str(target) if target else '':>7}")
    path = write_json(
        "ingest",
        stamp,
        {
            **envelope("ingest", stamp),
            "header": header,
            "messages": bench.n,
            "points": bench.points,
            "settings": {
                "shipped_defaults": not bench.overrides,
                "overrides": bench.overrides,
                "cityflux": msgspec.to_builtins(Config().with_overrides(bench.overrides)),
            },
            "rows": [
                {**asdict(f), "lost": f.lost, "cpu_s_per_100k": round(f.cpu_s_per_100k, 3)}
                for f in figures
            ],
            "ratios": {name: round(value, 3) for name, value in table.items()},
            "targets": TARGETS,
        },
    )
    print(f"\nJSON: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--naive-sync-messages",
        type=int,
        default=20_000,
        help="the synchronous naive consumer takes this prefix of its backlog (one HTTP request "
        "per message: ~1.4k msg/s, so a prefix measures it in seconds instead of minutes)",
    )
    parser.add_argument(
        "--naive-batching-messages",
        type=int,
        default=0,
        help="the batching naive consumer takes this prefix (default: the whole stream)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a cityflux setting for the cityflux runs (and the pre-encoded batches), "
        "e.g. --set influx.gzip=true; without it the shipped defaults run",
    )
    args = parser.parse_args()
    stamp = utc_stamp()
    with ExitStack() as stack:
        bench = Bench(args, stack)
        effective = Config().with_overrides(bench.overrides)
        header = (
            "cityflux settings: "
            + (
                "shipped defaults"
                if not bench.overrides
                else f"shipped defaults + --set {args.set}"
            )
            + f" (batch_size {effective.ingest.batch_size}, write_concurrency "
            f"{effective.ingest.write_concurrency}, gzip {effective.influx.gzip}, analytics "
            f"{effective.analytics.enabled}, MQTT {effective.mqtt.protocol})"
        )
        print(header)
        print(f"{os.cpu_count()} CPUs, load {fmt_load(loadavg())} at start", flush=True)
        for client_id in ("bench-ceiling", "bench-naive-sync", "bench-naive-batching",
                          "bench-cityflux-v1", "bench-cityflux-v2"):  # fmt: skip
            register_session(bench.broker.port, client_id)
        print(f"publishing {bench.n:,} messages ({bench.points:,} points) ...", flush=True)
        t0 = time.monotonic()
        publish_all(bench.broker.port, bench.stream)
        print(f"  published in {time.monotonic() - t0:.1f}s", flush=True)
        bench.ceiling()
        bench.naive("sync", args.naive_sync_messages)
        bench.naive("batching", args.naive_batching_messages)
        bench.cityflux("v1")
        bench.cityflux("v2")
        bench.database_alone()
    report(bench, header, stamp)
    lost = [f for f in bench.figures if f.lost]
    for f in lost:
        print(f"LOST {f.lost:,} points: {f.name}", file=sys.stderr)
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
