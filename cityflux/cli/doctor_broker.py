"""``cityflux doctor``'s broker checks: the protocol, the limits the CONNACK states, the
``$SYS`` drop counter and the queue probe (a persistent session sent messages while offline)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityflux.cli.doctor_checks import DoctorError, Finding
from cityflux.config import MQTT_PACKET_MARGIN, Config, MqttConfig
from cityflux.mqtt.consumer import apply_credentials
from cityflux.pipeline.broker_stats import DROPPED

BROKER_CONF = "mosquitto.conf (deploy/mosquitto/mosquitto.conf, docs/deploy.md)"
PROBE_PAYLOAD = b"x" * 200  # about a reading's size: max_queued_bytes counts payload bytes
QUIET_S = 2.0  # the probe's collection ends after this long without a message


def check_protocol(mqtt: MqttConfig) -> Finding:
    if mqtt.protocol == "5":
        return Finding(
            "ok", "mqtt.protocol", "MQTT 5: our Receive Maximum bounds what is in flight"
        )
    return Finding(
        "warning",
        "mqtt.protocol",
        "MQTT 3.1.1: the broker's max_inflight_messages and max_queued_messages decide what it "
        "holds for us; mosquitto's defaults (20, 1000) drop a burst",
        'cityflux.toml [mqtt]: protocol = "5"',
    )


class _Client:
    """A paho MQTT 5 client with the configured credentials, connected synchronously."""

    def __init__(self, mqtt: MqttConfig, client_id: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        apply_credentials(self.client, mqtt)
        self.mqtt = mqtt
        self.connack: dict[str, Any] = {}
        self.messages: list[paho.MQTTMessage] = []
        self.granted: list[Any] = []
        self.published: list[Any] = []  # PUBACK reason codes
        self.last_message = 0.0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = lambda c, u, mid, code, p: self.published.append(code)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, code: Any, props: Any) -> None:
        self.connack = {
            "code": code,
            "session_present": flags.session_present,
            "properties": props.json() if props else {},
        }
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        self.granted = codes
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self.messages.append(message)
        self.last_message = time.monotonic()

    def connect(self, clean_start: bool = True, session_expiry_s: int = 0) -> dict[str, Any]:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        props.ReceiveMaximum = min(self.mqtt.receive_maximum, 65_535)
        try:
            self.client.connect(
                self.mqtt.host,
                self.mqtt.port,
                self.mqtt.keepalive_s,
                clean_start=clean_start,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise DoctorError(f"cannot connect to {self.mqtt.url}: {exc}") from exc
        self.client.loop_start()
        if not self._connected.wait(self.timeout_s):
            self.close()
            raise DoctorError(f"no CONNACK from {self.mqtt.url} within {self.timeout_s:.0f}s")
        if self.connack["code"].is_failure:
            self.close()
            raise DoctorError(f"{self.mqtt.url} refused the connection: {self.connack['code']}")
        return self.connack

    def subscribe(self, topics: list[str]) -> bool:
        """True if the broker granted at least one of the subscriptions (QoS 1)."""
        self._subscribed.clear()
        self.client.subscribe([(topic, 1) for topic in topics])
        return self._subscribed.wait(self.timeout_s) and any(
            not code.is_failure for code in self.granted
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_broker(
    config: Config, probe_messages: int, topic: str, timeout_s: float
) -> list[Finding]:
    mqtt = config.mqtt
    client = _Client(mqtt, f"{mqtt.client_id}-doctor", timeout_s)
    try:
        connack = client.connect()
    except DoctorError as exc:
        return [Finding("loss", "broker", str(exc), "mqtt.url, username, password, tls")]
    try:
        findings = _connack(config, connack["properties"])
        findings.append(_dropped(client))
    finally:
        client.close()
    if probe_messages:
        findings.append(_queue_probe(mqtt, probe_messages, topic, timeout_s))
    findings.append(
        Finding(
            "check",
            "broker persistence",
            "not visible over MQTT: without it a broker restart loses every queued message",
            f"{BROKER_CONF}: persistence true",
        )
    )
    return findings


def _connack(config: Config, props: dict[str, Any]) -> list[Finding]:
    findings: list[Finding] = []
    ingest = config.ingest
    need = ingest.batch_size * (ingest.write_concurrency + 2)
    inflight = int(props.get("ReceiveMaximum", 65_535))
    if config.mqtt.protocol == "3.1.1" and inflight < need:
        findings.append(
            Finding(
                "loss",
                "broker in-flight limit",
                f"the broker allows {inflight} messages in flight per client (CONNACK Receive "
                f"Maximum); over MQTT 3.1.1 that caps delivery to us below the {need} a batch "
                "pipeline holds, and the backlog overflows its queue",
                f"{BROKER_CONF}: max_inflight_messages {config.mqtt.receive_maximum}",
            )
        )
    else:
        findings.append(
            Finding(
                "ok",
                "broker in-flight limit",
                f"broker Receive Maximum {inflight}"
                + ("" if config.mqtt.protocol == "3.1.1" else "; over MQTT 5 ours applies to us"),
            )
        )
    max_qos = int(props.get("MaximumQoS", 2))
    if max_qos < 1:
        findings.append(
            Finding(
                "loss",
                "broker maximum QoS",
                f"the broker grants at most QoS {max_qos}: nothing is redelivered after a failure",
                f"{BROKER_CONF}: max_qos 2",
            )
        )
    needed = ingest.max_payload_bytes + MQTT_PACKET_MARGIN
    packet = props.get("MaximumPacketSize")
    if packet is not None and int(packet) < needed:
        findings.append(
            Finding(
                "loss",
                "broker maximum packet size",
                f"the broker refuses packets over {packet} bytes; readings up to "
                f"ingest.max_payload_bytes ({ingest.max_payload_bytes}) need {needed}",
                f"{BROKER_CONF}: max_packet_size {config.mqtt.max_packet_size}",
            )
        )
    return findings


def _dropped(client: _Client) -> Finding:
    """The broker's own dropped counter ($SYS values are retained: they come at once)."""
    if not client.subscribe([DROPPED]):
        return _sys_denied("refused the subscription")
    deadline = time.monotonic() + min(client.timeout_s, 5.0)
    while time.monotonic() < deadline and not client.messages:
        time.sleep(0.05)
    if not client.messages:
        return _sys_denied("sent nothing")
    dropped = int(float(client.messages[-1].payload.split()[0]))
    if dropped:
        return Finding(
            "loss",
            "broker dropped messages",
            f"the broker has dropped {dropped} messages since it started ({DROPPED})",
            f"{BROKER_CONF}: max_queued_messages 2000000 and max_queued_bytes 0",
        )
    return Finding("ok", "broker dropped messages", f"{DROPPED} is 0")


def _sys_denied(what: str) -> Finding:
    return Finding(
        "warning",
        "broker $SYS",
        f"$SYS (the broker's drop counter) {what}: cityflux cannot see what the broker drops",
        "broker ACL for cityflux's account: topic read $SYS/#",
    )


def _queue_probe(mqtt: MqttConfig, n: int, topic: str, timeout_s: float) -> Finding:
    """A persistent session, offline, is sent ``n`` messages; how many did the broker keep?"""
    client_id = f"{mqtt.client_id}-doctor-probe-{uuid.uuid4().hex[:8]}"
    acl_fix = f"broker ACL: topic readwrite {topic.partition('/')[0]}/# for the doctor's account"
    check = "broker queue limit (probe)"
    try:
        session = _Client(mqtt, client_id, timeout_s)
        session.connect(clean_start=True, session_expiry_s=600)
        granted = session.subscribe([topic])
        session.close()
        if not granted:
            return Finding(
                "warning", check, f"the broker refused a subscription to {topic}", acl_fix
            )
        refused = _publish(mqtt, topic, n, timeout_s)
        if refused:
            return Finding(
                "warning", check, f"the broker refused {refused} probe publishes", acl_fix
            )
        kept = _collect(mqtt, client_id, n, timeout_s)
    except DoctorError as exc:
        return Finding("warning", check, f"probe failed: {exc}")
    if kept == 0:  # mosquitto 2.0 grants any subscription, then withholds what the ACL denies
        return Finding(
            "warning",
            check,
            f"nothing came back on {topic}: the ACL may deny "
            "reading it; the queue limit is unknown",
            acl_fix,
        )
    if kept < n:
        return Finding(
            "loss",
            check,
            f"the broker kept {kept} of {n} QoS 1 messages for an offline session: the rest "
            "were dropped (max_queued_messages, or max_queued_bytes, is too low)",
            f"{BROKER_CONF}: max_queued_messages 2000000 and max_queued_bytes 0",
        )
    return Finding("ok", check, f"the broker kept all {n} messages for an offline session")


def _publish(mqtt: MqttConfig, topic: str, n: int, timeout_s: float) -> int:
    """Publish ``n`` QoS 1 messages; the number the broker refused (PUBACK reason >= 0x80)."""
    sender = _Client(mqtt, f"{mqtt.client_id}-doctor-pub-{uuid.uuid4().hex[:8]}", timeout_s)
    sender.connect()
    try:
        infos = [sender.client.publish(topic, PROBE_PAYLOAD, qos=1) for _ in range(n)]
        deadline = time.monotonic() + timeout_s + n / 1_000
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not all(info.is_published() for info in infos):
            raise DoctorError(f"the broker did not acknowledge the {n} probe messages in time")
    finally:
        sender.close()
    return sum(1 for code in sender.published if code.is_failure)


def _collect(mqtt: MqttConfig, client_id: str, n: int, timeout_s: float) -> int:
    """Resume the session (ending it at disconnect: expiry 0) and count what was queued."""
    session = _Client(mqtt, client_id, timeout_s)
    session.connect(clean_start=False, session_expiry_s=0)
    try:
        deadline = time.monotonic() + timeout_s + n / 1_000
        session.last_message = time.monotonic()
        while len(session.messages) < n and time.monotonic() < deadline:
            if time.monotonic() - session.last_message > QUIET_S:
                break
            time.sleep(0.05)
    finally:
        session.close()
    return len(session.messages)
