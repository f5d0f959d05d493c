"""The broker configuration shipped in deploy/mosquitto/, run by a real mosquitto: the
committed mosquitto.conf (only its port and paths moved to a temporary directory), the
committed ACL, and a password file written by the committed make-passwd.sh."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from cityflux.config import Config
from cityflux.ingest.pipeline import Pipeline
from cityflux.servers import LocalMosquitto
from cityflux.store.influx import InfluxWriter
from tests.support import ROOT, count_points, running, wait_for

MOSQUITTO = ROOT / "deploy" / "mosquitto"
PASSWORDS = {"cityflux": "pw-cityflux", "operator": "pw-operator", "simulator": "pw-sim",
             "pole-0001": "pw-pole-1", "pole-0002": "pw-pole-2"}  # fmt: skip
NOT_AUTHORIZED = 135
NO_SUBSCRIBERS = 16  # MQTT 5: accepted, nobody subscribed (a success code, below 128)


class ShippedMosquitto(LocalMosquitto):
    """deploy/mosquitto/mosquitto.conf with its port and file locations made local."""

    def __init__(self, data_dir: Path, passwd: Path) -> None:
        super().__init__(data_dir)
        self.passwd = passwd

    def command(self) -> list[str]:
        conf = (MOSQUITTO / "mosquitto.conf").read_text()
        conf = (
            conf.replace("listener 1883", f"listener {self.port} 127.0.0.1")
            .replace("/mosquitto/passwd/passwd", str(self.passwd))
            .replace("/mosquitto/config/acl", str(MOSQUITTO / "acl"))
            .replace("/mosquitto/data/", f"{self.data_dir}/")
        )
        import getpass

        conf += f"\nuser {getpass.getuser()}\nlog_dest file {self.log_file}\n"
        path = self.data_dir / "shipped.conf"
        path.write_text(conf)
        return ["mosquitto", "-c", str(path)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedMosquitto]:
    devices = tmp_path / "devices.txt"
    devices.write_text("pole-0001:pw-pole-1\npole-0002:pw-pole-2\n")
    passwd = tmp_path / "passwd"
    env = {
        **os.environ,
        "MQTT_CITYFLUX_PASSWORD": PASSWORDS["cityflux"],
        "MQTT_OPERATOR_PASSWORD": PASSWORDS["operator"],
        "MQTT_SIMULATOR_PASSWORD": PASSWORDS["simulator"],
        "MQTT_DEVICES_FILE": str(devices),
    }
    done = subprocess.run(["sh", str(MOSQUITTO / "make-passwd.sh"), str(passwd)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "wrote 5 accounts" in done.stdout
    assert "pw-" not in passwd.read_text()  # hashed, not the passwords
    with ShippedMosquitto(tmp_path / "mosquitto", passwd) as server:
        yield server


class Client:
    """An MQTT 5 client that records each publish's PUBACK reason code and what it receives."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.acks: dict[int, int] = {}
        self.received: list[str] = []
        self.connected = threading.Event()
        self.connect_code: int | None = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex,
                                  protocol=paho.MQTTv5)  # fmt: skip
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.received.append(m.topic)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.connected.wait(10)

    def _on_connect(self, c: Any, u: Any, flags: Any, code: ReasonCode, p: Any) -> None:
        self.connect_code = code.value
        self.connected.set()

    def _on_publish(self, c: Any, u: Any, mid: int, code: ReasonCode, p: Any) -> None:
        self.acks[mid] = code.value

    def publish(self, topic: str) -> int:
        """The broker's reason code for one QoS 1 publish, 0 for every success code."""
        mid = self.client.publish(topic, b'{"ts": 1}', qos=1).mid
        assert wait_for(lambda: mid in self.acks, 10)
        return 0 if self.acks[mid] == NO_SUBSCRIBERS else self.acks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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


def test_a_device_publishes_under_its_own_topic_only(clients: Any) -> None:
    cityflux = clients("cityflux")
    cityflux.client.subscribe("cityflux/v1/#", qos=1)
    assert wait_for(cityflux.client.is_connected, 5)
    device = clients("pole-0001")
    assert device.connect_code == 0
    assert device.publish("cityflux/v1/centre/pole/pole-0001") == 0
    assert device.publish("cityflux/v1/centre/pole/pole-0001/status") == 0
    assert device.publish("cityflux/v1/riverside/pole/pole-0001") == 0  # any district
    # another device's topic, a deeper topic, the dead letters, the alerts: refused
    refused = [
        "cityflux/v1/centre/pole/pole-0002", "cityflux/v1/centre/pole/pole-0001/x",
        "cityflux/v1/deadletter/schema", "cityflux/v1/alerts/ack",
        "cityflux/v1/deadletter/schema/pole-0001", "cityflux/v1/centre/lamp/pole-0001",
    ]  # fmt: skip
    for topic in refused:
        assert device.publish(topic) == NOT_AUTHORIZED, topic
    assert wait_for(lambda: len(cityflux.received) >= 3, 5)
    assert sorted(cityflux.received) == [
        "cityflux/v1/centre/pole/pole-0001", "cityflux/v1/centre/pole/pole-0001/status",
        "cityflux/v1/riverside/pole/pole-0001",
    ]  # fmt: skip


def test_cityflux_writes_its_own_topics_but_not_devices(clients: Any) -> None:
    cityflux = clients("cityflux")
    assert cityflux.publish("cityflux/v1/deadletter/schema") == 0
    assert cityflux.publish("cityflux/v1/health/cityflux/status") == 0
    assert cityflux.publish("cityflux/v1/alerts/d01/lamp_fault/pole-0001") == 0
    assert cityflux.publish("cityflux/v1/centre/pole/pole-0001") == NOT_AUTHORIZED
    operator = clients("operator")
    assert operator.publish("cityflux/v1/alerts/ack") == 0
    assert operator.publish("cityflux/v1/centre/pole/pole-0001") == NOT_AUTHORIZED
    simulator = clients("simulator")
    assert simulator.publish("cityflux/v1/centre/pole/pole-0002") == 0


def test_wrong_passwords_and_strangers_are_refused(clients: Any) -> None:
    # mosquitto answers "not authorized" (135) rather than "bad user name or password" (134)
    assert clients("pole-0001", "pw-pole-2").connect_code == NOT_AUTHORIZED
    assert clients("pole-9999", "whatever").connect_code == NOT_AUTHORIZED
    assert clients("pole-0001").connect_code == 0


def test_cityflux_ingests_through_the_shipped_broker_as_its_own_account(
    broker: ShippedMosquitto, config: Config, db: InfluxWriter, clients: Any
) -> None:
    """The real consumer under the ACL: it reads a device's reading, writes it to InfluxDB,
    and publishes the dead letter of a bad one and its own health, all allowed for it."""
    operator = clients("operator")
    operator.client.subscribe("cityflux/v1/#", qos=1)
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
            lambda: any(t.startswith("cityflux/v1/deadletter/") for t in operator.received), 20
        )
    assert any(t.startswith("cityflux/v1/health/") for t in operator.received)
