"""What the broker drops is seen: its $SYS counters in /metrics, the broker_dropping alert."""

from __future__ import annotations

import logging
import subprocess
import time
import urllib.request
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityflux.analytics.alerts import AlertStore
from cityflux.config import Config, MqttConfig
from cityflux.observability import Metrics
from cityflux.pipeline.broker_stats import RULE, BrokerWatcher
from cityflux.pipeline.pipeline import Pipeline
from cityflux.servers import LocalMosquitto, require_binary
from cityflux.store.influx import InfluxWriter
from tests.support import (
    Subscriber,
    count_points,
    publish_all,
    running,
    select,
    wait_for,
)

NOW_MS = int(time.time() * 1000) - 60_000
BURST = 50_000
STOCK_QUEUE = 1_000  # mosquitto's default max_queued_messages


def stock_broker(directory: Path, extra: str = "", anonymous: bool = True) -> LocalMosquitto:
    """mosquitto's default limits, $SYS every second."""
    return LocalMosquitto(
        directory,
        max_inflight=20,
        max_queued=STOCK_QUEUE,
        anonymous=anonymous,
        extra_config="sys_interval 1\n" + extra,
    )


def readings(n: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"cityflux/v1/d1/manhole/mh-{i % 7}",
            f'{{"ts": {NOW_MS + i}, "battery_pct": 50}}'.encode(),
        )
        for i in range(n)
    ]


def metric(pipeline: Pipeline, name: str) -> float:
    """One sample from the pipeline's real /metrics endpoint (NaN if absent)."""
    assert pipeline.server is not None
    url = f"http://127.0.0.1:{pipeline.server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return float("nan")


def offline_session(port: int, client_id: str, topic: str) -> None:
    """A persistent MQTT 5 session subscribed to ``topic`` (QoS 1), left offline."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 600
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    client.loop_start()
    info = client.subscribe(topic, qos=1)
    wait_for(lambda: info[0] == 0 and client.is_connected(), what="subscription")
    time.sleep(0.2)  # the SUBACK
    client.disconnect()
    client.loop_stop()


def test_a_burst_while_cityflux_is_away_is_counted_and_alerted(
    tmp_path: Path, config: Config, db: InfluxWriter
) -> None:
    with stock_broker(tmp_path / "stock") as broker:
        config = config.with_overrides({"mqtt.url": broker.url})
        alerts = Subscriber(broker.port, "cityflux/v1/alerts/#")
        with running(Pipeline(config)) as pipeline:  # makes the session; sees 0 dropped
            wait_for(lambda: metric(pipeline, "cityflux_broker_stats_up") == 1, what="$SYS")
            assert metric(pipeline, "cityflux_broker_messages_dropped") == 0
            assert pipeline.health()["broker_dropping"] is False
        publish_all(broker.port, readings(BURST))  # cityflux is away: its queue overflows
        with running(Pipeline(config)) as pipeline:
            # $SYS values come every sys_interval: the retained one may be a second old
            wait_for(
                lambda: metric(pipeline, "cityflux_broker_messages_dropped") >= BURST - STOCK_QUEUE,
                what="the dropped counter in /metrics",
            )
            dropped = metric(pipeline, "cityflux_broker_messages_dropped")
            assert metric(pipeline, "cityflux_broker_dropping") == 1
            health = pipeline.health()
            assert health["broker_stats"] == "ok"
            assert health["broker_messages_dropped"] == dropped
            assert health["broker_dropping"] is True
            assert health["healthy"] is True  # a broker drop is an alert, not a reason to stop
            assert pipeline.drain(timeout_s=20, at_least=STOCK_QUEUE - 5), "the queued readings"
        # every reading that did not land is in the broker's counter; the counter also has the
        # few of cityflux's own messages (its online/offline status) that found the queue full
        landed = count_points(db, "manhole", "battery_pct")
        assert STOCK_QUEUE - 5 <= landed <= STOCK_QUEUE
        assert BURST - landed <= dropped <= BURST - landed + 5
        store = AlertStore(config.analytics.alerts_db)
        [alert] = store.select("rule=?", (RULE,))
        store.close()
        assert (alert.severity, alert.entity, alert.state) == ("critical", broker.url, "active")
        assert alert.value == dropped
        topic = f"cityflux/v1/alerts/-/{RULE}/127.0.0.1:{broker.port}"
        wait_for(lambda: any(t == topic for t, _ in alerts.messages), what="the MQTT alert")
        published = [msgspec.json.decode(p) for t, p in alerts.messages if t == topic]
        alerts.close()
        assert published[-1]["id"] == alert.id
        assert published[-1]["state"] == "active"
        # and in InfluxDB beside every other alert, for Grafana's alert panels
        rows = select(db, f"SELECT * FROM cityflux_alert WHERE \"rule\" = '{RULE}'")
        assert [(r["state"], r["alert_id"], r["entity"]) for r in rows] == [
            ("active", alert.id, broker.url)
        ]


def test_the_alert_clears_after_a_quiet_period_and_survives_a_restart(tmp_path: Path) -> None:
    with stock_broker(tmp_path / "stock") as broker:
        mqtt = MqttConfig(url=broker.url, client_id="watcher")
        alerts_db = tmp_path / "alerts.sqlite"
        metrics = Metrics()
        watcher = BrokerWatcher(mqtt, metrics, alerts_db, clear_after_s=2.0)
        watcher.start()
        try:
            wait_for(lambda: watcher.dropped == 0, what="the first dropped value")
            offline_session(broker.port, "slow-consumer", "probe/#")
            publish_all(broker.port, [("probe/x", b"0" * 100)] * 1_500)
            wait_for(
                lambda: watcher.dropped == 500 and metrics.value("broker_dropping") == 1,
                what="the alert",
            )
            assert watcher.health()["broker_dropping"] is True
            wait_for(lambda: metrics.value("broker_dropping") == 0, what="the clear")
            assert watcher.health()["broker_dropping"] is False
        finally:
            watcher.stop()
        store = AlertStore(alerts_db)
        [alert] = store.select("rule=?", (RULE,))
        store.close()
        assert (alert.state, alert.value) == ("cleared", 500)
        assert alert.cleared_ns - alert.started_ns >= 2e9
        # a restart sees the same 500 on the broker: already reported, nothing raised again
        again = BrokerWatcher(mqtt, Metrics(), alerts_db, clear_after_s=2.0)
        again.start()
        try:
            wait_for(lambda: again.dropped == 500, what="the dropped value after a restart")
            time.sleep(1.5)  # a $SYS interval or so
            assert again.health()["broker_dropping"] is False
        finally:
            again.stop()


def test_sys_denied_by_the_acl_is_said_once_and_ingest_goes_on(
    tmp_path: Path, config: Config, db: InfluxWriter, caplog: pytest.LogCaptureFixture
) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("")
    subprocess.run([require_binary("mosquitto_passwd"), "-b", str(passwd), "cityflux", "pw"],
                   check=True)  # fmt: skip
    acl.write_text("user cityflux\ntopic readwrite cityflux/v1/#\n")  # no $SYS
    extra = f"password_file {passwd}\nacl_file {acl}\n"
    with stock_broker(tmp_path / "broker", extra, anonymous=False) as broker:
        config = config.with_overrides(
            {"mqtt.url": broker.url, "mqtt.username": "cityflux", "mqtt.password": "pw"}
        )
        pipeline = Pipeline(config)
        assert pipeline.broker_stats is not None
        pipeline.broker_stats.silence_s = 1.0
        caplog.set_level(logging.WARNING, logger="cityflux.pipeline.broker_stats")
        with running(pipeline):
            wait_for(lambda: pipeline.health()["broker_stats"] == "denied", what="denied")
            subprocess.run(
                [require_binary("mosquitto_pub"), "-p", str(broker.port), "-u", "cityflux",
                 "-P", "pw", "-q", "1", "-t", "cityflux/v1/d1/manhole/mh-1",
                 "-m", f'{{"ts": {NOW_MS}, "battery_pct": 40}}'],
                check=True, timeout=20,
            )  # fmt: skip
            wait_for(lambda: count_points(db, "manhole", "battery_pct") == 1, what="a reading")
            assert pipeline.health()["healthy"] is True
            assert metric(pipeline, "cityflux_broker_stats_up") == 0
        said = [r.getMessage() for r in caplog.records if "$SYS" in r.getMessage()]
        assert len(said) == 1
        assert "topic read $SYS/#" in said[0]
        # a watcher the broker refuses: counted and in its health, retried, never raised
        wrong = BrokerWatcher(
            msgspec.structs.replace(config.mqtt, password="wrong"), Metrics(), tmp_path / "a.db"
        )
        wrong.start()
        try:
            wait_for(lambda: wrong.health()["broker_stats_errors"] >= 1, what="a counted refusal")
            health = wrong.health()
            assert health["broker_stats"].startswith("refused: Not authorized")
            assert health["broker_stats_last_error"] == health["broker_stats"]
        finally:
            wrong.stop()
