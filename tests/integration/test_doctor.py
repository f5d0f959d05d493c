"""`cityflux doctor` against real servers: a stock mosquitto, one sized like the shipped
deploy/mosquitto/mosquitto.conf, and InfluxDB 1.x."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from cityflux.cli import app
from cityflux.config import Config
from cityflux.servers import LocalInfluxDB, LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import ROOT, select, wait_for

PROBE = "broker queue limit (probe)"


def stock_broker(directory: Path, extra: str = "") -> LocalMosquitto:
    """mosquitto's default limits: 20 in flight, 1,000 queued per client, no byte limit."""
    return LocalMosquitto(directory, max_inflight=20, max_queued=1_000, extra_config=extra)


def shipped_sizes_broker(directory: Path) -> LocalMosquitto:
    """The limits of deploy/mosquitto/mosquitto.conf, read from the file itself."""
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    sizes = dict(re.findall(r"^(max_\w+) (\d+)$", conf, flags=re.MULTILINE))
    assert sizes["max_queued_bytes"] == "0"  # what LocalMosquitto's own template sets
    return LocalMosquitto(
        directory,
        max_inflight=int(sizes["max_inflight_messages"]),
        max_queued=int(sizes["max_queued_messages"]),
        extra_config=f"max_packet_size {sizes['max_packet_size']}\nsys_interval 1\n",
    )


def doctor(config: Config, tmp_path: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run `cityflux doctor --json` on ``config``; (exit code, findings by check)."""
    path = tmp_path / "doctor.toml"
    mqtt, influx = config.mqtt, config.influx
    path.write_text(
        f'[mqtt]\nurl = "{mqtt.url}"\nprotocol = "{mqtt.protocol}"\n'
        f'client_id = "{mqtt.client_id}"\n'
        f'[influx]\nurl = "{influx.url}"\ndatabase = "{influx.database}"\n'
        f'[spool]\ndir = "{config.spool.dir}"\n'
    )
    result = CliRunner().invoke(app, ["doctor", "-c", str(path), "--json", *args], env={})
    findings = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert findings, result.output
    return result.exit_code, {f["check"]: f for f in findings}


def test_a_stock_broker_fails_the_queue_probe(
    tmp_path: Path, config: Config, db: InfluxWriter
) -> None:
    with stock_broker(tmp_path / "stock", "sys_interval 1\n") as broker:
        config = config.with_overrides({"mqtt.url": broker.url})
        code, found = doctor(config, tmp_path)
        assert code == 1
        assert found[PROBE]["level"] == "loss"
        assert "kept 1000 of 1500" in found[PROBE]["detail"]
        assert "max_queued_messages 2000000" in found[PROBE]["fix"]
        assert found["broker dropped messages"]["level"] == "ok"  # read before the probe
        assert found["database retention"]["level"] == "ok"
        assert found["database writable"]["level"] == "ok"
        assert select(db, 'SELECT "probe" FROM "cityflux_doctor"')[0]["probe"] == 1
        assert found["spool"]["level"] == "ok"

        # the probe's own 500 excess messages were dropped: the broker's counter says so now
        def dropped() -> dict[str, Any] | None:
            found = doctor(config, tmp_path, "--no-probe")[1]["broker dropped messages"]
            return found if found["level"] == "loss" else None

        finding = wait_for(dropped, timeout=15, what="the broker's dropped counter")
        assert "dropped 500 messages" in finding["detail"]


def test_a_broker_sized_as_shipped_passes(tmp_path: Path, config: Config, db: InfluxWriter) -> None:
    with shipped_sizes_broker(tmp_path / "sized") as broker:
        code, found = doctor(config.with_overrides({"mqtt.url": broker.url}), tmp_path)
    assert found[PROBE] == {
        "level": "ok",
        "check": PROBE,
        "detail": "the broker kept all 1500 messages for an offline session",
        "fix": "",
    }
    assert found["broker in-flight limit"]["detail"].startswith("broker Receive Maximum 50000")
    assert "broker maximum packet size" not in found
    assert [f["check"] for f in found.values() if f["level"] == "loss"] == []
    assert code == 0


def test_3_1_1_small_packets_and_finite_retention(
    tmp_path: Path, config: Config, db: InfluxWriter, influxdb: LocalInfluxDB
) -> None:
    database = config.influx.database
    db.query(f'CREATE RETENTION POLICY "week" ON "{database}" DURATION 7d REPLICATION 1 DEFAULT')
    with stock_broker(tmp_path / "stock", "max_packet_size 100000\n") as broker:
        config = config.with_overrides({"mqtt.url": broker.url, "mqtt.protocol": "3.1.1"})
        code, found = doctor(config, tmp_path, "--no-probe")
    assert code == 1
    assert found["mqtt.protocol"]["level"] == "warning"
    inflight = found["broker in-flight limit"]
    assert inflight["level"] == "loss"
    assert "allows 20 messages in flight" in inflight["detail"]
    assert inflight["fix"].endswith("max_inflight_messages 50000")
    packet = found["broker maximum packet size"]
    assert packet["level"] == "loss"
    assert "over 100000 bytes" in packet["detail"]
    assert packet["fix"].endswith("max_packet_size 1048576")
    retention = found["database retention"]
    assert retention["level"] == "warning"
    assert f"{database}.week deletes readings older than 168h0m0s" in retention["detail"]
    assert PROBE not in found


def test_unreachable_database_and_unwritable_spool(tmp_path: Path, config: Config) -> None:
    blocker = tmp_path / "a-file"  # a spool "directory" under a file: unwritable, even for root
    blocker.write_text("")
    config = config.with_overrides(
        {"influx.url": "http://127.0.0.1:9", "spool.dir": str(blocker / "spool")}
    )
    code, found = doctor(config, tmp_path, "--no-probe")
    assert code == 1
    assert found["database"]["level"] == "loss"
    assert "does not answer /ping" in found["database"]["detail"]
    assert found["spool directory"]["level"] == "loss"
    assert "cannot write in" in found["spool directory"]["detail"]
