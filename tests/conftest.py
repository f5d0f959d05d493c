"""Fixtures: real mosquitto, InfluxDB 1.x and VictoriaMetrics, started as child processes.

A missing server binary fails the test loudly with the install command (ServerError), never a
skip. InfluxDB and VictoriaMetrics run once per session (each test gets its own database);
mosquitto runs per test, because tests restart and kill it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityflux.config import Config
from cityflux.servers import LocalInfluxDB, LocalMosquitto, LocalVictoriaMetrics
from cityflux.store.influx import InfluxWriter

TEN_YEARS_S = 10 * 365 * 24 * 3600


@pytest.fixture(scope="session")
def influxdb() -> Iterator[LocalInfluxDB]:
    with LocalInfluxDB() as server:
        yield server


@pytest.fixture(scope="session")
def victoria() -> Iterator[LocalVictoriaMetrics]:
    with LocalVictoriaMetrics() as server:
        yield server


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalMosquitto]:
    with LocalMosquitto(tmp_path / "mosquitto") as server:
        yield server


@pytest.fixture
def config(broker: LocalMosquitto, influxdb: LocalInfluxDB, tmp_path: Path) -> Config:
    """A config for this test: its own database, spool and client id; ephemeral metrics port.

    The documented example payloads carry fixed timestamps, so the past window is wide.
    """
    name = f"test_{uuid.uuid4().hex[:12]}"
    return Config().with_overrides(
        {
            "mqtt.url": broker.url,
            "mqtt.client_id": f"cityflux-{name}",
            "influx.url": influxdb.url,
            "influx.database": name,
            "influx.max_retries": 1,
            "ingest.max_past_s": TEN_YEARS_S,
            "spool.dir": str(tmp_path / "spool"),
            "analytics.checkpoint_dir": str(tmp_path / "analytics"),
            "analytics.alerts_db": str(tmp_path / "analytics" / "alerts.sqlite"),
            "metrics.port": 0,
            "metrics.health_interval_s": 1.0,
        }
    )


@pytest.fixture
def db(config: Config) -> Iterator[InfluxWriter]:
    """A writer on the test's database, for queries."""
    writer = InfluxWriter(config.influx)
    writer.ensure_database()
    yield writer
    writer.query(f'DROP DATABASE "{config.influx.database}"', method="POST")
    writer.close()
