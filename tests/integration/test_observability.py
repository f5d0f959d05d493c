"""/metrics and /healthz over HTTP, the health measurement in InfluxDB, and shared workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto, free_port
from cityflux.store.influx import InfluxWriter
from tests.support import (
    ROOT,
    config_env,
    count_points,
    publish_all,
    running,
    select,
    wait_for,
)

NOW_MS = int(time.time() * 1000) - 60_000


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening (yet)


def test_metrics_healthz_and_health_points(
    broker: LocalMosquitto, config: Config, db: InfluxWriter
) -> None:
    good = [
        ("cityflux/v1/d1/pole/p1", f'{{"ts": {NOW_MS + i}, "noise_dba": 50}}'.encode())
        for i in range(30)
    ]
    bad = [("cityflux/v1/d1/pole/p1", b"not json")] * 3
    with running(Pipeline(config)) as pipeline:
        assert pipeline.server is not None
        base = f"http://127.0.0.1:{pipeline.server.port}"
        publish_all(broker.port, good + bad)
        wait_for(lambda: pipeline.metrics.value("messages_acked_total") >= 33, what="acks")
        status, text = get(f"{base}/metrics")
        health_status, health = get(f"{base}/healthz")
        missing_status = get(f"{base}/nowhere")[0]
        rows = wait_for(
            lambda: [
                r
                for r in select(db, "SELECT * FROM cityflux_pipeline")
                if r["readings_accepted_total.pole"] == 30.0
            ],
            what="a health point with the counts",
        )
    assert status == 200
    assert 'cityflux_readings_accepted_total{kind="pole"} 30.0' in text
    assert 'cityflux_rejections_total{reason="invalid_json"} 3.0' in text
    assert "cityflux_write_seconds_count" in text
    assert "cityflux_spool_records 0.0" in text
    assert health_status == 200
    assert json.loads(health)["mqtt_connected"] is True
    assert rows[-1]["rejections_total.invalid_json"] == 3.0
    assert rows[-1]["worker"] == config.mqtt.client_id
    assert missing_status == 404


def test_workers_share_the_subscription(
    broker: LocalMosquitto, config: Config, db: InfluxWriter, tmp_path: Path
) -> None:
    n = 4_000
    config = config.with_overrides({"metrics.port": free_port()})
    log = (tmp_path / "workers.log").open("wb")
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "cityflux", "run", "--workers", "2"],
        env=config_env(config),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        ports = [config.metrics.port, config.metrics.port + 1]
        wait_for(
            lambda: all(get(f"http://127.0.0.1:{p}/healthz")[0] == 200 for p in ports),
            what="both workers healthy",
        )
        publish_all(
            broker.port,
            [
                (
                    f"cityflux/v1/d1/pole/p{i % 20}",
                    f'{{"ts": {NOW_MS + i}, "noise_dba": 50}}'.encode(),
                )
                for i in range(n)
            ],
        )
        wait_for(lambda: count_points(db, "pole", "noise_dba") >= n, what="all points")
        per_worker = [_accepted(get(f"http://127.0.0.1:{port}/metrics")[1]) for port in ports]
    finally:
        supervisor.terminate()
        supervisor.wait(20)
        log.close()
    assert count_points(db, "pole", "noise_dba") == n
    assert sum(per_worker) == n
    assert min(per_worker) > 0, per_worker  # both took a share
    assert supervisor.returncode == 0
    # round-robin workers cannot window a road: analytics are off, and the log says so
    assert "analytics are off with --workers 2" in (tmp_path / "workers.log").read_text()


def _accepted(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith('cityflux_readings_accepted_total{kind="pole"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no accepted counter")
