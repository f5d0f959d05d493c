"""The broker configuration shipped in deploy/mosquitto/, run by a real mosquitto: the
committed mosquitto.conf (only its ports and paths moved to a temporary directory), the
committed roles ACL plus the device accounts generated from the city map, and a password file
written by the committed make-auth.sh (tests/integration/shipped_mosquitto.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cityflux.config import Config
from cityflux.pipeline.pipeline import Pipeline
from cityflux.store.influx import InfluxWriter
from tests.integration.shipped_mosquitto import (
    NOT_AUTHORIZED,
    PASSWORDS,
    Client,
    ShippedMosquitto,
    make_auth,
)
from tests.support import count_points, running, wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    with ShippedMosquitto(tmp_path / "mosquitto", make_auth(tmp_path)) as server:
        yield server


@pytest.fixture
def clients(broker: ShippedMosquitto) -> Iterator[Any]:
    opened: list[Client] = []

    def connect(user: str, password: str | None = None) -> Client:
        client = Client(broker.port, user, password or PASSWORDS[user])
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def test_a_device_publishes_under_its_own_topic_in_its_own_district_only(clients: Any) -> None:
    cityflux = clients("cityflux")
    cityflux.subscribe("cityflux/v1/#")
    device = clients("pole-0001")  # in district "centre" of examples/city-map.json
    assert device.connect_code == 0
    assert device.publish("cityflux/v1/centre/pole/pole-0001") == 0
    assert device.publish("cityflux/v1/centre/pole/pole-0001/status") == 0
    # another district, another device, a deeper topic, another kind, cityflux's own levels
    refused = [
        "cityflux/v1/riverside/pole/pole-0001", "cityflux/v1/d999/pole/pole-0001",
        "cityflux/v1/centre/pole/pole-0107", "cityflux/v1/centre/pole/pole-0001/x",
        "cityflux/v1/centre/manhole/pole-0001", "cityflux/v1/centre/lamp/pole-0001",
        "cityflux/v1/deadletter/schema", "cityflux/v1/alerts/ack",
        "cityflux/v1/alerts/pole/pole-0001", "cityflux/v1/health/pole/pole-0001",
    ]  # fmt: skip
    for topic in refused:
        assert device.publish(topic) == NOT_AUTHORIZED, topic
    other = clients("pole-0107")  # riverside
    assert other.publish("cityflux/v1/riverside/pole/pole-0107") == 0
    assert other.publish("cityflux/v1/centre/pole/pole-0107") == NOT_AUTHORIZED
    assert wait_for(lambda: len(cityflux.received) >= 3, 5)
    time.sleep(0.5)  # anything refused would have arrived by now
    assert sorted(cityflux.topics) == [
        "cityflux/v1/centre/pole/pole-0001", "cityflux/v1/centre/pole/pole-0001/status",
        "cityflux/v1/riverside/pole/pole-0107",
    ]  # fmt: skip


def test_roles_write_their_own_topics_only(clients: Any) -> None:
    cityflux = clients("cityflux")
    assert cityflux.publish("cityflux/v1/deadletter/schema") == 0
    assert cityflux.publish("cityflux/v1/health/cityflux/status") == 0
    assert cityflux.publish("cityflux/v1/alerts/d01/lamp_fault/pole-0001") == 0
    assert cityflux.publish("cityflux/v1/centre/pole/pole-0001") == NOT_AUTHORIZED
    operator = clients("operator")
    assert operator.publish("cityflux/v1/alerts/ack") == 0
    assert operator.publish("cityflux/v1/alerts/centre/forged/x") == NOT_AUTHORIZED
    assert operator.publish("cityflux/v1/centre/pole/pole-0001") == NOT_AUTHORIZED
    simulator = clients("simulator")
    assert simulator.publish("cityflux/v1/centre/pole/pole-0107") == 0
    assert simulator.publish("cityflux/v1/any/traffic/det-9/status") == 0
    for topic in ("cityflux/v1/alerts/centre/x/y", "cityflux/v1/alerts/ack",
                  "cityflux/v1/deadletter/schema/x", "cityflux/v1/health/x/status"):  # fmt: skip
        assert simulator.publish(topic) == NOT_AUTHORIZED, topic


def test_the_service_account_reads_the_brokers_counters(clients: Any) -> None:
    """cityflux watches $SYS for messages the broker drops; operators do not see $SYS."""
    cityflux = clients("cityflux")
    cityflux.subscribe("$SYS/broker/uptime")
    operator = clients("operator")
    operator.subscribe("$SYS/broker/uptime")
    assert wait_for(lambda: "$SYS/broker/uptime" in cityflux.topics, 15)
    assert "$SYS/broker/uptime" not in operator.topics


def test_district_patterns_for_large_cities_keep_devices_to_their_own_id(
    tmp_path: Path,
) -> None:
    """`devices acl --mode district` (cities above 10,000 devices): own id only, only in the
    map's districts, never cityflux's levels; the one freedom left is another real district."""
    with ShippedMosquitto(tmp_path / "m", make_auth(tmp_path, mode="district")) as server:
        device = Client(server.port, "pole-0001", PASSWORDS["pole-0001"])
        try:
            assert device.publish("cityflux/v1/centre/pole/pole-0001") == 0
            assert device.publish("cityflux/v1/centre/pole/pole-0001/status") == 0
            assert device.publish("cityflux/v1/riverside/pole/pole-0001") == 0  # documented
            for topic in ("cityflux/v1/d999/pole/pole-0001", "cityflux/v1/centre/pole/pole-0107",
                          "cityflux/v1/alerts/pole/pole-0001", "cityflux/v1/alerts/ack",
                          "cityflux/v1/deadletter/pole/pole-0001"):  # fmt: skip
                assert device.publish(topic) == NOT_AUTHORIZED, topic
        finally:
            device.close()


def test_wrong_passwords_and_strangers_are_refused(clients: Any) -> None:
    # mosquitto answers "not authorized" (135) rather than "bad user name or password" (134)
    assert clients("pole-0001", "pw-pole-107").connect_code == NOT_AUTHORIZED
    assert clients("pole-9999", "whatever").connect_code == NOT_AUTHORIZED
    assert clients("pole-0001").connect_code == 0


def test_cityflux_ingests_through_the_shipped_broker_as_its_own_account(
    broker: ShippedMosquitto, config: Config, db: InfluxWriter, clients: Any
) -> None:
    """The real consumer under the ACL: it reads a device's reading, writes it to InfluxDB,
    and publishes the dead letter of a bad one and its own health, all allowed for it."""
    operator = clients("operator")
    operator.subscribe("cityflux/v1/#")
    run_config = config.with_overrides(
        {"mqtt.username": "cityflux", "mqtt.password": PASSWORDS["cityflux"]}
    )
    device = clients("pole-0001")
    with running(Pipeline(run_config)):
        ts = int(time.time() * 1000)
        good = device.client.publish(
            "cityflux/v1/centre/pole/pole-0001", f'{{"ts": {ts}, "noise_dba": 61.5}}', qos=1
        )
        good.wait_for_publish(10)
        device.client.publish("cityflux/v1/centre/pole/pole-0001", b"{not json", qos=1)
        assert wait_for(lambda: count_points(db, "pole", "noise_dba") == 1, 20)
        assert wait_for(
            lambda: any(t.startswith("cityflux/v1/deadletter/") for t in operator.topics), 20
        )
    assert any(t.startswith("cityflux/v1/health/") for t in operator.topics)
    # the operator does not read device readings
    assert not any("/pole/" in t for t in operator.topics)
