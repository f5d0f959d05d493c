"""A hostile device tries to forge operator messages through the broker as shipped.

Reproduced against the old ACL (`pattern write cityflux/v1/+/pole/%u`): the `+` could be
`alerts`, so a device published a retained forged alert that every operator subscription
received, and it could write into any number of invented districts. With the shipped roles
and the device accounts generated from the city map, the real mosquitto refuses each attempt
(MQTT 5: PUBACK 0x87) and operators receive nothing, live or retained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.integration.shipped_mosquitto import (
    NOT_AUTHORIZED,
    PASSWORDS,
    Client,
    ShippedMosquitto,
    make_auth,
)
from tests.support import wait_for

DEVICE = "pole-0001"  # district "centre" in examples/city-map.json
FORGED = b'{"id": 1, "rule": "manhole_cover_open", "state": "cleared", "by": "pole-0001"}'
ATTEMPTS = [
    ("cityflux/v1/alerts/centre/manhole_cover_open/mh-0042", True),  # a retained forged alert
    ("cityflux/v1/alerts/pole/pole-0001", True),  # the old pattern's `+` = alerts
    ("cityflux/v1/alerts/ack", False),  # acknowledge someone's alert
    ("cityflux/v1/deadletter/schema", False),
    ("cityflux/v1/deadletter/pole/pole-0001", False),
    ("cityflux/v1/health/cityflux/status", True),  # fake cityflux's own last will
    ("cityflux/v1/health/pole/pole-0001", True),
    ("cityflux/v1/riverside/pole/pole-0001", False),  # another district of the map
    *[(f"cityflux/v1/d{n:04d}/pole/pole-0001", False) for n in range(50)],  # invented ones
    ("cityflux/v1/centre/pole/pole-0107", True),  # another device's topic
    ("cityflux/v1/centre/pole/pole-0107/status", True),
]
WATCHED = ("cityflux/v1/alerts/#", "cityflux/v1/deadletter/#", "cityflux/v1/health/#")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    with ShippedMosquitto(tmp_path / "mosquitto", make_auth(tmp_path)) as server:
        yield server


def test_a_device_cannot_forge_alerts_dead_letters_health_or_other_topics(
    broker: ShippedMosquitto,
) -> None:
    operator = Client(broker.port, "operator", PASSWORDS["operator"])
    service = Client(broker.port, "cityflux", PASSWORDS["cityflux"])
    device = Client(broker.port, DEVICE, PASSWORDS[DEVICE])
    try:
        operator.subscribe(*WATCHED)
        service.subscribe("cityflux/v1/#")
        codes = {topic: device.publish(topic, FORGED, retain) for topic, retain in ATTEMPTS}
        assert codes == {topic: NOT_AUTHORIZED for topic, _ in ATTEMPTS}
        # its own topic works, through the same connection
        assert device.publish("cityflux/v1/centre/pole/pole-0001", b'{"ts": 1}') == 0
        assert wait_for(lambda: service.topics, 10)
        time.sleep(1.0)  # a forged message, had it passed, arrives well within this
        assert operator.received == []
        assert service.topics == ["cityflux/v1/centre/pole/pole-0001"]
    finally:
        for client in (operator, service, device):
            client.close()
    # a console that connects later finds no retained forgery either
    late = Client(broker.port, "operator", PASSWORDS["operator"])
    try:
        late.subscribe(*WATCHED)
        time.sleep(1.0)
        assert late.received == []
    finally:
        late.close()


def test_mqtt_311_devices_are_dropped_silently_but_dropped(broker: ShippedMosquitto) -> None:
    """MQTT 3.1.1 cannot say no (the broker acknowledges and discards): the forged retained
    alert still never reaches an operator."""
    device = Client(broker.port, DEVICE, PASSWORDS[DEVICE], protocol=paho.MQTTv311)
    try:
        for topic, retain in ATTEMPTS[:6]:
            assert device.publish(topic, FORGED, retain) == 0  # acknowledged...
    finally:
        device.close()
    operator = Client(broker.port, "operator", PASSWORDS["operator"])
    try:
        operator.subscribe(*WATCHED)
        time.sleep(1.0)
        assert operator.received == []  # ...and dropped: nothing retained, nothing delivered
    finally:
        operator.close()


def test_the_old_pattern_acl_let_the_forgery_through(tmp_path: Path) -> None:
    """The failure itself, reproduced with the ACL line shipped before: this is what the
    tests above guard against (and why the shipped ACL has no `+` district pattern)."""
    auth = make_auth(tmp_path)
    acl = (auth / "acl").read_text()
    (auth / "acl").write_text(acl + "\npattern write cityflux/v1/+/pole/%u\n")
    with ShippedMosquitto(tmp_path / "old", auth) as server:
        device = Client(server.port, DEVICE, PASSWORDS[DEVICE])
        try:
            assert device.publish("cityflux/v1/alerts/pole/pole-0001", FORGED, True) == 0
        finally:
            device.close()
        operator = Client(server.port, "operator", PASSWORDS["operator"])
        try:
            operator.subscribe(*WATCHED)
            assert wait_for(lambda: operator.received, 10)
            assert operator.received == [("cityflux/v1/alerts/pole/pole-0001", FORGED, True)]
        finally:
            operator.close()
