"""The pipeline on the JetStream source (issue 12): devices publish MQTT to nats-server, the
server files their readings under partitions of their district, workers own partitions.
Real nats-server (one node, or three), real InfluxDB."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from bench.ingest import influx_count
from bench.stream import mixed_stream, points_in
from cityflux.analytics.results import ALERT_MEASUREMENT, SEGMENT_MEASUREMENT
from cityflux.config import Config
from cityflux.nats import source as source_module
from cityflux.nats.admin import init
from cityflux.nats.alerts import KvAlertStore
from cityflux.nats.source import JetStreamSource
from cityflux.observability import Metrics
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB
from cityflux.servers_nats import LocalNats
from cityflux.simulators.runner import run_simulation
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter
from cityflux.supervisor import Supervisor
from tests.conftest import TEN_YEARS_S
from tests.integration.test_contract_examples import EXAMPLES, expected_rows
from tests.support import publish_all, select, wait_for


def nats_config(urls: list[str], influx: LocalInfluxDB, tmp: Path, name: str) -> Config:
    return Config().with_overrides(
        {
            "source.kind": "nats",
            "nats.urls": urls,
            "nats.partitions": 8,
            "nats.heartbeat_s": 1.0,  # gone after 3 s: a loaded 2-core machine misses 1.5 s
            "nats.pin_timeout_s": 3.0,
            "nats.fetch_expires_s": 0.5,
            "nats.ack_wait_s": 5.0,
            "mqtt.client_id": name,
            "influx.url": influx.url,
            "influx.database": "test_nats",
            "ingest.max_past_s": TEN_YEARS_S,
            "spool.dir": str(tmp / name / "spool"),
            "analytics.checkpoint_dir": str(tmp / name / "analytics"),
            "analytics.alerts_db": str(tmp / name / "analytics" / "alerts.sqlite"),
            "metrics.port": 0,
        }
    )


def points(influx: LocalInfluxDB, config: Config) -> int:
    return influx_count(influx, config.influx.database)


def test_one_worker_stores_every_reading_published_over_mqtt(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    config = nats_config([nats_node.url], influxdb, tmp_path, f"w-{uuid.uuid4().hex[:6]}")
    config = config.with_overrides({"influx.database": f"test_{uuid.uuid4().hex[:10]}"})
    asyncio.run(init(config))
    messages = mixed_stream(3_000, devices=300)
    with Pipeline(config, connect_timeout_s=10) as pipeline:
        assert nats_node.mqtt_port is not None
        publish_all(nats_node.mqtt_port, messages)
        wait_for(lambda: points(influxdb, config) >= points_in(messages), 60, "every point stored")
        assert pipeline.source.owned() == frozenset(range(8))  # type: ignore[attr-defined]
    assert points(influxdb, config) == points_in(messages)


# -- the same answer from one worker and from three over 16 partitions -------------------------
def group_config(base: Config, group: str, tmp: Path, worker: str) -> Config:
    return base.with_overrides(
        {
            "nats.group": group,
            "nats.partitions": 16,
            "nats.members_bucket": f"{group}_workers",
            "nats.alerts_bucket": f"{group}_alerts",
            "nats.checkpoints_bucket": f"{group}_checkpoints",
            "mqtt.client_id": f"{group}-{worker}",
            "influx.database": f"test_{group}_{base.mqtt.client_id[-6:]}",
            "spool.dir": str(tmp / group / worker / "spool"),
            "analytics.checkpoint_dir": str(tmp / group / worker / "analytics"),
            "analytics.alerts_db": str(tmp / group / worker / "analytics" / "alerts.sqlite"),
        }
    )


def segment_rows(influx: LocalInfluxDB, database: str) -> list[tuple[object, ...]]:
    config = Config().with_overrides({"influx.url": influx.url, "influx.database": database})
    writer = InfluxWriter(config.influx)
    try:
        rows = select(writer, f'SELECT * FROM "{SEGMENT_MEASUREMENT}"')
    finally:
        writer.close()
    return sorted(tuple(sorted((k, v) for k, v in row.items() if v is not None)) for row in rows)


# a city's pace, sped up: each batch spans seconds of event time, as live (at full speed one
# batch spans minutes, and which readings are too late depends on where batches split)
SPEED = 150.0
_seen: dict[str, tuple[int, float]] = {}


def steady(key: str, value: int) -> bool:
    """``value`` has not changed for four seconds (work finishing in the background)."""
    now = time.monotonic()
    last = _seen.get(key)
    if last is None or last[0] != value:
        _seen[key] = (value, now)
        return False
    return now - last[1] >= 4.0


def settled(influx: LocalInfluxDB, database: str) -> bool:
    """The segment rows stopped changing."""
    return steady(database, len(segment_rows(influx, database)))


def check_shared_alerts(bucket: KvAlertStore, workers_alerts: list[Any], config: Config) -> None:
    """The workers' alerts are one list in the cluster's bucket, with unique ids; an
    acknowledgement made there (`cityflux alerts ack`) reaches the worker holding the alert's
    district, which writes it to InfluxDB."""
    shared = bucket.select()
    in_bucket = sorted((a.rule, a.entity, a.state) for a in shared)
    assert in_bucket == workers_alerts, set(in_bucket) ^ set(workers_alerts)
    assert len({a.id for a in shared}) == len(shared)
    incident = next(a for a in shared if a.rule == "traffic_incident")
    assert bucket.acknowledge(incident.id, "operator-7").status == "acknowledged"
    writer = InfluxWriter(config.influx)
    query = f'SELECT last("acknowledged") FROM "{ALERT_MEASUREMENT}" WHERE alert_id = {incident.id}'
    try:
        wait_for(lambda: select(writer, query)[0]["last"] is True, 30, "the ack in InfluxDB")
    finally:
        writer.close()


def test_one_worker_and_three_workers_give_the_same_indices_and_alerts(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    scenario = load_scenario("rush-hour-incident", {"clock.duration_s": 4_200.0})  # crash at 3,600
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), SPEED))
    city_map = tmp_path / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(sim.city))
    base = nats_config([nats_node.url], influxdb, tmp_path, f"s{uuid.uuid4().hex[:6]}")
    base = base.with_overrides({"analytics.city_map": str(city_map)})
    one = [group_config(base, "one", tmp_path, "w0")]
    three = [group_config(base, "three", tmp_path, f"w{i}") for i in range(3)]
    asyncio.run(init(one[0]))
    asyncio.run(init(three[0]))
    assert nats_node.mqtt_port is not None
    device_side = msgspec.structs.replace(
        base.mqtt, url=f"mqtt://127.0.0.1:{nats_node.mqtt_port}", protocol="3.1.1"
    )
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(Pipeline(c, connect_timeout_s=10)) for c in one + three]
        sources = [w.source for w in workers]

        def owned() -> list[frozenset[int]]:
            return [s.owned() for s in sources]  # type: ignore[attr-defined]

        def balanced() -> bool:  # every partition owned once in each group, by every worker
            o = owned()  # ... and no hand-over still under way (its messages, its checkpoint)
            moving = any(s.handing_back() for s in sources)  # type: ignore[attr-defined]
            return sorted(p for s in o[1:] for p in s) == list(range(16)) and all(o) and not moving

        wait_for(balanced, 30, "the partitions shared out")
        summary = run_simulation(sim, device_side, SPEED)
        assert summary.completed
        # the simulation counts what it published as it goes (before the run it said 0, and
        # this wait passed at once)
        expected = sum(sim.expected.points.get(m, 0) for m in ("pole", "manhole", "traffic"))
        assert expected > 10_000
        for configs in (one, three):
            wait_for(lambda c=configs: points(influxdb, c[0]) >= expected, 90, "every reading")
        for worker in workers:
            worker.finish_windows()
        for configs in (one, three):  # the engines' workers deliver windows in the background
            wait_for(lambda c=configs: settled(influxdb, c[0].influx.database), 45, "windows")
        bucket = KvAlertStore.open(three[0].nats, "test-operator")
        stack.callback(bucket.close)
        wait_for(lambda: steady("alerts", len(bucket.select())), 45, "the alerts saved")
        answers = []
        # one engine per partition of the map in each group, none restarted (a hand-over
        # mid-run: an unpin from a worker that never held the partition did that)
        engines = [w.analytics.engines_started for w in workers]  # type: ignore[union-attr]
        partitions_with_districts = len(workers[0].analytics.districts)  # type: ignore[union-attr]
        late = [w.metrics.value("rejections_total", reason="too_late") for w in workers]
        for group in (workers[:1], workers[1:]):
            # which rule fired on which entity, and how it ended; its start is the event time of
            # the reading that crossed, which at 150x can fall into one batch or the next
            alerts = sorted((a.rule, a.entity, a.state) for w in group for a in w.alert_history())
            database = group[0].config.influx.database
            answers.append(
                (segment_rows(influxdb, database), alerts, [w.source.owned() for w in group])
            )  # type: ignore[attr-defined]
        check_shared_alerts(bucket, answers[1][1], three[0])
    (rows_one, alerts_one, owned_one), (rows_three, alerts_three, owned_three) = answers
    assert owned_one == [frozenset(range(16))]
    assert sorted(p for o in owned_three for p in o) == list(range(16))  # each exactly once
    assert all(owned_three), owned_three  # every worker owns some
    only_one, only_three = set(rows_one) - set(rows_three), set(rows_three) - set(rows_one)
    assert late == [0, 0, 0, 0]
    assert engines[0] == sum(engines[1:]) == partitions_with_districts, engines
    assert len(rows_one) > 1_000 and rows_one == rows_three, (
        f"{len(only_one)} rows only from one worker, {len(only_three)} only from three: "
        f"{sorted(only_one)[:2]} {sorted(only_three)[:2]}"
    )
    assert any(a[0] == "traffic_incident" for a in alerts_one)
    assert alerts_one == alerts_three


def test_the_contract_examples_land_exactly_as_through_mosquitto(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    """A device publishing the contract's examples with paho (MQTT 3.1.1, QoS 1) to
    nats-server: the same rows as test_contract_examples.py asserts through mosquitto."""
    config = nats_config([nats_node.url], influxdb, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    config = config.with_overrides({"influx.database": f"test_{uuid.uuid4().hex[:10]}"})
    asyncio.run(init(config))
    readings = [(t, p.encode()) for t, p in EXAMPLES if not t.endswith("/status")]
    statuses = [(t, p.encode()) for t, p in EXAMPLES if t.endswith("/status")]
    total = sum(len(expected_rows(t, p.decode())) for t, p in readings)
    writer = InfluxWriter(config.influx)
    try:
        with Pipeline(config, connect_timeout_s=10) as pipeline:
            assert nats_node.mqtt_port is not None
            publish_all(nats_node.mqtt_port, readings + statuses)
            wait_for(
                lambda: pipeline.metrics.value("lines_written_total") >= total + len(statuses),
                what="all example points written",
            )
            assert pipeline.metrics.rejected_total() == 0
        for topic, payload in readings:
            kind, device_id = topic.split("/")[3:5]
            stored = select(writer, f"SELECT * FROM {kind} WHERE device_id = '{device_id}'")
            for want in expected_rows(topic, payload.decode()):
                matches = [
                    r
                    for r in stored
                    if r["time"] == want["time"] and r.get("lane") == want.get("lane")
                ]
                assert len(matches) == 1, (topic, want, stored)
                got = {k: v for k, v in matches[0].items() if v is not None and k != "_measurement"}
                assert got == want
        status = {
            r["device_id"]: r["online"] for r in select(writer, "SELECT * FROM device_status")
        }
        assert status == {"pole-0001": True, "mh-0042": False}
    finally:
        writer.close()


def test_a_message_never_settled_is_dead_lettered_after_max_deliver(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    """A message taken but never acknowledged (as if it crashed the worker each time) comes
    back after ack_wait; at its max_deliver-th delivery it is handed to on_poison and
    terminated instead of going round again."""
    config = nats_config([nats_node.url], influxdb, tmp_path, f"x{uuid.uuid4().hex[:6]}")
    config = config.with_overrides({"nats.max_deliver": 2, "nats.ack_wait_s": 1.0})
    asyncio.run(init(config))
    topic, payload = "cityflux/v1/d1/pole/pole-0001", b'{"ts": 1795570800000, "noise_dba": 61.5}'
    assert nats_node.mqtt_port is not None
    publish_all(nats_node.mqtt_port, [(topic, payload)])
    poisoned: list[tuple[str, bytes, int]] = []
    supervisor = Supervisor()
    source = JetStreamSource(config, Metrics(), supervisor, "poison-test")
    source.on_poison = lambda t, p, n: poisoned.append((t, p, n)) is None
    source.start(10)
    try:
        first = wait_for(lambda: len(b := source.take(10, 0.5)) and b, 20, "the first delivery")
        assert (first.topics, first.payloads) == ([topic], [payload])  # not acknowledged
        wait_for(lambda: poisoned, 20, "the second delivery, poisoned")
        assert poisoned == [(topic, payload, 2)]
        time.sleep(2.5)  # two ack_waits: terminated, so never delivered again
        assert len(source.take(10, 0.5)) == 0 and len(poisoned) == 1
    finally:
        supervisor.stop()
        source.stop()


def test_the_poison_dead_letter_is_stored_and_counted(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    config = nats_config([nats_node.url], influxdb, tmp_path, f"y{uuid.uuid4().hex[:6]}")
    config = config.with_overrides({"influx.database": f"test_{uuid.uuid4().hex[:10]}"})
    asyncio.run(init(config))
    writer = InfluxWriter(config.influx)
    try:
        with Pipeline(config, connect_timeout_s=10) as pipeline:
            topic = "cityflux/v1/d1/pole/pole-0001"
            assert pipeline._dead_letter_poison(topic, b'{"ts": 1}', 5)
            assert pipeline.metrics.value("rejections_total", reason="redelivered") == 1
        rows = select(writer, 'SELECT * FROM "cityflux_deadletter"')
        assert [(r["reason"], r["topic"]) for r in rows] == [("redelivered", topic)]
        assert "delivered 5 times" in rows[0]["message"]
    finally:
        writer.close()


def test_a_partition_reader_that_fails_is_started_again(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path, monkeypatch: Any
) -> None:
    """A partition's puller task that ended by an error stayed ended: its partition stayed
    assigned to the worker and unread, and nothing said so. Now it is started again, counted
    in cityflux_component_restarts, and what it held comes back after ack_wait."""
    config = nats_config([nats_node.url], influxdb, tmp_path, f"w-{uuid.uuid4().hex[:6]}")
    config = config.with_overrides({"influx.database": f"test_{uuid.uuid4().hex[:10]}"})
    asyncio.run(init(config))
    injected: list[str] = []
    real = source_module.deliveries

    def fails_once(reply: str) -> int:
        if not injected:
            injected.append(reply)
            raise RuntimeError("injected: a bug in reading one batch")
        return real(reply)

    monkeypatch.setattr(source_module, "deliveries", fails_once)
    messages = mixed_stream(2_000, devices=200)
    with Pipeline(config, connect_timeout_s=10) as pipeline:
        assert nats_node.mqtt_port is not None
        publish_all(nats_node.mqtt_port, messages)
        wait_for(lambda: points(influxdb, config) >= points_in(messages), 60, "every point stored")
        assert injected
        assert pipeline.source.puller_restarts == 1  # type: ignore[attr-defined]
        restarts = pipeline.metrics.value("component_restarts_total", component="nats-puller")
        assert restarts == 1
    assert points(influxdb, config) == points_in(messages)
