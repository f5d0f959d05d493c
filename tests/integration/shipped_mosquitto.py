"""The broker exactly as deploy/ ships it, run by a real mosquitto: the committed
mosquitto.conf (only its ports and paths moved to a temporary directory), the committed roles
ACL plus the device accounts `cityflux devices acl` generates from a city map, a password file
and TLS certificate written by the committed make-auth.sh and make-certs.sh."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from cityflux.servers import LocalMosquitto, free_port
from tests.support import ROOT, wait_for

MOSQUITTO = ROOT / "deploy" / "mosquitto"
CITY_MAP = ROOT / "examples" / "city-map.json"  # pole-0001 in centre, pole-0107 in riverside
PASSWORDS = {"cityflux": "pw-cityflux", "operator": "pw-operator", "simulator": "pw-sim",
             "pole-0001": "pw-pole-1", "pole-0107": "pw-pole-107"}  # fmt: skip
NOT_AUTHORIZED = 0x87
NO_SUBSCRIBERS = 0x10  # MQTT 5: accepted, nobody subscribed (a success code, below 0x80)


def make_auth(tmp_path: Path, mode: str = "device") -> Path:
    """The files mosquitto.conf reads from /mosquitto/auth/, as compose's mqtt-credentials
    service writes them: certificates by make-certs.sh, device ACL by `cityflux devices acl`,
    then make-auth.sh. Returns the auth directory; the CA is in tmp_path/certs/ca.crt."""
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(MOSQUITTO / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True)  # fmt: skip
    devices_acl = tmp_path / "devices.acl"
    subprocess.run(
        [sys.executable, "-m", "cityflux", "devices", "acl", str(CITY_MAP), "-o",
         str(devices_acl), "--mode", mode],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    devices = tmp_path / "devices.txt"
    devices.write_text("".join(f"{u}:{p}\n" for u, p in PASSWORDS.items() if "-" in u))
    env = {
        **os.environ,
        "MQTT_CITYFLUX_PASSWORD": PASSWORDS["cityflux"],
        "MQTT_OPERATOR_PASSWORD": PASSWORDS["operator"],
        "MQTT_SIMULATOR_PASSWORD": PASSWORDS["simulator"],
        "MQTT_DEVICES_FILE": str(devices),
        "MQTT_DEVICES_ACL": str(devices_acl),
        "MQTT_CERTS_DIR": str(certs),
    }
    auth = tmp_path / "auth"
    done = subprocess.run(["sh", str(MOSQUITTO / "make-auth.sh"), str(auth)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert "wrote 5 accounts" in done.stdout
    assert "pw-" not in (auth / "passwd").read_text()  # hashed, not the passwords
    return auth


class ShippedMosquitto(LocalMosquitto):
    """deploy/mosquitto/mosquitto.conf with its ports and file locations made local."""

    def __init__(self, data_dir: Path, auth: Path) -> None:
        super().__init__(data_dir)
        self.auth = auth
        self.tls_port = free_port()

    def command(self) -> list[str]:
        conf = (MOSQUITTO / "mosquitto.conf").read_text()
        for line in ("listener 1883", "listener 8883", "/mosquitto/auth/", "/mosquitto/data/"):
            assert line in conf, line
        conf = (
            conf.replace("listener 1883", f"listener {self.port} 127.0.0.1")
            .replace("listener 8883", f"listener {self.tls_port} 127.0.0.1")
            .replace("/mosquitto/auth/", f"{self.auth}/")
            .replace("/mosquitto/data/", f"{self.data_dir}/")
        )
        conf += f"\nuser {getpass.getuser()}\nlog_dest file {self.log_file}\n"
        path = self.data_dir / "shipped.conf"
        path.write_text(conf)
        return ["mosquitto", "-c", str(path)]


class Client:
    """A paho client (MQTT 5 unless told) that records each publish's PUBACK reason code and
    the topics it receives."""

    def __init__(self, port: int, user: str, password: str, protocol: int = paho.MQTTv5) -> None:
        self.acks: dict[int, int] = {}
        self.received: list[tuple[str, bytes, bool]] = []
        self.connected = threading.Event()
        self.connect_code: int | None = None
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex,
                                  protocol=protocol)  # fmt: skip
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.received.append(
            (m.topic, m.payload, bool(m.retain))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.connected.wait(10)

    @property
    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.received]

    def _on_connect(self, c: Any, u: Any, flags: Any, code: ReasonCode, p: Any) -> None:
        self.connect_code = code.value
        self.connected.set()

    def _on_publish(self, c: Any, u: Any, mid: int, code: ReasonCode, p: Any) -> None:
        self.acks[mid] = code.value

    def publish(self, topic: str, payload: bytes = b'{"ts": 1}', retain: bool = False) -> int:
        """The broker's reason code for one QoS 1 publish, 0 for every success code."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        assert wait_for(lambda: mid in self.acks, 10)
        return 0 if self.acks[mid] == NO_SUBSCRIBERS else self.acks[mid]

    def subscribe(self, *patterns: str) -> None:
        granted = threading.Event()
        self.client.on_subscribe = lambda *args: granted.set()
        self.client.subscribe([(p, 1) for p in patterns])
        assert granted.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
