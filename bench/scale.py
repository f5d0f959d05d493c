"""Workers benchmark: does ``cityflux run --workers 2`` drain a backlog faster than one worker?

    python -m bench.scale [--messages 200000] [--rounds 2] [--target vm|influx]

For each isolation mode (``pinned``, ``unpinned``; ``--modes``) a local mosquitto and a database
start (InfluxDB 1.x: one server per mode, one database per run; VictoriaMetrics: one server per
run, so every count starts from zero). In each round:

1. The persistent QoS 1 sessions are registered: ``bench-scale-1w`` on ``cityflux/v1/#`` (one
   worker) and ``bench-scale-0``/``-1`` on ``$share/bench-scale/cityflux/v1/#`` (the two workers
   of ``--workers 2``). mosquitto 2.0 queues a shared subscription's messages for its offline
   persistent sessions, dealt round-robin at publish time: each worker finds half the backlog.
2. The stream (bench.stream.mixed_stream) is published once; both backlogs fill.
3. ``cityflux run --workers N`` (shipped defaults, analytics off for both N so that both do the
   same work) drains its backlog, N = 1 then 2 (2 then 1 in odd rounds). Timed from the first
   message received (sum over workers of cityflux_messages_received_total > 0; worker i serves
   its metrics on metrics.port + i) to all acknowledged (sum of acked >= n). Each worker's
   CPU (/proc/<pid>/stat of the supervisor's children), its messages, its start-up (process
   start to its first message) and its peak RSS are recorded; the database is counted.

Isolation (``pinned``): the workers run under ``taskset -c 0`` (the supervisor and its worker
processes, every thread); mosquitto and the database under ``taskset -c 1`` (the server binary
started under taskset; every thread's Cpus_allowed_list is checked and recorded). So the workers
share one core and the servers the other: 1 -> 2 workers can only gain what one worker leaves
idle on its core while it waits (for the broker, the database, its own commit threads).
``unpinned``: no taskset anywhere; the scheduler spreads all processes over both cores.
Nothing isolates the runs from other processes on the machine: the load averages say how busy
it was. All figures go to bench/results/scale-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.figures import (
    BenchError,
    child_pids,
    cpu_seconds,
    cpus_allowed,
    fmt_load,
    loadavg,
    peak_rss_mb,
    per_100k,
    run_child,
    server_cpu,
    since_boot,
    started_at,
    utc_stamp,
)
from bench.ingest import _metric, influx_count, vm_count
from bench.scale_report import report, row
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
from tests.support import config_env, publish_all

GROUP = "bench-scale"
RECEIVED, ACKED = "cityflux_messages_received_total", "cityflux_messages_acked_total"


def taskset(cores: str | None, command: list[str]) -> list[str]:
    return [require_binary("taskset"), "-c", cores, *command] if cores else command


# The server binary itself starts under taskset (it execs: same pid), so every thread it ever
# starts inherits the mask; no race with threads started before a later `taskset -a -p`.
class PinnedMosquitto(LocalMosquitto):
    cores: str | None = None

    def command(self) -> list[str]:
        return taskset(self.cores, super().command())


class PinnedInfluxDB(LocalInfluxDB):
    cores: str | None = None

    def command(self) -> list[str]:
        return taskset(self.cores, super().command())


class PinnedVictoriaMetrics(LocalVictoriaMetrics):
    cores: str | None = None

    def command(self) -> list[str]:
        return taskset(self.cores, super().command())


def register(port: int, client_id: str, topic: str) -> None:
    """A persistent QoS 1 session subscribed to ``topic``, left offline: the broker queues."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    granted = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_subscribe = lambda *args: granted.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    try:
        if not granted.wait(10):
            raise BenchError(f"no SUBACK for {client_id} on {topic}")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class Worker:
    index: int
    pid: int
    messages: int = 0
    startup_s: float | None = None  # its process start to its first message received
    first_message_s: float | None = None  # `cityflux run` start to its first message
    startup_cpu_s: float | None = None  # its CPU by then
    cpu_s: float = 0.0  # whole process, start-up included
    steady_cpu_s: float = 0.0  # from the run's first message on
    peak_rss_mb: float = 0.0
    pss_mb: float = 0.0  # its proportional share of memory: pages shared with others count 1/k
    cpus_allowed: list[str] = field(default_factory=list)

    @property
    def steady_cpu_per_100k(self) -> float:
        return per_100k(self.steady_cpu_s, self.messages)


@dataclass
class Run:
    mode: str
    round: int
    workers: int
    messages: int
    seconds: float  # first message received -> all acknowledged
    msg_per_s: float
    process_seconds: float  # `cityflux run` start -> all acknowledged
    startup_cpu_s: float  # all its processes' CPU before the first message
    worker_cpu_s: float  # all workers, steady state
    supervisor_cpu_s: float  # the parent process of --workers 2 (0 with one worker)
    broker_cpu_s: float
    database_cpu_s: float
    points_expected: int
    points_stored: int
    loadavg_start: list[float]
    loadavg_end: list[float]
    reconnects: int  # the workers' "MQTT connection to ..." warnings: each may redeliver
    per_worker: list[Worker]

    @property
    def worker_cpu_per_100k(self) -> float:
        return per_100k(self.worker_cpu_s, self.messages)


class Probe:
    """Watches one ``cityflux run``: its worker processes and their /metrics, every time
    run_child asks (each 50 ms); records each worker's first message and CPU."""

    def __init__(self, workers: int, metrics_port: int, total: int) -> None:
        self.n_workers, self.port, self.total = workers, metrics_port, total
        self.root = 0
        self.workers: dict[int, Worker] = {}
        self.received = [0.0] * workers
        self.acked = [0.0] * workers
        self.began_cpu: dict[int, float] = {}

    def on_start(self, pid: int) -> None:
        self.root = pid

    def _find_workers(self) -> None:
        if len(self.workers) == self.n_workers:
            return
        if self.n_workers == 1:
            self.workers[0] = Worker(0, self.root)
            return
        pids = child_pids(self.root)
        if len(pids) < self.n_workers:
            return
        # the supervisor starts worker i as its i-th child: order them by start
        try:
            ordered = sorted(pids, key=lambda pid: (started_at(pid), pid))
        except OSError:
            return
        for index, pid in enumerate(ordered[: self.n_workers]):
            self.workers[index] = Worker(index, pid)

    def _poll(self) -> None:
        self._find_workers()
        for i in range(self.n_workers):
            self.received[i] = _metric(self.port + i, RECEIVED)
            worker = self.workers.get(i)
            if worker is not None and worker.startup_s is None and self.received[i] > 0:
                now = since_boot()
                worker.startup_s = round(now - started_at(worker.pid), 3)
                worker.first_message_s = round(now - started_at(self.root), 3)
                worker.startup_cpu_s = round(cpu_seconds(worker.pid), 2)

    def started(self) -> bool:
        self._poll()
        if sum(self.received) > 0:
            self.began_cpu = {w.index: cpu_seconds(w.pid) for w in self.workers.values()}
            return True
        return False

    def done(self) -> bool:
        if self.began_cpu:  # run_child stops asking started() once it held
            self._poll()
        for i in range(self.n_workers):
            self.acked[i] = _metric(self.port + i, ACKED)
        if sum(self.acked) < self.total:
            return False
        for worker in self.workers.values():  # still alive: run_child stops them after this
            worker.cpu_s = round(cpu_seconds(worker.pid), 2)
            worker.steady_cpu_s = round(worker.cpu_s - self.began_cpu.get(worker.index, 0.0), 2)
            worker.messages = int(self.acked[worker.index])
            worker.peak_rss_mb = round(peak_rss_mb(worker.pid), 1)
            worker.pss_mb = round(_pss_mb(worker.pid), 1)
            worker.cpus_allowed = cpus_allowed(worker.pid)
        return True


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _port_pair() -> int:
    """A metrics port p with p + 1 free too (worker i serves on p + i)."""
    while True:
        port = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


class Scale:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args = args
        self.n = args.messages
        self.stream = mixed_stream(self.n)
        self.points = points_in(self.stream)
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cityflux-scale-")))
        self.runs: list[Run] = []
        self.overrides: dict[str, str] = dict(item.split("=", 1) for item in args.set)
        self.servers: dict[str, dict[str, list[str]]] = {}  # mode -> server -> affinity

    def mode(self, mode: str) -> None:
        server_cores = self.args.server_cores if mode == "pinned" else None
        worker_cores = self.args.worker_cores if mode == "pinned" else None
        with ExitStack() as stack:
            broker = PinnedMosquitto(self.tmp / f"mosquitto-{mode}", max_queued=10 * self.n)
            broker.cores = server_cores
            stack.enter_context(broker)
            influx = None
            if self.args.target == "influx":
                influx = PinnedInfluxDB(self.tmp / f"influx-{mode}")
                influx.cores = server_cores
                stack.enter_context(influx)
            self.servers[mode] = {"mosquitto": cpus_allowed(_pid(broker))}
            for round_ in range(self.args.rounds):
                sessions = [("bench-scale-1w", "cityflux/v1/#")] + [
                    (f"{GROUP}-{i}", f"$share/{GROUP}/cityflux/v1/#") for i in range(2)
                ]
                for client_id, topic in sessions:
                    register(broker.port, client_id, topic)
                t0 = time.monotonic()
                publish_all(broker.port, self.stream)
                print(
                    f"[{mode} round {round_}] published {self.n:,} messages in "
                    f"{time.monotonic() - t0:.1f}s, load {fmt_load(loadavg())}",
                    flush=True,
                )
                order = (1, 2) if round_ % 2 == 0 else (2, 1)
                for workers in order:
                    key = f"{mode}-r{round_}-{workers}w"
                    if influx is not None:
                        self.servers[mode]["influxdb"] = cpus_allowed(_pid(influx))
                        self.run(mode, round_, workers, worker_cores, broker, influx, key)
                        continue
                    vm = PinnedVictoriaMetrics(self.tmp / f"vm-{key}")
                    vm.cores = server_cores
                    with vm:
                        self.servers[mode]["victoria-metrics"] = cpus_allowed(_pid(vm))
                        self.run(mode, round_, workers, worker_cores, broker, vm, key)

    def run(
        self,
        mode: str,
        round_: int,
        workers: int,
        cores: str | None,
        broker: LocalMosquitto,
        database: LocalInfluxDB | LocalVictoriaMetrics,
        key: str,
    ) -> None:
        port = _port_pair()
        api = "v2" if isinstance(database, LocalVictoriaMetrics) else "v1"
        db_name = key.replace("-", "_")
        config = Config().with_overrides(
            {
                "mqtt.url": broker.url,
                "mqtt.client_id": "bench-scale-1w" if workers == 1 else GROUP,
                "mqtt.shared_group": GROUP,
                "influx.url": database.url,
                "influx.api": api,
                "influx.token": "bench",
                "influx.database": db_name,
                "influx.bucket": "bench",
                "spool.dir": str(self.tmp / f"spool-{key}"),
                "metrics.port": port,
                # the same work for 1 and 2 workers (with 2, cityflux turns them off itself)
                "analytics.enabled": False,
                "analytics.alerts_db": str(self.tmp / f"alerts-{key}.sqlite"),
                "analytics.checkpoint_dir": str(self.tmp / f"analytics-{key}"),
                **self.overrides,
            }
        )
        probe = Probe(workers, port, self.n)
        command = [sys.executable, "-m", "cityflux", "run", "--workers", str(workers)]
        broker0, db0, load0 = server_cpu(broker), server_cpu(database), loadavg()
        log = self.tmp / f"cityflux-{key}.log"
        child = run_child(
            taskset(cores, command),
            log,
            env=config_env(config),
            done=probe.done,
            started=probe.started,
            on_start=probe.on_start,
            timeout_s=900,
        )
        broker_cpu, db_cpu = server_cpu(broker) - broker0, server_cpu(database) - db0
        if child.steady_seconds is None:
            raise BenchError(f"{key}: everything acknowledged before the first message was seen")
        if isinstance(database, LocalVictoriaMetrics):
            stored = vm_count(database, self.points)
        else:
            stored = influx_count(database, db_name)
        per_worker = [probe.workers[i] for i in sorted(probe.workers)]
        worker_cpu = sum(w.steady_cpu_s for w in per_worker)
        run = Run(
            mode=mode,
            round=round_,
            workers=workers,
            messages=self.n,
            seconds=round(child.steady_seconds, 3),
            msg_per_s=round(self.n / child.steady_seconds),
            process_seconds=round(child.seconds, 3),
            startup_cpu_s=round(child.cpu_s - (child.steady_cpu_s or 0.0), 2),
            worker_cpu_s=round(worker_cpu, 2),
            supervisor_cpu_s=round(child.cpu_s - sum(w.cpu_s for w in per_worker), 2)
            if workers > 1
            else 0.0,
            broker_cpu_s=round(broker_cpu, 2),
            database_cpu_s=round(db_cpu, 2),
            points_expected=self.points,
            points_stored=stored,
            loadavg_start=load0,
            loadavg_end=loadavg(),
            reconnects=log.read_text(errors="replace").count("MQTT connection to "),
            per_worker=per_worker,
        )
        self.runs.append(run)
        print(f"  {row(run)}", flush=True)


def _pid(server: LocalServer) -> int:
    assert server._process is not None
    return server._process.pid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--target", choices=("vm", "influx"), default="vm")
    parser.add_argument("--modes", default="pinned,unpinned", help="comma-separated")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a cityflux setting for every run, e.g. --set ingest.write_concurrency=4",
    )
    parser.add_argument("--worker-cores", default="0", help="taskset -c list for the workers")
    parser.add_argument(
        "--server-cores", default="1", help="taskset -c list for mosquitto and the database"
    )
    args = parser.parse_args()
    stamp = utc_stamp()
    print(
        f"{os.cpu_count()} CPUs, load {fmt_load(loadavg())} at start; {args.messages:,} messages, "
        f"target {args.target}, analytics off, shipped defaults otherwise",
        flush=True,
    )
    with ExitStack() as stack:
        scale = Scale(args, stack)
        for mode in args.modes.split(","):
            scale.mode(mode)
        report(scale, stamp)
    lost = [r for r in scale.runs if r.points_stored < r.points_expected]
    for r in lost:
        print(f"LOST {r.points_expected - r.points_stored:,} points: {r.mode} r{r.round} "
              f"{r.workers}w", file=sys.stderr)  # fmt: skip
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
