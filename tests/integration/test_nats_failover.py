"""Fail-over on NATS (issue 12), under load, with real processes: three nats-servers, `cityflux
run` workers as child processes, InfluxDB, and devices publishing MQTT 3.1.1 QoS 1 to the nodes.

- kill -9 of a worker: its partitions go to the survivors (measured: from the kill to each moved
  partition's first delivery to its new owner, and to that owner having acknowledged everything
  the dead one held), every reading lands, and the survivors keep their own partitions;
- kill -9 of the node leading the readings stream, with the devices on the other nodes: every
  PUBACKed reading lands, and the workers recover (the longest pause in acknowledgements).

Each test prints its figures (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.ingest import influx_count
from bench.stream import mixed_stream, points_in
from cityflux.config import Config
from cityflux.nats.admin import consumer_info, init, partition_consumer_name, stream_info
from cityflux.nats.connect import connect
from cityflux.nats.members import live_values
from cityflux.servers import LocalInfluxDB, free_port
from cityflux.servers_nats import LocalNatsCluster
from tests.conftest import TEN_YEARS_S
from tests.support import ROOT, config_env, wait_for

PARTITIONS = 16
DISTRICTS = 32  # z00..z31: FNV-1a spreads them over all 16 partitions (1 to 3 each)
RATE = 2_000  # readings/s from the devices: a worker is killed while they publish


def base_config(cluster: LocalNatsCluster, influx: LocalInfluxDB, tmp: Path) -> Config:
    return Config().with_overrides(
        {
            "source.kind": "nats",
            "nats.urls": cluster.urls,
            "nats.replicas": 3,
            "nats.partitions": PARTITIONS,
            "nats.heartbeat_s": 0.5,
            "nats.pin_timeout_s": 3.0,
            "nats.fetch_expires_s": 0.5,
            "nats.ack_wait_s": 5.0,
            "influx.url": influx.url,
            "influx.database": f"test_failover_{uuid.uuid4().hex[:10]}",
            "ingest.max_past_s": TEN_YEARS_S,
            "ingest.batch_size": 2_000,
            "metrics.health_interval_s": 0,
            "analytics.checkpoint_dir": str(tmp / "unused"),
        }
    )


class Worker:
    """`cityflux run` as a child process with its own client id, spool, checkpoints, /metrics."""

    def __init__(self, base: Config, tmp: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.config = base.with_overrides(
            {
                "mqtt.client_id": name,
                "metrics.port": self.port,
                "spool.dir": str(tmp / name / "spool"),
                "analytics.checkpoint_dir": str(tmp / name / "analytics"),
                "analytics.alerts_db": str(tmp / name / "analytics" / "alerts.sqlite"),
            }
        )
        env = config_env(self.config)
        # a list setting is comma-separated in the environment (config_env writes the tuple)
        env["CITYFLUX_NATS__URLS"] = ",".join(self.config.nats.urls)
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cityflux", "run"],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def acked(self) -> float:
        """cityflux_messages_acked_total from its /metrics; 0 when it does not answer."""
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith("cityflux_messages_acked_total "):
                return float(line.split()[1])
        return 0.0

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: nothing in hand is acknowledged, nothing handed back
        self.process.wait(10)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return f"--- {self.name}\n" + "\n".join(text[-lines:])


@contextmanager
def workers(base: Config, tmp: Path, count: int) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for i in range(count):
            started.append(Worker(base, tmp, f"w{i}-{uuid.uuid4().hex[:4]}"))
        yield started
    except BaseException:
        print("\n".join(w.tail() for w in started))
        raise
    finally:
        for worker in started:
            worker.process.kill()
            worker.process.wait(10)


def city_stream(n: int) -> list[tuple[str, bytes]]:
    """The bench's mixed stream over DISTRICTS districts (its own has 12, not enough for 16
    partitions): every partition gets readings."""
    out = []
    for topic, payload in mixed_stream(n, devices=2_000):
        levels = topic.split("/")
        device = int(levels[4].rsplit("-", 1)[1])
        levels[2] = f"z{device % DISTRICTS:02d}"
        out.append(("/".join(levels), payload))
    return out


class Devices:
    """Paho MQTT 3.1.1 QoS 1 clients, one per port, publishing a stream at ``rate`` readings/s
    round-robin over the ports; remembers which readings were PUBACKed, and when."""

    def __init__(self, ports: list[int], messages: list[tuple[str, bytes]], rate: float) -> None:
        self.messages = messages
        self.rate = rate
        self.published = 0
        # (client, mid) -> monotonic time of its PUBACK; fewer than 65,535 messages per client,
        # so a packet id is not reused. (No lock of ours around paho's publish: its network
        # thread calls on_publish holding paho's own lock.)
        self._pubacks: dict[tuple[int, int], float] = {}
        self._sent: list[tuple[int, int]] = []  # message index -> (client, mid)
        self.clients = [self._client(port, i) for i, port in enumerate(ports)]
        assert len(messages) < 65_535 * len(ports)
        self.thread = threading.Thread(target=self._publish, daemon=True)

    def _client(self, port: int, which: int) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"dev-{which}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv311,
        )
        client.max_inflight_messages_set(1_000)
        client.max_queued_messages_set(0)

        def on_publish(client: Any, userdata: Any, mid: int, *rest: Any) -> None:
            self._pubacks[(which, mid)] = time.monotonic()

        client.on_publish = on_publish
        client.connect("127.0.0.1", port)
        client.loop_start()
        return client

    @property
    def acked(self) -> dict[int, float]:
        """Message index -> time of its PUBACK, for the messages PUBACKed so far."""
        pubacks = dict(self._pubacks)
        sent = list(self._sent)
        return {i: pubacks[key] for i, key in enumerate(sent) if key in pubacks}

    def start(self) -> None:
        self.thread.start()

    def _publish(self) -> None:
        began = time.monotonic()
        for index, (topic, payload) in enumerate(self.messages):
            which = index % len(self.clients)
            info = self.clients[which].publish(topic, payload, qos=1)
            self._sent.append((which, info.mid))
            self.published = index + 1
            ahead = began + index / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        wait_for(lambda: len(self.acked) == len(self.messages), timeout, "every PUBACK")

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()

    def longest_puback_gap(self, after: float) -> float:
        times = sorted(t for t in self._pubacks.values() if t >= after)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def run_async(coroutine: Callable[[Any], Awaitable[Any]], config: Config) -> Any:
    """``coroutine(nc)`` on a connection of its own."""

    async def main() -> Any:
        nc = await connect(config.nats, f"test-{uuid.uuid4().hex[:6]}", wait_s=10)
        try:
            return await coroutine(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


async def owners(nc: Any, config: Config) -> dict[str, list[int]]:
    """Each live worker's partitions, as it says in its heartbeat."""
    bucket = config.nats.members_bucket
    found = await live_values(nc, await nc.jetstream().key_value(bucket), bucket)
    return {key: json.loads(value)["partitions"] for key, value in found.items()}


async def pins(nc: Any, config: Config) -> dict[int, dict[str, Any]]:
    """Each partition's consumer info: pinned client, delivered and ack floor."""
    out = {}
    for p in range(config.nats.partitions):
        info = await consumer_info(
            nc, config.nats.stream, partition_consumer_name(config.nats.group, p)
        )
        assert info is not None
        groups = info.get("priority_groups") or [{}]
        out[p] = {
            "pin": groups[0].get("pinned_client_id", ""),
            "delivered": info["delivered"]["stream_seq"],
            "ack_floor": info["ack_floor"]["stream_seq"],
        }
    return out


def shared_out(config: Config, names: set[str]) -> Callable[[], bool]:
    """Every partition owned once, by the workers ``names`` (each owning some). (A partition
    is pinned only at its first delivery.)"""

    def check() -> bool:
        async def probe(nc: Any) -> bool:
            owned = await owners(nc, config)
            if set(owned) != names or not all(owned.values()):
                return False
            return sorted(p for ps in owned.values() for p in ps) == list(range(PARTITIONS))

        return bool(run_async(probe, config))

    return check


def stored(influx: LocalInfluxDB, config: Config) -> int:
    return influx_count(influx, config.influx.database)


# -- kill -9 of a worker ---------------------------------------------------------------------
async def watch_takeover(
    nc: Any, config: Config, victim: Worker, moved: list[int], timeout: float = 30.0
) -> tuple[dict[int, float], dict[int, float]]:
    """Kill ``victim``; for each partition it owned, the seconds from the kill until another
    client is pinned (its first delivery), and until the ack floor passes everything the dead
    worker had been delivered (its unacknowledged readings came back after ack_wait and were
    written by the new owner)."""
    before = await pins(nc, config)
    began = time.monotonic()
    victim.kill()
    after_kill = await pins(nc, config)  # deliveries that were on their way to the dead one
    pinned: dict[int, float] = {}
    caught_up: dict[int, float] = {}
    while len(caught_up) < len(moved) and time.monotonic() - began < timeout:
        now = await pins(nc, config)
        elapsed = time.monotonic() - began
        for p in moved:
            if p not in pinned and now[p]["pin"] and now[p]["pin"] != before[p]["pin"]:
                pinned[p] = elapsed
            done = now[p]["ack_floor"] >= after_kill[p]["delivered"]
            if p in pinned and p not in caught_up and done:
                caught_up[p] = elapsed
        await asyncio.sleep(0.05)
    return pinned, caught_up


def test_kill_9_of_a_worker_moves_its_partitions_and_loses_no_reading(
    nats_cluster: LocalNatsCluster, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    base = base_config(nats_cluster, influxdb, tmp_path)
    asyncio.run(init(base))
    messages = city_stream(24_000)  # 12 s at RATE
    with workers(base, tmp_path, 3) as started, ExitStack() as stack:
        names = {w.name for w in started}
        wait_for(shared_out(base, names), 45, "16 partitions shared out over 3 workers")
        before = run_async(lambda nc: owners(nc, base), base)
        devices = Devices(nats_cluster.mqtt_ports, messages, RATE)
        stack.callback(devices.close)
        devices.start()
        wait_for(lambda: devices.published > len(messages) // 3, 20, "a third published")
        victim = started[1]
        moved = before[victim.name]
        pinned, caught_up = run_async(lambda nc: watch_takeover(nc, base, victim, moved), base)
        survivors = names - {victim.name}
        wait_for(shared_out(base, survivors), 20, "the partitions shared out over 2 workers")
        after = run_async(lambda nc: owners(nc, base), base)
        devices.wait(60)
        expected = points_in(messages)
        wait_for(lambda: stored(influxdb, base) >= expected, 60, "every reading stored")
        time.sleep(1.0)  # would anything more arrive?
        count = stored(influxdb, base)
        print(
            f"\nworker kill: moved {moved}; pinned to a survivor after "
            f"{_spread(pinned)}; caught up after {_spread(caught_up)}; owners before "
            f"{sorted(before.items())} after {sorted(after.items())}; {count} of {expected} points"
        )
        assert sorted(pinned) == sorted(moved), f"not taken over: {set(moved) - set(pinned)}"
        assert sorted(caught_up) == sorted(moved), f"not caught up: {set(moved) - set(caught_up)}"
        # bound: membership expiry (3 heartbeats) or the pin timeout, whichever is later, plus
        # a request's life; then ack_wait for what the dead worker held
        nats = base.nats
        assert max(pinned.values()) < nats.pin_timeout_s + 3 * nats.fetch_expires_s + 1.5
        assert max(caught_up.values()) < nats.pin_timeout_s + nats.ack_wait_s + 3.0
        # a survivor keeps what it owned: only the dead worker's partitions move
        for name in survivors:
            assert set(before[name]) <= set(after[name]), (name, before[name], after[name])
        assert count == expected


def _spread(seconds: dict[int, float]) -> str:
    if not seconds:
        return "-"
    values = sorted(seconds.values())
    return f"{values[0]:.2f}-{values[-1]:.2f}s (median {values[len(values) // 2]:.2f}s)"


# -- kill -9 of a NATS node ------------------------------------------------------------------
class Progress:
    """Samples the workers' acknowledged total every 50 ms: the longest pause after a moment."""

    def __init__(self, started: list[Worker]) -> None:
        self.workers = started
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), sum(w.acked() for w in self.workers)))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def longest_pause(self, after: float, until: float) -> float:
        """Seconds between consecutive increases of the total, within [after, until]."""
        rises = [after, *(t for t in self._rise_times() if after <= t <= until), until]
        return max(b - a for a, b in itertools.pairwise(rises))

    def _rise_times(self) -> list[float]:
        return [t for (_, v), (t, w) in itertools.pairwise(self.samples) if w > v]


# nats-py leaves tasks of a JetStream subscription pending when the test's event loop closes
# right after the node under it was killed and restarted; their StreamWriter's "loop is closed"
# at garbage collection failed the test once in CI after every assertion had passed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_kill_9_of_the_stream_leader_loses_no_acknowledged_reading(
    nats_cluster: LocalNatsCluster, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    base = base_config(nats_cluster, influxdb, tmp_path)
    asyncio.run(init(base))
    info = run_async(lambda nc: stream_info(nc, base.nats.stream), base)
    leader = [n.server_name for n in nats_cluster.nodes].index(info["cluster"]["leader"])
    others = [port for i, port in enumerate(nats_cluster.mqtt_ports) if i != leader]
    messages = city_stream(24_000)
    with workers(base, tmp_path, 2) as started, ExitStack() as stack:
        names = {w.name for w in started}
        wait_for(shared_out(base, names), 45, "16 partitions shared out over 2 workers")
        devices = Devices(others, messages, RATE)
        stack.callback(devices.close)
        progress = Progress(started)
        stack.callback(progress.stop)
        devices.start()
        wait_for(lambda: devices.published > len(messages) // 3, 20, "a third published")
        killed_at = time.monotonic()
        nats_cluster.kill(leader)
        time.sleep(3.0)
        nats_cluster.nodes[leader].start()
        restarted = time.monotonic() - killed_at
        devices.wait(90)
        expected = points_in(messages)
        wait_for(lambda: stored(influxdb, base) >= expected, 60, "every reading stored")
        done = time.monotonic()
        time.sleep(1.0)
        count = stored(influxdb, base)
        acked_pause = progress.longest_pause(killed_at, done)
        puback_pause = devices.longest_puback_gap(killed_at - 1.0)
        print(
            f"\nnode kill (leader n{leader + 1}): restarted after {restarted:.1f}s; longest "
            f"pause in the workers' acks {acked_pause:.2f}s, in the devices' PUBACKs "
            f"{puback_pause:.2f}s; {count} of {expected} points"
        )
        assert count == expected
        # a new stream leader is elected in ~5 s (nats-findings.md); the workers' pulls resume
        assert acked_pause < 15.0
