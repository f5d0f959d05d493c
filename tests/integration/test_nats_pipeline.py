"""The pipeline on the JetStream source (issue 12): devices publish MQTT to nats-server, the
server files their readings under partitions of their district, workers own partitions.
Real nats-server (one node, or three), real InfluxDB."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from bench.ingest import influx_count
from bench.stream import mixed_stream, points_in
from cityflux.config import Config
from cityflux.nats.admin import init
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalInfluxDB
from cityflux.servers_nats import LocalNats
from tests.conftest import TEN_YEARS_S
from tests.support import publish_all, wait_for


def nats_config(urls: list[str], influx: LocalInfluxDB, tmp: Path, name: str) -> Config:
    return Config().with_overrides(
        {
            "source.kind": "nats",
            "nats.urls": urls,
            "nats.partitions": 8,
            "nats.heartbeat_s": 0.5,
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
