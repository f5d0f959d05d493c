"""Nothing lost: kill -9 of ingest, InfluxDB down under load, a full spool, broker restarts.

Every published message carries a distinct (device, timestamp), so "exactly N points in
InfluxDB" means each of the N readings arrived once (a redelivered duplicate overwrites itself).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB, LocalMosquitto, free_port
from cityflux.store.influx import InfluxWriter
from tests.support import count_points, publish_all, running, start_ingest_process, wait_for

START_MS = int(time.time() * 1000) - 3_600_000  # an hour ago: all readings are in the past


def readings(n: int, devices: int = 50, offset: int = 0) -> list[tuple[str, bytes]]:
    """n pole readings, round-robin over devices, each with a unique timestamp per device."""
    return [
        (
            f"cityflux/v1/centre/pole/pole-{i % devices:04d}",
            f'{{"ts": {START_MS + offset + i}, "pm25_ugm3": {i % 500}.5}}'.encode(),
        )
        for i in range(n)
    ]


def publish_in_background(port: int, messages: list[tuple[str, bytes]]) -> threading.Thread:
    thread = threading.Thread(target=publish_all, args=(port, messages), daemon=True)
    thread.start()
    return thread


def test_kill_9_during_publishing_loses_nothing(
    broker: LocalMosquitto, config: Config, db: InfluxWriter, tmp_path: Path
) -> None:
    n = 20_000
    log = tmp_path / "ingest.log"
    config = config.with_overrides({"metrics.port": free_port()})
    process = start_ingest_process(config, log)
    try:
        wait_for(
            lambda: count_points(db, "cityflux_pipeline", "messages_received_total"),
            what="ingest up (first health point)",
        )
        publisher = publish_in_background(broker.port, readings(n))
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") > n // 10, what="some ingested")
        process.kill()  # SIGKILL: no chance to flush or ack anything in hand
        process.wait(10)
        landed_before_restart = count_points(db, "pole", "pm25_ugm3")
        process = start_ingest_process(config, log)
        publisher.join(120)
        assert not publisher.is_alive()
        wait_for(
            lambda: count_points(db, "pole", "pm25_ugm3") >= n, timeout=120, what=f"{n} points"
        )
        time.sleep(1.0)  # would anything extra arrive?
        assert count_points(db, "pole", "pm25_ugm3") == n
        assert landed_before_restart < n, "the kill came too late to test anything"
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture
def own_influxdb(tmp_path: Path) -> Iterator[LocalInfluxDB]:
    """An InfluxDB this test may stop and start again (same port, same data)."""
    with LocalInfluxDB(tmp_path / "influxdb") as server:
        yield server


def _own_db_config(config: Config, influx: LocalInfluxDB, **overrides: object) -> Config:
    return config.with_overrides({"influx.url": influx.url, "influx.retry_max_s": 0.2, **overrides})


def test_influxdb_outage_under_load_goes_through_the_spool(
    broker: LocalMosquitto, config: Config, own_influxdb: LocalInfluxDB
) -> None:
    n = 10_000
    config = _own_db_config(config, own_influxdb)
    db = InfluxWriter(config.influx)
    with running(Pipeline(config)) as pipeline:
        publisher = publish_in_background(broker.port, readings(n))
        wait_for(lambda: pipeline.metrics.value("lines_written_total") > 500, what="writes")
        own_influxdb.stop()
        wait_for(lambda: pipeline.metrics.value("lines_spooled_total") > 1_000, what="spooling")
        publisher.join(120)
        spooled = pipeline.metrics.value("lines_spooled_total")
        own_influxdb.start()
        wait_for(lambda: pipeline.spool.empty, timeout=60, what="spool drained")
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= n, timeout=60, what=f"{n} points")
        acked = pipeline.metrics.value("messages_acked_total")
    assert count_points(db, "pole", "pm25_ugm3") == n
    assert spooled > 1_000
    assert acked >= n


def test_full_spool_holds_acks_and_the_broker_keeps_the_rest(
    broker: LocalMosquitto, config: Config, own_influxdb: LocalInfluxDB
) -> None:
    n = 6_000
    config = _own_db_config(
        config,
        own_influxdb,
        **{"spool.max_bytes": 20_000, "ingest.batch_size": 200},
    )
    db = InfluxWriter(config.influx)
    db.ensure_database()
    own_influxdb.stop()
    with running(Pipeline(config)) as pipeline:
        publish_all(broker.port, readings(n))
        wait_for(lambda: pipeline.metrics.value("spool_full") == 1, what="spool full")
        held = n - pipeline.metrics.value("messages_acked_total")
        healthz = pipeline.health()
        own_influxdb.start()
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= n, timeout=90, what=f"{n} points")
        assert pipeline.metrics.value("spool_full") == 0
    assert held > 0  # back-pressure: messages stayed unacknowledged with the broker
    assert healthz["spool_full"] is True and healthz["healthy"] is False
    assert count_points(db, "pole", "pm25_ugm3") == n


def test_broker_restart_loses_nothing_of_the_persistent_session(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    n = 3_000
    with running(Pipeline(config)):
        publish_all(broker.port, readings(n))
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= n, what="first batch")
    # cityflux is away; messages queue in its persistent session; the broker restarts
    publish_all(broker.port, readings(n, offset=n))
    broker.stop()
    broker.start()
    with running(Pipeline(config)) as pipeline:
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= 2 * n, what="queued batch")
        # and while cityflux runs: the broker restarts under it, cityflux reconnects
        broker.stop()
        broker.start()
        wait_for(pipeline.source.is_connected, what="reconnect")
        publish_all(broker.port, readings(n, offset=2 * n))
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= 3 * n, what="third batch")
    assert count_points(db, "pole", "pm25_ugm3") == 3 * n


def test_spool_survives_a_restart_and_drains(
    broker: LocalMosquitto, config: Config, own_influxdb: LocalInfluxDB
) -> None:
    n = 2_000
    config = _own_db_config(config, own_influxdb)
    db = InfluxWriter(config.influx)
    db.ensure_database()
    own_influxdb.stop()
    with running(Pipeline(config)) as pipeline:
        publish_all(broker.port, readings(n))
        wait_for(lambda: pipeline.metrics.value("messages_acked_total") >= n, what="all spooled")
        spooled = len(pipeline.spool)
    assert spooled > 0  # acknowledged because they are on disk, not in the database
    own_influxdb.start()
    with running(Pipeline(config)) as restarted:  # a new process would find the same files
        wait_for(lambda: restarted.spool.empty, timeout=60, what="spool drained")
        wait_for(lambda: count_points(db, "pole", "pm25_ugm3") >= n, what=f"{n} points")
    assert count_points(db, "pole", "pm25_ugm3") == n
