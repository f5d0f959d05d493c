"""A broker that sends malformed packets: the real consumer reconnects (counted) and goes on.

Before issue 9 a malformed PUBLISH raised IndexError out of the reader thread, which ended
for good while the process lived on. The broker here is a scripted plain socket server on
127.0.0.1 (a real mosquitto never sends these packets, which is the point of the test).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cityflux.config import Config, MqttConfig
from cityflux.errors import MqttError
from cityflux.mqtt.codec import V5, V311, publish_packet, varint
from cityflux.mqtt.consumer import MqttConsumer
from cityflux.mqtt.oversize import OversizedPayload
from cityflux.mqtt.publisher import BulkPublisher
from cityflux.observability import Metrics
from cityflux.servers import LocalMosquitto
from tests.support import paho_client, publish_all, wait_for

GOOD_TOPIC = "cityflux/v1/d1/pole/p-1"
GOOD_PAYLOAD = b'{"ts": 1700000000000, "pm25_ugm3": 12}'


class Peer:
    """One accepted connection: read whole packets, send bytes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        self.sock = sock
        self.version = V311
        self.client_id = ""

    def read_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("client closed the connection")
            data += chunk
        return data

    def read_packet(self) -> tuple[int, bytes]:
        first = self.read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self.read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return first, self.read_exact(length)

    def read_connect(self) -> None:
        first, body = self.read_packet()
        assert first == 0x10, f"expected CONNECT, got {first:#x}"
        self.version = body[6]  # after the protocol name "MQTT"
        pos = 10
        if self.version == V5:  # properties: 1-byte length in everything cityflux sends
            assert body[pos] < 0x80
            pos += 1 + body[pos]
        size = int.from_bytes(body[pos : pos + 2], "big")
        self.client_id = body[pos + 2 : pos + 2 + size].decode()

    def connack(self, session_present: bool = False, properties: bytes = b"") -> None:
        body = bytes([int(session_present), 0])
        if self.version == V5:
            body += varint(len(properties)) + properties
        self.send(b"\x20" + varint(len(body)) + body)

    def subscribed(self) -> None:
        """Read the SUBSCRIBE and grant it at QoS 1."""
        first, body = self.read_packet()
        assert first == 0x82, f"expected SUBSCRIBE, got {first:#x}"
        suback = body[:2] + (b"\x00" if self.version == V5 else b"") + b"\x01"
        self.send(b"\x90" + varint(len(suback)) + suback)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def serve_paho(self) -> None:
        """Acknowledge what the consumer's paho publisher sends (its birth), until DISCONNECT."""
        while True:
            first, body = self.read_packet()
            if first >> 4 == 3 and first & 0x06:  # a QoS 1 PUBLISH: PUBACK its packet id
                at = 2 + int.from_bytes(body[:2], "big")
                self.send(b"\x40\x02" + body[at : at + 2])
            elif first == 0xC0:
                self.send(b"\xd0\x00")
            elif first == 0xE0:
                return

    def wait_closed(self) -> bool:
        """True once the client closes the connection (it must, after a malformed packet)."""
        try:
            while self.sock.recv(65_536):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True


Script = Callable[[Peer], None]


@dataclass
class FakeBroker:
    """Runs ``scripts`` in turn, one per connection of the consumer (or publisher) under test.
    The consumer's paho publisher (client id ``*-pub``) is only answered and drained."""

    scripts: list[Script]
    server: socket.socket = field(init=False)
    clients: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(Peer(sock),), daemon=True).start()

    def _handle(self, peer: Peer) -> None:
        try:
            peer.read_connect()
            if peer.client_id.endswith("-pub"):
                peer.connack()
                peer.sock.settimeout(None)
                peer.serve_paho()
                return
            self.clients.append(peer.client_id)
            self.scripts[len(self.clients) - 1](peer)
        except (EOFError, OSError) as exc:
            self.errors.append(exc)
        except BaseException as exc:  # an assertion in a script: reported by the test
            self.errors.append(exc)
        finally:
            peer.sock.close()

    def close(self) -> None:
        self.server.close()


MALFORMED: list[tuple[str, int, bytes]] = [
    ("remaining length 1", V311, b"\x30\x01\x00"),
    ("qos 1 without packet id", V311, b"\x32\x03\x00\x01t"),
    ("topic length past the end", V311, b"\x32\x05\x00\x40abc"),
    ("qos 2", V311, b"\x34\x06\x00\x01t\x00\x01x"),
    # a PUBLISH that large is read through (below); any other packet is refused from its header
    ("SUBACK announcing 2 MB (max_packet_size 1 MiB)", V311, b"\x90" + varint(2_000_000) + b"\0"),
    ("properties past the end", V5, b"\x32\x08\x00\x01t\x00\x01\x09\x01\x01"),
    ("qos 3", V5, b"\x36\x07\x00\x01t\x00\x01\x00x"),
]


@dataclass
class Seen:
    closed_after_malformed: bool = False
    pubacks: list[int] = field(default_factory=list)
    pingreq_after_s: float | None = None


def malformed_then_good(bad: bytes, seen: Seen) -> list[Script]:
    def first(peer: Peer) -> None:
        peer.connack()
        peer.subscribed()
        peer.send(bad)
        seen.closed_after_malformed = peer.wait_closed()

    def second(peer: Peer) -> None:
        peer.connack(session_present=True)
        peer.subscribed()
        peer.send(publish_packet(GOOD_TOPIC, GOOD_PAYLOAD, 7, peer.version))
        first_byte, body = peer.read_packet()
        while first_byte != 0x40:  # skip PINGREQs
            first_byte, body = peer.read_packet()
        seen.pubacks.append(int.from_bytes(body[:2], "big"))
        peer.wait_closed()

    return [first, second]


def mqtt_config(url: str, version: int, **extra: object) -> MqttConfig:
    overrides: dict[str, object] = {
        "mqtt.url": url,
        "mqtt.protocol": "5" if version == V5 else "3.1.1",
        "mqtt.reconnect_min_s": 0.05,
        "mqtt.reconnect_max_s": 0.2,
    }
    overrides |= {f"mqtt.{key}": value for key, value in extra.items()}
    return Config().with_overrides(overrides).mqtt


@pytest.mark.parametrize(("name", "version", "bad"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_packet_reconnects_and_the_next_message_arrives(
    name: str, version: int, bad: bytes
) -> None:
    seen = Seen()
    broker = FakeBroker(malformed_then_good(bad, seen))
    metrics = Metrics()
    consumer = MqttConsumer(mqtt_config(broker.url, version), metrics)
    try:
        consumer.start(wait_s=5)
        batch = consumer.take(1, wait_s=10)
        assert batch.topics == [GOOD_TOPIC]
        assert batch.payloads == [GOOD_PAYLOAD]
        assert batch.receipts == [7]
        assert consumer.ack(batch)
        wait_for(lambda: seen.pubacks, timeout=5, what="the PUBACK of the good message")
    finally:
        consumer.stop()
        broker.close()
    assert seen.closed_after_malformed  # the consumer dropped the connection ...
    assert broker.clients == ["cityflux", "cityflux"]  # ... and came back
    assert seen.pubacks == [7]
    assert metrics.value("mqtt_protocol_errors_total") == 1
    assert consumer.connected.is_set() is False  # stopped
    assert not [e for e in broker.errors if not isinstance(e, (EOFError, OSError))]


@pytest.mark.parametrize("version", [V311, V5])
def test_an_oversized_publish_is_read_through_and_acknowledged(version: int) -> None:
    """A broker with a laxer limit sends a 2 MB QoS 1 PUBLISH (1 MiB is ours): before, the
    reader refused it and reconnected, and the broker redelivered it on every reconnect. Now
    it is read through on the same connection, returned with its real size, and acked."""
    payload = b'{"ts": 1700000000000, "pm25_ugm3": 1}' + b" " * 2_000_000
    pubacks: list[int] = []

    def lax(peer: Peer) -> None:
        peer.connack()
        peer.subscribed()
        peer.send(publish_packet(GOOD_TOPIC, payload, 11, peer.version))
        peer.send(publish_packet(GOOD_TOPIC, GOOD_PAYLOAD, 12, peer.version))
        while len(pubacks) < 2:
            first_byte, body = peer.read_packet()
            if first_byte == 0x40:
                pubacks.append(int.from_bytes(body[:2], "big"))
        peer.wait_closed()

    broker = FakeBroker([lax])
    metrics = Metrics()
    consumer = MqttConsumer(mqtt_config(broker.url, version), metrics)
    try:
        consumer.start(wait_s=5)
        batch = consumer.take(2, wait_s=10)
        assert consumer.ack(batch)
        wait_for(lambda: len(pubacks) == 2, timeout=5, what="both PUBACKs")
    finally:
        consumer.stop()
        broker.close()
    assert batch.receipts == [11, 12]
    assert batch.topics == [GOOD_TOPIC, GOOD_TOPIC]
    oversized, good = batch.payloads
    assert isinstance(oversized, OversizedPayload)
    assert len(oversized) == len(payload) and payload.startswith(oversized)
    assert oversized.kept < 100_000  # the first 80 KiB of the packet, not 2 MB
    assert good == GOOD_PAYLOAD
    assert pubacks == [11, 12]
    assert broker.clients == ["cityflux"]  # one connection: no reconnect
    assert metrics.value("mqtt_protocol_errors_total") == 0


def test_a_broker_disconnect_reconnects_without_counting_a_protocol_error() -> None:
    seen = Seen()

    def goodbye(peer: Peer) -> None:
        peer.connack()
        peer.subscribed()
        peer.send(b"\xe0\x01\x8b")  # DISCONNECT: server shutting down
        seen.closed_after_malformed = peer.wait_closed()

    broker = FakeBroker([goodbye, malformed_then_good(b"", seen)[1]])
    metrics = Metrics()
    consumer = MqttConsumer(mqtt_config(broker.url, V5), metrics)
    try:
        consumer.start(wait_s=5)
        batch = consumer.take(1, wait_s=10)
        assert batch.receipts == [7]
    finally:
        consumer.stop()
        broker.close()
    assert broker.clients == ["cityflux", "cityflux"]
    assert metrics.value("mqtt_protocol_errors_total") == 0


def test_server_keep_alive_replaces_ours() -> None:
    """CONNACK's Server Keep Alive of 1 s: the consumer pings about every 0.5 s, not every 15."""
    seen = Seen()

    def short_keepalive(peer: Peer) -> None:
        peer.connack(properties=b"\x13\x00\x01")  # Server Keep Alive: 1 s
        peer.subscribed()
        start = time.monotonic()
        first, _ = peer.read_packet()
        if first == 0xC0:
            seen.pingreq_after_s = time.monotonic() - start
        peer.wait_closed()

    broker = FakeBroker([short_keepalive])
    consumer = MqttConsumer(mqtt_config(broker.url, V5, keepalive_s=30), Metrics())
    try:
        consumer.start(wait_s=5)
        wait_for(lambda: seen.pingreq_after_s is not None, timeout=5, what="a PINGREQ")
    finally:
        consumer.stop()
        broker.close()
    assert consumer.connack is not None and consumer.connack.server_keep_alive == 1
    assert seen.pingreq_after_s is not None and seen.pingreq_after_s < 2.0


# -- the simulator's publisher: hostile or truncated input is a clear MqttError ---------------


def publisher_script(*replies: bytes) -> Script:
    def script(peer: Peer) -> None:
        for reply in replies:
            peer.send(reply)
        peer.sock.shutdown(socket.SHUT_WR)
        peer.wait_closed()

    return script


@pytest.mark.parametrize(
    ("version", "replies", "error"),
    [
        (V311, [b"\x20\x02\x00"], "closed the connection before CONNACK"),
        (V311, [b"\x40\x02\x00\x01"], "another packet before CONNACK"),
        (V311, [b"\x20\x02\x00\x05"], "0x05 not authorized"),
        (V5, [b"\x20\x03\x00\x87\x00"], "0x87 not authorized"),
        (V5, [b"\x20\x03\x00\x00\x05"], "properties run past"),
        (V311, [b"\x20\x03\x00\x00\x00"], "CONNACK with a remaining length of 3"),
        (V311, [b"\x20\xff\xff\xff\xff\x7f"], "longer than 4 bytes"),
    ],
)
def test_the_publisher_refuses_a_bad_connack(
    version: int, replies: list[bytes], error: str
) -> None:
    broker = FakeBroker([publisher_script(*replies)])
    try:
        with pytest.raises(MqttError, match=error):
            BulkPublisher(mqtt_config(broker.url, version), "sim")
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("version", "ack", "error"),
    [
        (V311, b"\x40\x01\x00", "PUBACK with a remaining length of 1"),
        (V311, b"\x40\x02\x00", "the broker closed the connection"),  # truncated, then EOF
        (V5, b"\x40\x05\x00\x01\x00\x09\x00", "properties run past"),
        (V5, b"\xe0\x01\x97", "0x97 quota exceeded"),
    ],
)
def test_the_publisher_fails_clearly_on_a_bad_puback(version: int, ack: bytes, error: str) -> None:
    connack = b"\x20\x03\x00\x00\x00" if version == V5 else b"\x20\x02\x00\x00"

    def script(peer: Peer) -> None:
        peer.send(connack)
        peer.read_packet()  # the PUBLISH
        peer.send(ack)
        peer.sock.shutdown(socket.SHUT_WR)
        peer.wait_closed()

    broker = FakeBroker([script])
    publisher = BulkPublisher(mqtt_config(broker.url, version), "sim")
    try:
        publisher.publish([("t", b"x", False)])
        started = time.monotonic()
        with pytest.raises(MqttError, match=error):
            publisher.flush(timeout_s=10)
        assert time.monotonic() - started < 5  # the error ends the wait, not the timeout
    finally:
        publisher.close()
        broker.close()


# -- the packet-size limit against the real mosquitto ------------------------------------------


def publish_oversized(port: int) -> bool:
    """A device publishes 2 MB at QoS 1; True if the broker acknowledged it."""
    device = paho_client(port)
    try:
        info = device.publish("cityflux/v1/d1/pole/p-1", b"a" * 2_000_000, qos=1)
        info.wait_for_publish(timeout=3)
        return info.is_published()
    except (RuntimeError, ValueError):  # the broker closed the connection
        return False
    finally:
        device.disconnect()
        device.loop_stop()


def receive_one_after_oversized(
    port: int, version: int, **extra: object
) -> tuple[bool, list[tuple[str, int]], Metrics]:
    """(the broker accepted the 2 MB message, (topic, payload size) received, metrics)."""
    metrics = Metrics()
    consumer = MqttConsumer(mqtt_config(f"mqtt://127.0.0.1:{port}", version, **extra), metrics)
    received: list[tuple[str, int]] = []
    try:
        consumer.start(wait_s=10)
        accepted = publish_oversized(port)
        publish_all(port, [(GOOD_TOPIC, GOOD_PAYLOAD)])
        deadline = time.monotonic() + 10
        while (GOOD_TOPIC, len(GOOD_PAYLOAD)) not in received and time.monotonic() < deadline:
            batch = consumer.take(10, wait_s=0.5)
            assert consumer.ack(batch)
            pairs = zip(batch.topics, batch.payloads, strict=True)
            received += [(t, len(p)) for t, p in pairs if "/health/" not in t]  # not our birth
        assert consumer.connected.is_set()
    finally:
        consumer.stop()
    return accepted, received, metrics


@pytest.mark.parametrize("version", [V311, V5])
def test_the_shipped_broker_limit_refuses_an_oversized_packet(
    broker: LocalMosquitto, version: int
) -> None:
    """max_packet_size 1 MiB in the broker (as deploy/mosquitto/mosquitto.conf): the device
    is refused, cityflux never sees the packet and goes on."""
    accepted, received, metrics = receive_one_after_oversized(broker.port, version)
    assert not accepted
    assert received == [(GOOD_TOPIC, len(GOOD_PAYLOAD))]
    assert metrics.value("mqtt_protocol_errors_total") == 0


@pytest.mark.parametrize(
    ("version", "send_max_packet_size"), [(V311, False), (V5, False), (V5, True)]
)
def test_a_laxer_broker_delivers_it_unless_we_send_maximum_packet_size(
    tmp_path: Path, version: int, send_max_packet_size: bool
) -> None:
    """A broker allowing 10 MB accepts the 2 MB message. By default cityflux reads it through
    (a too_large dead letter downstream: tests/adversarial/test_oversize.py). Sent MQTT 5
    Maximum Packet Size, the broker must not deliver it (MQTT-3.1.2-24) and drops it: no
    protocol error, no reconnect, but nothing of it reaches cityflux either."""
    with LocalMosquitto(tmp_path / "lax", extra_config="max_packet_size 10485760\n") as lax:
        accepted, received, metrics = receive_one_after_oversized(
            lax.port, version, send_max_packet_size=send_max_packet_size
        )
    assert accepted
    good = (GOOD_TOPIC, len(GOOD_PAYLOAD))
    assert received == ([good] if send_max_packet_size else [(GOOD_TOPIC, 2_000_000), good])
    assert metrics.value("mqtt_protocol_errors_total") == 0
