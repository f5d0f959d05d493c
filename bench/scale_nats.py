"""Workers on NATS JetStream: 1, 2 and 4 ``cityflux run`` workers on one partitioned stream,
and one worker on the JetStream source against one on the MQTT source, figures from one run.

    python -m bench.scale_nats [--messages 100000] [--workers 1,2,4] [--partitions 16]

1. One nats-server (JetStream, MQTT listener), one InfluxDB 1.x, one mosquitto. The backlog
   (bench.stream.mixed_stream: N messages, 12 districts) is published over MQTT 3.1.1 QoS 1 to
   nats-server's MQTT port and the bench waits until the readings stream holds all N (publish
   and sourcing into the stream are timed apart, before any worker runs). The same N messages
   go to a persistent session on mosquitto for the MQTT worker.
2. For each worker count W: a fresh consumer group (``nats.group`` = ``w{W}``, its own
   members/alerts/checkpoints buckets; ``cityflux nats init``), its P partition consumers
   paused (JetStream consumer pause, nats-server 2.11+), a fresh database; W ``cityflux run``
   processes (source.kind = nats, each its own client id, spool, metrics port). Once the
   members bucket shows the W workers holding the P partitions between them (each once), the
   consumers are resumed: so the drain is timed with every worker in place, not while the
   first one started alone takes everything and hands partitions over.
3. One worker on the MQTT source (mosquitto, its persistent session's backlog), as
   bench.ingest runs cityflux.
Each run is timed from its first message received (sum of cityflux_messages_received_total
over its workers > 0) to all N acknowledged (a message is acknowledged only after its points
are in InfluxDB or the spool); the time of the first acknowledgement is recorded too. Then
every point in the database is counted (bench.ingest.influx_count). Each worker's CPU
(/proc/<pid>/stat) from the run's first message on, its messages, its peak RSS; nats-server's,
influxd's and mosquitto's CPU over the same span; the load average at start and end (other
engineers share this 2-core machine: the load says how busy it was). Analytics ON (the shipped
default: examples/city-map.json; the mixed stream's devices are not on that map, so the
engines keep device state and run the rules but compute no traffic indices). All figures go
to bench/results/scale_nats-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError

from bench.figures import (
    BenchError,
    cpu_seconds,
    fmt_load,
    loadavg,
    peak_rss_mb,
    per_100k,
    server_cpu,
    utc_stamp,
)
from bench.ingest import _metric, influx_count, register_session
from bench.scale_nats_report import report, row
from bench.stream import mixed_stream, points_in
from cityflux.config import Config
from cityflux.nats.admin import init, partition_consumer_name
from cityflux.nats.connect import connect, js_request
from cityflux.nats.partition import partition_of
from cityflux.servers import LocalInfluxDB, LocalMosquitto, LocalServer, free_port
from cityflux.servers_nats import LocalNats
from tests.support import config_env, publish_all

ROOT = Path(__file__).resolve().parent.parent
RECEIVED, ACKED = "cityflux_messages_received_total", "cityflux_messages_acked_total"
PAUSED_UNTIL = "2099-01-01T00:00:00Z"


@dataclass
class Worker:
    name: str
    pid: int
    metrics_port: int
    messages: int = 0
    cpu_s: float = 0.0  # whole process, start-up included
    steady_cpu_s: float = 0.0  # from the run's first message on
    peak_rss_mb: float = 0.0
    partitions: list[int] = field(default_factory=list)
    partitions_messages: int = 0  # the backlog's messages in those partitions

    @property
    def steady_cpu_per_100k(self) -> float:
        return per_100k(self.steady_cpu_s, self.messages)


@dataclass
class Run:
    source: str  # nats | mqtt
    workers: int
    messages: int
    seconds: float  # first message received -> all acknowledged
    msg_per_s: float
    first_ack_s: float  # first message received -> first acknowledgement
    from_resume_s: float  # consumers resumed (nats) / process start (mqtt) -> all acknowledged
    ready_s: float  # processes started -> every worker holding its partitions (nats)
    worker_cpu_s: float  # all workers, steady state
    broker_cpu_s: float  # nats-server or mosquitto
    influxd_cpu_s: float
    peak_rss_mb: float  # the largest worker's
    points_expected: int
    points_stored: int
    loadavg_start: list[float]
    loadavg_end: list[float]
    per_worker: list[Worker]

    def per_100k(self, cpu_s: float) -> float:
        return per_100k(cpu_s, self.messages)

    @property
    def total_cpu_s(self) -> float:
        return self.worker_cpu_s + self.broker_cpu_s + self.influxd_cpu_s

    @property
    def cores_busy(self) -> float:
        """CPU-seconds of workers, broker and database per wall second of the drain."""
        return self.total_cpu_s / self.seconds

    @property
    def cpu_bound_msg_per_s(self) -> float:
        """The rate at which this run's CPU per message would fill both cores."""
        cores = os.cpu_count() or 1
        return cores * self.messages / self.total_cpu_s if self.total_cpu_s else 0.0


# -- NATS: the stream, the groups, pausing --------------------------------------------------
def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _stream_state(config: Config) -> tuple[int, int]:
    """(messages, bytes) the readings stream holds."""
    nc = await connect(config.nats, "bench-scale-nats")
    try:
        info = await js_request(nc, f"$JS.API.STREAM.INFO.{config.nats.stream}")
        return int(info["state"]["messages"]), int(info["state"]["bytes"])
    finally:
        await nc.close()


async def _pause(config: Config, paused: bool) -> None:
    """Pause (or resume) every partition consumer of the config's group."""
    nats = config.nats
    body = {"pause_until": PAUSED_UNTIL} if paused else {}
    nc = await connect(nats, "bench-scale-nats")
    try:
        for p in range(nats.partitions):
            name = partition_consumer_name(nats.group, p)
            answer = await js_request(nc, f"$JS.API.CONSUMER.PAUSE.{nats.stream}.{name}", body)
            if bool(answer.get("paused")) != paused:
                raise BenchError(f"consumer {name}: paused={answer.get('paused')}, not {paused}")
    finally:
        await nc.close()


async def _holdings(config: Config) -> dict[str, list[int]]:
    """The partitions each live worker says it holds (the members bucket). Keys from the
    bucket stream's subjects, not nats-py's ``kv.keys()`` (an ordered consumer per call that
    outlives it on the server)."""
    bucket = config.nats.members_bucket
    nc = await connect(config.nats, "bench-scale-nats")
    try:
        kv = await nc.jetstream().key_value(bucket)
        info = await js_request(nc, f"$JS.API.STREAM.INFO.KV_{bucket}", {"subjects_filter": ">"})
        out = {}
        for subject in (info.get("state") or {}).get("subjects") or {}:
            key = subject.removeprefix(f"$KV.{bucket}.")
            try:
                entry = await kv.get(key)
            except NotFoundError:  # a worker that left
                continue
            out[key] = list(json.loads(entry.value or b"{}").get("partitions", []))
        return out
    finally:
        await nc.close()


async def _waiting(config: Config) -> list[int]:
    """Pull requests waiting on each partition consumer of the config's group."""
    nats = config.nats
    nc = await connect(nats, "bench-scale-nats")
    try:
        out = []
        for p in range(nats.partitions):
            name = partition_consumer_name(nats.group, p)
            info = await js_request(nc, f"$JS.API.CONSUMER.INFO.{nats.stream}.{name}")
            out.append(int(info.get("num_waiting", 0)))
        return out
    finally:
        await nc.close()


def _balanced(holdings: dict[str, list[int]], names: list[str], partitions: int) -> bool:
    held = sorted(p for name in names for p in holdings.get(name, []))
    return sorted(holdings) == sorted(names) and held == list(range(partitions))


# -- the workers ------------------------------------------------------------------------------
class Workers:
    """W ``cityflux run`` processes, their /metrics and /proc, until all N are acknowledged."""

    def __init__(self, configs: list[Config], logs: Path) -> None:
        self.configs, self.processes, self.workers = configs, [], []
        logs.mkdir(parents=True, exist_ok=True)
        for config in configs:
            env = config_env(config)
            # tests.support.config_env writes a tuple as its repr: the URLs as cityflux reads them
            env["CITYFLUX_NATS__URLS"] = ",".join(config.nats.urls)
            log = logs / f"{config.mqtt.client_id}.log"
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "cityflux", "run"],
                    env=env,
                    cwd=ROOT,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            self.processes.append((process, log))
            self.workers.append(Worker(config.mqtt.client_id, process.pid, config.metrics.port))

    def check_alive(self) -> None:
        for process, log in self.processes:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise BenchError(f"a worker exited with {process.returncode}:\n{tail}")

    def sum_metric(self, name: str) -> float:
        return sum(_metric(w.metrics_port, name) for w in self.workers)

    def sample_rss(self) -> None:
        for w in self.workers:
            w.peak_rss_mb = max(w.peak_rss_mb, peak_rss_mb(w.pid))

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@dataclass
class Drain:
    seconds: float
    from_start_s: float
    first_ack_s: float
    worker_cpu0: dict[str, float]
    servers_cpu: dict[str, float]


def drain(workers: Workers, n: int, servers: dict[str, LocalServer], timeout_s: float) -> Drain:
    """Poll every 50 ms: the first message received, the first ack, all n acknowledged."""
    start = time.monotonic()
    deadline = start + timeout_s
    began: float | None = None
    first_ack: float | None = None
    cpu0: dict[str, float] = {}
    server0: dict[str, float] = {}
    while time.monotonic() < deadline:
        workers.check_alive()
        workers.sample_rss()
        now = time.monotonic()
        if began is None and workers.sum_metric(RECEIVED) > 0:
            began = now
            cpu0 = {w.name: cpu_seconds(w.pid) for w in workers.workers}
            server0 = {name: server_cpu(s) for name, s in servers.items()}
        acked = workers.sum_metric(ACKED) if began is not None else 0.0
        if acked > 0 and first_ack is None and began is not None:
            first_ack = now - began
        if acked >= n and began is not None:
            end = time.monotonic()
            for w in workers.workers:
                w.messages = int(_metric(w.metrics_port, ACKED))
                w.cpu_s = round(cpu_seconds(w.pid), 2)
                w.steady_cpu_s = round(w.cpu_s - cpu0[w.name], 2)
            spent = {name: round(server_cpu(s) - server0[name], 2) for name, s in servers.items()}
            return Drain(end - began, end - start, first_ack or 0.0, cpu0, spent)
        time.sleep(0.05)
    raise BenchError(f"not all {n:,} messages acknowledged within {timeout_s:.0f} s")


# -- the bench --------------------------------------------------------------------------------
class ScaleNats:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args, self.n, self.partitions = args, args.messages, args.partitions
        self.stream = mixed_stream(self.n)
        self.points = points_in(self.stream)
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cityflux-sn-")))
        self.nats = stack.enter_context(LocalNats(self.tmp / "nats"))
        self.influx = stack.enter_context(LocalInfluxDB(self.tmp / "influxdb"))
        self.mosquitto = stack.enter_context(
            LocalMosquitto(self.tmp / "mosquitto", max_queued=10 * self.n)
        )
        self.logs = Path(args.logs) if args.logs else self.tmp / "logs"
        self.runs: list[Run] = []
        self.publish: dict[str, float] = {}

    def config(self, name: str, database: str, **extra: Any) -> Config:
        return Config().with_overrides(
            {
                "source.kind": "nats",
                "nats.urls": [self.nats.url],
                "nats.partitions": self.partitions,
                "mqtt.url": self.mosquitto.url,
                "mqtt.client_id": name,
                "influx.url": self.influx.url,
                "influx.database": database,
                "spool.dir": str(self.tmp / name / "spool"),
                "analytics.checkpoint_dir": str(self.tmp / name / "analytics"),
                "analytics.alerts_db": str(self.tmp / name / "analytics" / "alerts.sqlite"),
                "metrics.port": free_port(),
                **extra,
            }
        )

    def group_config(self, group: str, worker: str) -> Config:
        return self.config(
            f"{group}-{worker}",
            f"bench_nats_{group}",
            **{
                "nats.group": group,
                "nats.members_bucket": f"{group}_workers",
                "nats.alerts_bucket": f"{group}_alerts",
                "nats.checkpoints_bucket": f"{group}_checkpoints",
            },
        )

    def fill(self) -> None:
        """The backlog into the stream (over MQTT to nats-server) and into mosquitto."""
        first = self.group_config("fill", "init")
        _run(init(first))  # the stream (and its sources) before the first publish
        assert self.nats.mqtt_port is not None
        t0 = time.monotonic()
        publish_all(self.nats.mqtt_port, self.stream)
        self.publish["nats_mqtt_publish_s"] = round(time.monotonic() - t0, 2)
        while (stored := _run(_stream_state(first)))[0] < self.n:
            if time.monotonic() - t0 > 300:
                raise BenchError(f"the stream holds {stored[0]:,} of {self.n:,} after 300 s")
            time.sleep(0.1)
        if stored[0] != self.n:
            raise BenchError(f"the stream holds {stored[0]:,} messages, not {self.n:,}")
        self.publish["nats_in_stream_s"] = round(time.monotonic() - t0, 2)
        # its CPU so far: start, init, the MQTT publishes into $MQTT_msgs and the sourcing
        self.publish["nats_server_cpu_s_after_fill"] = round(server_cpu(self.nats), 2)
        self.publish["stream_bytes"] = stored[1]
        self.publish["stream_bytes_per_message"] = round(stored[1] / self.n, 1)
        self.publish["payload_bytes_per_message"] = round(
            sum(len(p) for _, p in self.stream) / self.n, 1
        )
        register_session(self.mosquitto.port, "bench-sn-mqtt")
        t0 = time.monotonic()
        publish_all(self.mosquitto.port, self.stream)
        self.publish["mosquitto_publish_s"] = round(time.monotonic() - t0, 2)
        self.publish["mosquitto_cpu_s_after_fill"] = round(server_cpu(self.mosquitto), 2)
        print(
            f"backlog: {self.n:,} messages ({self.points:,} points); nats-server: PUBACKed in "
            f"{self.publish['nats_mqtt_publish_s']} s, all in stream {first.nats.stream} after "
            f"{self.publish['nats_in_stream_s']} s; mosquitto: "
            f"{self.publish['mosquitto_publish_s']} s; load {fmt_load(loadavg())}",
            flush=True,
        )

    def run_nats(self, count: int) -> None:
        group = f"w{count}"
        configs = [self.group_config(group, f"{i}") for i in range(count)]
        _run(init(configs[0]))
        _run(_pause(configs[0], True))
        load0 = loadavg()
        t0 = time.monotonic()
        workers = Workers(configs, self.logs)
        try:
            holdings = self.wait_settled(configs, workers, t0)
            ready_s = time.monotonic() - t0
            _run(_pause(configs[0], False))
            result = drain(workers, self.n, {"broker": self.nats, "influxd": self.influx}, 600)
        finally:
            workers.stop()
        per_partition = Counter(
            partition_of(topic.split("/")[2], self.partitions) for topic, _ in self.stream
        )
        for w in workers.workers:
            w.partitions = sorted(holdings.get(w.name, []))
            w.partitions_messages = sum(per_partition[p] for p in w.partitions)
            if w.partitions_messages != w.messages:  # a partition changed hands mid-drain
                print(f"  {w.name} took {w.messages:,} messages, its partitions hold "
                      f"{w.partitions_messages:,}", flush=True)  # fmt: skip
        self.record("nats", workers, result, configs[0], load0, ready_s)

    def wait_settled(
        self, configs: list[Config], workers: Workers, t0: float
    ) -> dict[str, list[int]]:
        """Until the members bucket shows the workers holding the partitions between them and
        each partition's consumer has one pull request waiting (its owner's) three polls in a
        row. A worker hands the partitions it gives up back one at a time, each after its
        last pull request ends (fetch_expires_s), and keeps pulling the others meanwhile:
        measured ~1 s per partition, so 8 s for 8 (cityflux/nats/source.py _rebalance)."""
        names = [c.mqtt.client_id for c in configs]
        quiet = 0
        holdings: dict[str, list[int]] = {}
        waiting: list[int] = []
        while quiet < 3:
            workers.check_alive()
            if time.monotonic() - t0 > 120:
                raise BenchError(f"partitions not settled in 120 s: {holdings} {waiting}")
            time.sleep(0.3)
            holdings = _run(_holdings(configs[0]))
            waiting = _run(_waiting(configs[0]))
            settled = _balanced(holdings, names, self.partitions) and max(waiting) <= 1
            quiet = quiet + 1 if settled else 0
        return holdings

    def run_mqtt(self) -> None:
        config = self.config("bench-sn-mqtt", "bench_mqtt_w1", **{"source.kind": "mqtt"})
        load0 = loadavg()
        workers = Workers([config], self.logs)
        try:
            servers: dict[str, LocalServer] = {"broker": self.mosquitto, "influxd": self.influx}
            result = drain(workers, self.n, servers, 600)
        finally:
            workers.stop()
        self.record("mqtt", workers, result, config, load0, 0.0)

    def record(
        self,
        source: str,
        workers: Workers,
        result: Drain,
        config: Config,
        load0: list[float],
        ready_s: float,
    ) -> None:
        per = workers.workers
        run = Run(
            source=source,
            workers=len(per),
            messages=self.n,
            seconds=round(result.seconds, 3),
            msg_per_s=round(self.n / result.seconds),
            first_ack_s=round(result.first_ack_s, 3),
            from_resume_s=round(result.from_start_s, 3),
            ready_s=round(ready_s, 2),
            worker_cpu_s=round(sum(w.steady_cpu_s for w in per), 2),
            broker_cpu_s=result.servers_cpu["broker"],
            influxd_cpu_s=result.servers_cpu["influxd"],
            peak_rss_mb=round(max(w.peak_rss_mb for w in per), 1),
            points_expected=self.points,
            points_stored=influx_count(self.influx, config.influx.database),
            loadavg_start=load0,
            loadavg_end=loadavg(),
            per_worker=per,
        )
        self.runs.append(run)
        print(row(run), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--logs", help="keep the workers' logs in this directory")
    parser.add_argument("--no-mqtt", action="store_true", help="skip the MQTT-source worker")
    args = parser.parse_args()
    stamp = utc_stamp()
    print(
        f"{os.cpu_count()} CPUs, load {fmt_load(loadavg())} at start; {args.messages:,} "
        f"messages, {args.partitions} partitions, analytics on, shipped defaults otherwise",
        flush=True,
    )
    with ExitStack() as stack:
        bench = ScaleNats(args, stack)
        bench.fill()
        counts = [int(w) for w in args.workers.split(",")]
        for i, count in enumerate(counts):
            bench.run_nats(count)
            if i == 0 and not args.no_mqtt:  # next to the one JetStream worker
                bench.run_mqtt()
        report(bench, stamp)
    lost = [r for r in bench.runs if r.points_stored != r.points_expected]
    for r in lost:
        print(f"POINTS {r.points_stored:,} of {r.points_expected:,}: {r.source} {r.workers}w",
              file=sys.stderr)  # fmt: skip
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
