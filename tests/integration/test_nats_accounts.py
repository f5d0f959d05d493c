"""The NATS deployment as deploy/ ships it, run by three real nats-servers: the committed
deploy/nats/nats.conf (only its ports, hosts and paths moved to loopback and a temporary
directory; NATS_SERVER_NAME and the role passwords come from each server's environment, as in
compose), and the accounts `cityflux devices nats-accounts` generates from a city map.

A device publishes over MQTT 3.1.1 only its own reading and status subjects; anything else is
dropped by the server, which still acknowledges it (the protocol has no way to say no) and
counts it nowhere: the log line "Publish Violation" is the one trace (docs/deploy.md)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats as nats_client
import paho.mqtt.client as paho
import pytest
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, SubjectTransform
from paho.mqtt.enums import CallbackAPIVersion

from cityflux.nats.partition import partition_of
from cityflux.servers_nats import LocalNats, LocalNatsCluster, nats_server_binary
from tests.support import ROOT, wait_for

SHIPPED = ROOT / "deploy" / "nats" / "nats.conf"
ROLES = {"cityflux": "pw-cityflux", "simulator": "pw-sim"}
# a password the config language must carry through quoting intact
POLE_PASSWORD = 'p$w"\\é:1'
# MQTT 3.1.1 CONNACK return codes 5 and 2, as paho reports them (MQTT 5 reason codes)
CONNACK_NOT_AUTHORIZED = 0x87
CONNACK_ID_REJECTED = 0x85


class ShippedNats(LocalNats):
    """One node running the shipped nats.conf, moved to loopback ports and private paths."""

    def __init__(self, data_dir: Path, name: str, accounts: Path, ports: list[int], i: int):
        super().__init__(data_dir, server_name=name, cluster_name="cityflux",
                         cluster_port=ports[i])  # fmt: skip
        self.accounts = accounts
        self.cluster_ports = ports

    def config_text(self) -> str:
        assert self.mqtt_port is not None
        text = SHIPPED.read_text()
        moves = {
            "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{self.port}",
            "http: 0.0.0.0:8222": f"http: 127.0.0.1:{self.http_port}",
            "listen: 0.0.0.0:1883": f"listen: 127.0.0.1:{self.mqtt_port}",
            "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{self.cluster_port}",
            '"/data/jetstream"': json.dumps(str(self.data_dir / "jetstream")),
        }
        for j, port in enumerate(self.cluster_ports):
            moves[f"nats-route://nats-{j + 1}:6222"] = f"nats-route://127.0.0.1:{port}"
        for shipped, here in moves.items():
            assert shipped in text, f"nats.conf no longer has {shipped!r}"
            text = text.replace(shipped, here)
        return text

    def command(self) -> list[str]:
        conf = self.data_dir / "nats.conf"
        conf.write_text(self.config_text())
        # include paths are relative to the including file: auth/ beside it, as in compose
        (self.data_dir / "auth").mkdir(exist_ok=True)
        shutil.copy(self.accounts, self.data_dir / "auth" / "accounts.conf")
        # the variables nats.conf and the accounts file read, as compose sets them
        variables = [f"NATS_SERVER_NAME={self.server_name}",
                     *(f"NATS_{r.upper()}_PASSWORD={p}" for r, p in ROLES.items())]  # fmt: skip
        return ["env", *variables, nats_server_binary(), "-c", str(conf)]


def make_accounts(tmp_path: Path) -> Path:
    """The accounts for examples/city-map.json with manhole mh-0042 renamed mh.0042 (a '.' in
    a device id is '//' in its subject); pole-0001's password given, the others generated."""
    city = json.loads((ROOT / "examples" / "city-map.json").read_text())
    city["manholes"][0]["id"] = "mh.0042"
    city_map = tmp_path / "city-map.json"
    city_map.write_text(json.dumps(city))
    passwords = tmp_path / "devices.txt"
    passwords.write_text(f"pole-0001:{POLE_PASSWORD}\n")
    accounts = tmp_path / "auth" / "accounts.conf"
    accounts.parent.mkdir()
    subprocess.run(
        [sys.executable, "-m", "cityflux", "devices", "nats-accounts", str(city_map),
         "--passwords", str(passwords), "--out", str(accounts), "--role", "simulator"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return accounts


@pytest.fixture
def city(tmp_path: Path) -> Iterator[tuple[LocalNatsCluster, dict[str, str]]]:
    accounts = make_accounts(tmp_path)
    passwords = dict(line.split(":", 1) for line in (tmp_path / "devices.txt").read_text()
                     .splitlines())  # fmt: skip
    cluster = LocalNatsCluster(tmp_path / "cluster")
    ports = [node.cluster_port or 0 for node in cluster.nodes]
    cluster.nodes = [
        ShippedNats(tmp_path / "cluster" / f"nats-{i + 1}", f"nats-{i + 1}", accounts, ports, i)
        for i in range(3)
    ]
    with cluster:
        yield cluster, {**ROLES, **passwords}


class Device:
    """A paho MQTT 3.1.1 client that waits for each CONNACK, SUBACK and PUBACK."""

    def __init__(self, port: int, user: str, password: str, client_id: str = "") -> None:
        self.connack: int | None = None
        self._connected = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user,
                                   protocol=paho.MQTTv311)  # fmt: skip
        self._client.username_pw_set(user, password)
        self._client.on_connect = self._on_connect
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._connected.wait(10), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason.value
        self._connected.set()

    def publish(self, topic: str, payload: bytes = b"{}") -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def subscribe_granted(self, pattern: str) -> bool:
        granted: list[bool] = []
        done = threading.Event()

        def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
            granted.extend(not code.is_failure for code in codes)
            done.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(pattern, qos=1)
        assert done.wait(10), "no SUBACK"
        return granted[0]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _monitor(node: LocalNats, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{node.monitor_url}{path}", timeout=5) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def _violations(cluster: LocalNatsCluster) -> list[str]:
    return [line for node in cluster.nodes for line in node.log_file.read_text().splitlines()
            if "Publish Violation" in line]  # fmt: skip


async def _connect(cluster: LocalNatsCluster, password: str, errors: list[str]) -> Any:
    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats_client.connect(cluster.urls, user="cityflux", password=password,
                                     error_cb=error_cb)  # fmt: skip


def test_a_device_publishes_only_its_own_subjects(
    city: tuple[LocalNatsCluster, dict[str, str]],
) -> None:
    cluster, passwords = city
    allowed = [
        ("pole-0001", "cityflux/v1/centre/pole/pole-0001"),
        ("pole-0001", "cityflux/v1/centre/pole/pole-0001/status"),
        ("mh.0042", "cityflux/v1/centre/manhole/mh.0042"),
        ("simulator", "cityflux/v1/riverside/pole/pole-0107"),
    ]
    denied = [
        ("pole-0001", "cityflux/v1/riverside/pole/pole-0001"),  # another district
        ("pole-0001", "cityflux/v1/centre/pole/pole-0107"),  # another device
        ("pole-0001", "cityflux/v1/centre/lamp/pole-0001"),  # another kind
        ("pole-0001", "cityflux/v1/centre/pole/pole-0001/x"),  # deeper
        ("pole-0001", "cityflux/v1/alerts/ack"),
        ("pole-0001", "cityflux/v1/deadletter/schema"),
        ("pole-0001", "cityflux/v1/health/pole-0001/status"),
        ("mh.0042", "cityflux/v1/centre/manhole/mh/0042"),  # the '.' is not a level
        ("simulator", "cityflux/v1/health/cityflux-w1/status"),  # shaped like a status
        ("simulator", "cityflux/v1/alerts/centre/incident/seg-0001"),
    ]

    async def stored() -> dict[str, int]:
        errors: list[str] = []
        nc = await _connect(cluster, passwords["cityflux"], errors)
        js = nc.jetstream(timeout=5)
        # the service user creates an R3 stream over every device subject
        await js.add_stream(StreamConfig(name="CITY", subjects=["cityflux.v1.>"],
                                         num_replicas=3, storage=StorageType.FILE))  # fmt: skip
        # devices on nodes 2 and 3; each one's denied publishes before its allowed ones, so
        # that once the allowed ones are stored the denied ones were decided
        devices = {}
        for n, user in enumerate(dict.fromkeys(user for user, _ in allowed)):
            port = cluster.mqtt_ports[1 + n % 2]
            # nats-server refuses a client id with a '.' (not the username): see below
            devices[user] = Device(port, user, passwords[user], user.replace(".", "-"))
        for user, topic in [*denied, *allowed]:
            await asyncio.to_thread(devices[user].publish, topic)  # each one gets its PUBACK
        deadline = time.monotonic() + 10
        while (await js.stream_info("CITY")).state.messages < len(allowed):
            assert time.monotonic() < deadline, "the allowed readings did not land"
            await asyncio.sleep(0.05)
        info = await js.stream_info("CITY", subjects_filter=">")
        for device in devices.values():
            device.close()
        await nc.close()
        assert errors == []
        return dict(info.state.subjects or {})

    subjects = asyncio.run(stored())
    assert subjects == {
        "cityflux.v1.centre.pole.pole-0001": 1,
        "cityflux.v1.centre.pole.pole-0001.status": 1,
        "cityflux.v1.centre.manhole.mh//0042": 1,
        "cityflux.v1.riverside.pole.pole-0107": 1,
    }
    # what the server shows of the drops: an [ERR] log line each, naming the user and subject
    lines = wait_for(lambda: (found := _violations(cluster)) and len(found) >= len(denied)
                     and found, timeout=5)  # fmt: skip
    assert len(lines) == len(denied)
    # (it names the MQTT client id, which is the device id for our devices)
    assert any('"pole-0001" - Publish Violation - Subject "cityflux.v1.alerts.ack"' in line
               for line in lines)  # fmt: skip
    # ... and no counter: /varz has none, and /connz counts a denied publish as a message in
    varz = _monitor(cluster.nodes[1], "/varz")
    assert not [key for key in varz if "violation" in key or "denied" in key]
    connz = _monitor(cluster.nodes[1], "/connz?auth=true&state=all")  # pole-0001's node
    pole = [c for c in connz["connections"] if c.get("authorized_user") == "pole-0001"]
    assert [c["in_msgs"] for c in pole] == [2 + 7]  # 2 stored, 7 dropped


def test_a_client_id_with_a_dot_is_refused(
    city: tuple[LocalNatsCluster, dict[str, str]],
) -> None:
    """nats-server refuses an MQTT client id with '.', '*', '>' or white space (CONNACK 2,
    identifier rejected), though the contract allows '.' in a device id: such a device must
    connect with another client id (its username may keep the '.')."""
    cluster, passwords = city
    port = cluster.mqtt_ports[0]
    assert Device(port, "mh.0042", passwords["mh.0042"]).connack == CONNACK_ID_REJECTED
    device = Device(port, "mh.0042", passwords["mh.0042"], client_id="mh-0042")
    assert device.connack == 0
    device.close()


def test_only_known_devices_connect_and_none_subscribes(
    city: tuple[LocalNatsCluster, dict[str, str]],
) -> None:
    cluster, passwords = city
    port = cluster.mqtt_ports[0]
    assert Device(port, "pole-0001", "wrong").connack == CONNACK_NOT_AUTHORIZED
    assert Device(port, "pole-9999", "whatever").connack == CONNACK_NOT_AUTHORIZED
    # a generated password works (written to devices.txt for the device's provisioning)
    device = Device(port, "pole-0107", passwords["pole-0107"])
    assert device.connack == 0
    assert not device.subscribe_granted("cityflux/v1/#")
    device.close()


def test_the_service_user_does_what_the_workers_do(
    city: tuple[LocalNatsCluster, dict[str, str]],
) -> None:
    """Stream and consumer set-up, fetch and ack, KV (compare-and-set, watch), object store,
    its own dead letters, alerts and health; but never a reading."""
    cluster, passwords = city
    partition = partition_of("centre", 16)

    async def work() -> tuple[list[bytes], list[bytes], bytes, list[str], list[str]]:
        errors: list[str] = []
        nc = await _connect(cluster, passwords["cityflux"], errors)
        js = nc.jetstream(timeout=5)
        seen: list[str] = []

        async def on_message(msg: Any) -> None:
            seen.append(msg.subject)

        await nc.subscribe("cityflux.v1.>", cb=on_message)
        await js.add_stream(StreamConfig(
            name="CITYFLUX", subjects=["cityflux.v1.*.*.*"], num_replicas=3,
            subject_transform=SubjectTransform(
                src="cityflux.v1.*.>", dest="cityflux.p.{{partition(16,1)}}.{{wildcard(1)}}.>"),
        ))  # fmt: skip
        sub = await js.pull_subscribe(f"cityflux.p.{partition}.>", durable=f"cityflux-p{partition}",
                                      stream="CITYFLUX")  # fmt: skip
        # the service user cannot publish a reading (below): the simulator does, over MQTT
        sim = Device(cluster.mqtt_ports[2], "simulator", passwords["simulator"])
        await asyncio.to_thread(sim.publish, "cityflux/v1/centre/pole/pole-0001", b"r1")
        sim.close()
        fetched = await sub.fetch(1, timeout=10)
        await fetched[0].ack_sync()
        kv = await js.create_key_value(KeyValueConfig(bucket="cityflux_alerts", replicas=3))
        watcher = await kv.watchall()
        revision = await kv.create("centre.incident.seg-0001", b"firing")
        await kv.update("centre.incident.seg-0001", b"acked", last=revision)
        watched = []
        while len(watched) < 2:
            entry = await watcher.updates(timeout=20)  # R3: timed out at 5 s once in CI
            if entry is not None:
                watched.append(entry.value or b"")
        store = await js.create_object_store("cityflux_checkpoints")
        await store.put("partition-03", b"x" * 300_000)
        blob = (await store.get("partition-03")).data or b""
        for subject in ("cityflux.v1.deadletter.schema", "cityflux.v1.alerts.centre.x.y",
                        "cityflux.v1.health.cityflux-w1.status"):  # fmt: skip
            await nc.publish(subject, b"{}")
        # a forged reading: refused, and the server says so to a NATS client
        await nc.publish("cityflux.v1.centre.pole.pole-0001", b"forged")
        await nc.flush()
        await asyncio.sleep(0.5)
        await nc.close()
        return [m.data for m in fetched], watched, blob, seen, errors

    data, watched, blob, seen, errors = asyncio.run(work())
    assert data == [b"r1"]
    assert watched == [b"firing", b"acked"] and len(blob) == 300_000
    # the simulator's reading, then its own three
    assert seen == [
        "cityflux.v1.centre.pole.pole-0001",
        "cityflux.v1.deadletter.schema",
        "cityflux.v1.alerts.centre.x.y",
        "cityflux.v1.health.cityflux-w1.status",
    ]
    assert len(errors) == 1 and "permissions violation" in errors[0].lower()
    assert "cityflux.v1.centre.pole.pole-0001" in errors[0]
