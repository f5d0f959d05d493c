"""Replay from the stream (issue 12, ``cityflux replay --from-stream``): what the JetStream stream
keeps, re-run through the pipeline into another database, the live consumers untouched. Real
nats-server (MQTT listener), real InfluxDB."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from typer.testing import CliRunner

from bench.ingest import influx_count
from bench.stream import mixed_stream, points_in
from cityflux.analytics.alerts import Alert, AlertStore
from cityflux.cli import app
from cityflux.cli.stream_replay import ReplayOptions, replay_config, run
from cityflux.config import Config
from cityflux.nats.admin import consumer_info, init, partition_consumer_name
from cityflux.nats.connect import connect, js_request
from cityflux.nats.partition import partition_of
from cityflux.nats.replay import ReplaySource
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB
from cityflux.servers_nats import LocalNats
from cityflux.simulators.runner import run_simulation
from cityflux.simulators.scenario import load_scenario
from cityflux.simulators.simulation import Simulation
from cityflux.store.influx import InfluxWriter
from tests.integration.test_nats_pipeline import nats_config, segment_rows, settled
from tests.support import publish_all, select, wait_for

PARTITIONS = 8
SPEED = 300.0
# what the live consumers' state is made of: none of it may move because of a replay
CONSUMER_STATE = ("num_pending", "num_ack_pending", "num_redelivered", "ack_floor", "delivered")


def live_consumers(config: Config) -> dict[str, dict[str, Any]]:
    async def fetch() -> dict[str, dict[str, Any]]:
        nc = await connect(config.nats, "test-consumers", wait_s=10)
        try:
            infos = {}
            for p in range(config.nats.partitions):
                name = partition_consumer_name(config.nats.group, p)
                info = await consumer_info(nc, config.nats.stream, name)
                assert info is not None, name
                infos[name] = {key: info.get(key) for key in CONSUMER_STATE}
                # the stream's clock runs in the info: only the positions count
                for key in ("ack_floor", "delivered"):
                    infos[name][key] = {
                        k: v for k, v in (info.get(key) or {}).items() if k != "last_active"
                    }
            return infos
        finally:
            await nc.close()

    return asyncio.run(fetch())


def stream_messages(config: Config) -> int:
    async def fetch() -> int:
        nc = await connect(config.nats, "test-stream", wait_s=10)
        try:
            info = await js_request(nc, f"$JS.API.STREAM.INFO.{config.nats.stream}")
            return int(info["state"]["messages"])
        finally:
            await nc.close()

    return asyncio.run(fetch())


def raw_counts(influx: LocalInfluxDB, database: str) -> dict[str, int]:
    config = Config().with_overrides({"influx.url": influx.url, "influx.database": database})
    writer = InfluxWriter(config.influx)
    try:
        counts = {}
        for measurement, field in (("pole", "pm25_ugm3"), ("manhole", "battery_pct"),
                                   ("traffic", "count")):  # fmt: skip
            rows = select(writer, f'SELECT count("{field}") FROM "{measurement}"')
            counts[measurement] = int(rows[0]["count"]) if rows else 0
        return counts
    finally:
        writer.close()


def test_replay_reruns_the_stream_into_another_database_and_leaves_the_live_consumers_alone(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    """A scenario published over MQTT (MQTT 3.1.1, QoS 1) and stored by a live worker, then
    replayed while that worker runs: every reading once in the new database, the same indices
    and alerts as live, and the live consumers' positions exactly where they were."""
    scenario = load_scenario("rush-hour-incident", {"clock.duration_s": 4_200.0})  # crash: 3,600
    sim = Simulation(scenario, scenario.start_epoch_s(time.time(), SPEED))
    city_map = tmp_path / "city-map.json"
    city_map.write_bytes(msgspec.json.encode(sim.city))
    live = nats_config([nats_node.url], influxdb, tmp_path, f"live{uuid.uuid4().hex[:6]}")
    live = live.with_overrides(
        {
            "analytics.city_map": str(city_map),
            "influx.database": f"test_live_{uuid.uuid4().hex[:8]}",
        }
    )
    asyncio.run(init(live))
    assert nats_node.mqtt_port is not None
    device_side = msgspec.structs.replace(
        live.mqtt, url=f"mqtt://127.0.0.1:{nats_node.mqtt_port}", protocol="3.1.1"
    )
    live_db = live.influx.database
    with Pipeline(live, connect_timeout_s=10) as worker:
        wait_for(lambda: len(worker.source.owned()) == PARTITIONS, 30, "partitions")  # type: ignore[attr-defined]
        published = run_simulation(sim, device_side, SPEED)
        assert published.completed
        wait_for(lambda: stream_messages(live) >= published.messages, 60, "the stream has all")
        expected = sum(sim.expected.points.get(m, 0) for m in ("pole", "manhole", "traffic"))
        wait_for(lambda: influx_count(influxdb, live_db) >= expected, 120, "live stored all")
        worker.finish_windows()
        wait_for(lambda: settled(influxdb, live_db), 60, "live windows")
        live_alerts = sorted((a.rule, a.entity, a.state) for a in worker.alert_history())
        wait_for(lambda: worker.drain(timeout_s=5), 30, "live acknowledged all")
        before = live_consumers(live)
        live_raw = raw_counts(influxdb, live_db)
        live_rejected = worker.metrics.rejected_total()

        replay_db = f"test_replay_{uuid.uuid4().hex[:8]}"
        options = ReplayOptions(since_s=3_600, database=replay_db, state_dir=tmp_path / "replay")
        config = replay_config(live, options)
        summary = run(config, options)
        wait_for(lambda: settled(influxdb, replay_db), 60, "replayed windows")

        after = live_consumers(live)
        assert raw_counts(influxdb, live_db) == live_raw  # the live database untouched
    in_stream = stream_messages(live)
    assert summary.messages == in_stream == published.messages
    assert summary.first_seq == 1 and summary.last_seq == in_stream  # each once, the whole range
    assert after == before, "a replay moved the live consumers"
    assert raw_counts(influxdb, replay_db) == live_raw
    assert summary.rejected == live_rejected
    assert live_raw["traffic"] > 1_000
    rows_live, rows_replay = segment_rows(influxdb, live_db), segment_rows(influxdb, replay_db)
    assert len(rows_live) > 30_000
    only_live = set(rows_live) - set(rows_replay)
    only_replay = set(rows_replay) - set(rows_live)
    assert rows_replay == rows_live, f"{len(only_live)} only live, {len(only_replay)} only replayed"
    replay_alerts = sorted((a.rule, a.entity, a.state) for a in _alerts(config))
    assert replay_alerts == live_alerts
    assert any(rule == "traffic_incident" for rule, _, _ in replay_alerts)
    # not on the live alert topics: every change counted as dropped instead
    assert summary.alerts_dropped >= len(replay_alerts)


def _alerts(config: Config) -> list[Alert]:
    store = AlertStore(Path(config.analytics.alerts_db))
    try:
        return store.select()
    finally:
        store.close()


def _toml(config: Config) -> str:
    return (
        f'[nats]\nurls = ["{config.nats.urls[0]}"]\npartitions = {config.nats.partitions}\n'
        f'[influx]\nurl = "{config.influx.url}"\ndatabase = "{config.influx.database}"\n'
        f"[ingest]\nmax_past_s = {config.ingest.max_past_s}\n"
        f'[spool]\ndir = "{config.spool.dir}"\n'
        f'[analytics]\ncheckpoint_dir = "{config.analytics.checkpoint_dir}"\n'
        f'alerts_db = "{config.analytics.alerts_db}"\n'
        "[metrics]\nenabled = false\n"
    )


def test_the_command_replays_only_what_arrived_since_and_one_partition(
    nats_node: LocalNats, influxdb: LocalInfluxDB, tmp_path: Path
) -> None:
    """`cityflux replay --from-stream --since`: readings that arrived before the cut are not
    replayed; --partition takes one partition's; progress and a summary line."""
    live = nats_config([nats_node.url], influxdb, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    asyncio.run(init(live))
    assert nats_node.mqtt_port is not None
    early = mixed_stream(1_000, devices=200, seed=1)
    publish_all(nats_node.mqtt_port, early)
    time.sleep(2.0)
    cut = time.time()
    time.sleep(1.0)
    late = mixed_stream(2_000, devices=300, seed=2)
    publish_all(nats_node.mqtt_port, late)
    wait_for(lambda: stream_messages(live) >= 3_000, 30, "the stream has all")
    config_file = tmp_path / "cityflux.toml"
    config_file.write_text(_toml(live))
    runner = CliRunner()

    def replay(database: str, *extra: str) -> Any:
        since = f"{time.time() - cut:.3f}s"
        args = ["replay", "--from-stream", "--since", since, "--database", database, *extra]
        args += ["--state-dir", str(tmp_path / database), "--config", str(config_file)]
        return runner.invoke(app, args, env={})

    database = f"test_cut_{uuid.uuid4().hex[:8]}"
    result = replay(database)
    assert result.exit_code == 0, result.output
    assert "replaying the stream since" in result.output  # the progress line
    assert "replayed 2,000 messages (stream 1001..3000)" in result.output
    assert influx_count(influxdb, database) == points_in(late)

    # the same database again: refused (it has data) unless --replace
    again = replay(database)
    assert again.exit_code == 2
    assert "holds data already" in again.output
    replaced = replay(database, "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert influx_count(influxdb, database) == points_in(late)

    # never the live database
    refused = replay(live.influx.database)
    assert refused.exit_code == 2 and "live database" in refused.output

    partition = 3
    mine = [m for m in late if partition_of(m[0].split("/")[2], PARTITIONS) == partition]
    assert 0 < len(mine) < len(late)
    one = f"test_part_{uuid.uuid4().hex[:8]}"
    result = replay(one, "--partition", str(partition))
    assert result.exit_code == 0, result.output
    assert f"replayed {len(mine):,} messages" in result.output
    assert influx_count(influxdb, one) == points_in(mine)


def test_a_lost_consumer_is_recreated_and_every_message_handed_over_once(
    nats_node: LocalNats, tmp_path: Path
) -> None:
    """The replay's consumer deleted mid-range (its server restarted, or it idled out): the
    source re-creates it after the last message it handed over; nothing twice, nothing lost."""
    config = Config().with_overrides(
        {"nats.urls": [nats_node.url], "nats.partitions": PARTITIONS, "ingest.batch_size": 1_000}
    )
    asyncio.run(init(config))
    assert nats_node.mqtt_port is not None
    messages = mixed_stream(20_000, devices=500, seed=3)
    publish_all(nats_node.mqtt_port, messages)
    wait_for(lambda: stream_messages(config) >= len(messages), 30, "the stream has all")
    source = ReplaySource(config, since_s=600)
    source.start(10)
    taken: list[tuple[str, bytes]] = []
    try:
        # nobody takes: the source stops pulling at batch_size x (write_concurrency + 2)
        wait_for(lambda: source.stats.delivered >= 4_000, 20, "the source's buffer full")
        first_consumer = source._consumer
        asyncio.run(_delete(config, first_consumer or ""))
        while not source.done():
            batch = source.take(1_000, 0.2)
            taken += zip(batch.topics, batch.payloads, strict=True)
            source.ack(batch)
    finally:
        source.stop()
    assert source.stats.resets >= 1 and source._consumer != first_consumer
    assert len(taken) == len(messages)
    assert Counter(taken) == Counter(messages)  # each once
    assert source.stats.delivered == source.stats.settled == len(messages)


async def _delete(config: Config, consumer: str) -> None:
    nc = await connect(config.nats, "test-delete", wait_s=10)
    try:
        await js_request(nc, f"$JS.API.CONSUMER.DELETE.{config.nats.stream}.{consumer}")
    finally:
        await nc.close()
