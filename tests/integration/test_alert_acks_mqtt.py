"""The MQTT acknowledgement path follows the CLI's rule: an ack for an alert another operator
acknowledged is logged and not applied unless it says ``force`` (a real broker and pipeline)."""

from __future__ import annotations

import logging
import time

import msgspec
import pytest

from cityflux.analytics.alerts import AlertStore
from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from tests.integration.test_alerts_mqtt import alerts, open_cover
from tests.support import Subscriber, mosquitto_pub, running, wait_for

ACK_TOPIC = "cityflux/v1/alerts/ack"


def test_a_second_operator_over_mqtt_needs_force(
    config: Config, broker: object, caplog: pytest.LogCaptureFixture
) -> None:
    port = config.mqtt.port
    watcher = Subscriber(port, "cityflux/v1/alerts/#")
    try:
        with running(Pipeline(config)):
            open_cover(port, time.time_ns() // 1_000_000)
            alert_id = wait_for(lambda: alerts(watcher), what="the alert")[0]["id"]
            mosquitto_pub(port, ACK_TOPIC, msgspec.json.encode({"id": alert_id, "by": "ops-1"}))
            wait_for(lambda: any(a["acknowledged_by"] == "ops-1" for a in alerts(watcher)),
                     what="ops-1's ack on MQTT")  # fmt: skip
            with caplog.at_level(logging.WARNING, logger="cityflux.pipeline.analytics_link"):
                refused = {"id": alert_id, "by": "ops-2"}
                mosquitto_pub(port, ACK_TOPIC, msgspec.json.encode(refused))
                forced = {"id": alert_id, "by": "ops-3", "force": True}
                mosquitto_pub(port, ACK_TOPIC, msgspec.json.encode(forced))
                # one topic, QoS 1: once ops-3's is applied, ops-2's has been handled
                wait_for(lambda: any(a["acknowledged_by"] == "ops-3" for a in alerts(watcher)),
                         what="ops-3's forced ack on MQTT")  # fmt: skip
        assert "refused: already acknowledged by ops-1" in caplog.text
        assert not any(a["acknowledged_by"] == "ops-2" for a in alerts(watcher))
        store = AlertStore(config.analytics.alerts_db)
        (stored,) = store.select("rule='manhole_cover_open'")
        history = [(r.by, r.forced) for r in store.acknowledgements(stored.id)]
        store.close()
        assert stored.acknowledged_by == "ops-3" and stored.acknowledged_ns > 0
        assert history == [("ops-1", False), ("ops-3", True)]
    finally:
        watcher.close()
