"""Fixtures: real mosquitto, InfluxDB 1.x, VictoriaMetrics and NATS, started as child processes.

A missing server binary fails the test loudly with the install command (ServerError), never a
skip. InfluxDB and VictoriaMetrics run once per session (each test gets its own database);
mosquitto runs per test, because tests restart and kill it; so do NATS and the 3-node NATS
cluster (tests create streams and kill nodes).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityflux.config import Config
from cityflux.servers import LocalInfluxDB, LocalMosquitto, LocalVictoriaMetrics
from cityflux.servers_nats import LocalNats, LocalNatsCluster
from cityflux.store.influx import InfluxWriter

TEN_YEARS_S = 10 * 365 * 24 * 3600

# Tests whose assertions hang on wall-clock timing or pacing (node id prefixes): `make test`
# runs them in a pass of their own, alone, after the rest ran in parallel (pytest-xdist).
SERIAL = (
    "tests/integration/test_nats_",  # kill -9 and failover deadlines; paced 1-vs-3 workers
    "tests/integration/test_scenarios_e2e.py::test_a_paced_run_keeps_to_its_clock",  # wall_s
    "tests/integration/test_alerts_mqtt.py::test_an_idle_device_link",  # 2.5 x keepalive
    "tests/adversarial/test_malformed_broker.py::test_server_keep_alive_replaces_ours",  # < 2 s
    "tests/adversarial/test_oversize.py::test_maximum_packet_size",  # two $SYS intervals
    "tests/adversarial/test_exit.py",  # publishes 1 s after starting `cityflux run`
    # the recorder (its own process) must keep up with cityflux before the test's Ctrl-C:
    # under the parallel pass it was 1,333 of 5,816 messages behind (CI, 2026-11-30)
    "tests/integration/test_record_replay.py::test_recorded_simulation_replays",
    "tests/unit/test_engine_edges.py::test_window_results_whose_write_fails",  # 0.5 s wake-ups
    "tests/unit/test_engine_edges.py::test_a_late_update_is_written_after",  # "by now": 0.5 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)


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
def nats_node(tmp_path: Path) -> Iterator[LocalNats]:
    """One nats-server with JetStream and an MQTT listener, per test (tests create streams)."""
    with LocalNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[LocalNatsCluster]:
    """Three routed nats-servers (JetStream, MQTT), per test: tests kill -9 and restart nodes,
    and a cluster is ready in about half a second, so no test inherits another's damage."""
    with LocalNatsCluster(tmp_path / "nats-cluster") as cluster:
        yield cluster


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
