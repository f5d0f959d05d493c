"""Alerts over MQTT and from the CLI, against a real broker and a running pipeline: a change
is published retained, an acknowledgement over MQTT or `cityflux alerts ack` marks it, and a
restarted cityflux keeps the alert instead of raising it again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgspec

from cityflux.analytics.alerts import AlertStore
from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from tests.support import ROOT, Subscriber, config_env, mosquitto_pub, running, wait_for

MANHOLE = "cityflux/v1/riverside/manhole/mh-0042"  # in examples/city-map.json


def open_cover(port: int, ts_ms: int, is_open: bool = True) -> None:
    reading = {"ts": ts_ms, "cover_open": is_open, "tilt_deg": 20.0 if is_open else 1.0}
    mosquitto_pub(port, MANHOLE, msgspec.json.encode(reading))


def alerts(subscriber: Subscriber) -> list[dict]:
    return [m for m in subscriber.decoded() if m.get("rule") == "manhole_cover_open"]


def test_alert_published_acknowledged_over_mqtt_and_kept_across_restart(
    config: Config, broker: object
) -> None:
    port = config.mqtt.port
    now_ms = time.time_ns() // 1_000_000
    watcher = Subscriber(port, "cityflux/v1/alerts/#")
    try:
        with running(Pipeline(config)):
            open_cover(port, now_ms)
            raised = wait_for(lambda: alerts(watcher), what="the cover-open alert on MQTT")[0]
            assert raised["state"] == "active" and raised["entity"] == "mh-0042"
            assert raised["district"] == "riverside" and raised["severity"] == "critical"
            ack = msgspec.json.encode({"id": raised["id"], "by": "ops-7"})
            mosquitto_pub(port, "cityflux/v1/alerts/ack", ack)
            wait_for(lambda: any(a["acknowledged"] for a in alerts(watcher)), what="the ack")
        store = AlertStore(config.analytics.alerts_db)
        (stored,) = store.select("rule='manhole_cover_open'")
        store.close()
        assert stored.acknowledged and stored.acknowledged_by == "ops-7"
        assert stored.state == "active"
        # restart: the alert carries on (one alert, updated), then clears when the cover closes
        with running(Pipeline(config)):
            open_cover(port, now_ms + 60_000)
            open_cover(port, now_ms + 120_000, is_open=False)
            wait_for(lambda: any(a["state"] == "cleared" for a in alerts(watcher)),
                     what="the alert cleared")  # fmt: skip
        store = AlertStore(config.analytics.alerts_db)
        (final,) = store.select("rule='manhole_cover_open'")
        store.close()
        assert final.id == stored.id and final.state == "cleared" and final.count == 2
        assert final.acknowledged  # the acknowledgement survived the restart
    finally:
        watcher.close()


def test_cli_lists_and_acknowledges(config: Config, tmp_path: Path) -> None:
    port = config.mqtt.port
    with running(Pipeline(config)) as pipeline:
        open_cover(port, time.time_ns() // 1_000_000)
        wait_for(lambda: pipeline.analytics and pipeline.analytics.engine.alerts.store.select(),
                 what="an alert in the database")  # fmt: skip
        env = config_env(config)
        listed = subprocess.run(
            [sys.executable, "-m", "cityflux", "alerts", "list", "--json"],
            cwd=ROOT, env=env, capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        listed_alerts = [msgspec.json.decode(line) for line in listed.stdout.splitlines()]
        (alert,) = [a for a in listed_alerts if a["rule"] == "manhole_cover_open"]
        assert alert["rule"] == "manhole_cover_open" and not alert["acknowledged"]
        acked = subprocess.run(
            [sys.executable, "-m", "cityflux", "alerts", "ack", str(alert["id"]), "--by", "cli"],
            cwd=ROOT, env=env, capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        assert b"acknowledged by cli and sent to the broker" in acked.stdout + acked.stderr
        # the running engine got the MQTT acknowledgement too
        wait_for(lambda: any(t.alert and t.alert.acknowledged
                             for t in pipeline.analytics.engine.alerts.trackers[
                                 "manhole_cover_open"].values()),
                 what="the engine saw the ack")  # fmt: skip
    missing = subprocess.run(
        [sys.executable, "-m", "cityflux", "alerts", "ack", "999"],
        cwd=ROOT, env=config_env(config), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 1 and b"no alert 999" in missing.stdout + missing.stderr


def test_an_idle_device_link_stays_connected_until_its_outage(broker: object) -> None:
    """A simulated device waiting for its outage sends keepalive pings: its will must fire
    when the outage starts, not when the broker gives up on a silent client."""
    from cityflux.mqtt.publisher import DeviceLinks

    port = broker.port  # type: ignore[attr-defined]
    mqtt = (
        Config()
        .with_overrides({"mqtt.url": f"mqtt://127.0.0.1:{port}", "mqtt.keepalive_s": 2})
        .mqtt
    )
    status = "cityflux/v1/centre/pole/pole-9/status"
    watcher = Subscriber(port, status)
    links = DeviceLinks(mqtt, "keepalive-test")
    try:
        links.connect(9, status, b'{"state":"online"}')
        time.sleep(5)  # 2.5 x keepalive without a message from the device
        states = [m.get("state") for m in watcher.decoded()]
        assert "offline" not in states
        links.drop(9)
        wait_for(lambda: "offline" in [m.get("state") for m in watcher.decoded()], what="will")
    finally:
        links.close()
        watcher.close()
