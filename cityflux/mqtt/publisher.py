"""Publish many messages fast: the simulator's and replayer's MQTT client.

paho-mqtt spends tens of microseconds of Python per QoS 1 message (a ``MQTTMessageInfo``, a
callback, a lock round trip per PUBACK). A simulated city publishes tens of thousands of
messages a second, so this client encodes a whole tick's PUBLISH packets into one buffer, sends
it with one ``sendall``, and counts PUBACKs on a reader thread. A window of unacknowledged
messages (``max_inflight``) bounds what the broker must hold and gives back-pressure.

:class:`DeviceLinks` gives the few devices that must go offline their own connections with a
real last will, closed abruptly when their outage starts so that the broker publishes the will.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Final

from cityflux.config import MqttConfig
from cityflux.errors import MqttError, MqttProtocolError
from cityflux.model.contract import OFFLINE
from cityflux.mqtt.codec import (
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    PUBACK,
    V5,
    V311,
    ConnectOptions,
    Control,
    PacketReader,
    connect_packet,
    publish_packet,
)
from cityflux.mqtt.consumer import open_socket
from cityflux.mqtt.control import accepted_connack, disconnect_reason, puback_reason

Message = tuple[str, bytes, bool]  # topic, payload, retain
MAX_PACKET_ID: Final = 65_535


class BulkPublisher:
    """One MQTT connection publishing batches at QoS 1 (or 0), acknowledged asynchronously."""

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        qos: int = 1,
        max_inflight: int = 20_000,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        if not 0 < max_inflight < MAX_PACKET_ID:
            raise ValueError("max_inflight must be between 1 and 65,534")
        self.config = config
        self.client_id = client_id
        self.qos = qos
        self.max_inflight = max_inflight
        self.version = V5 if config.protocol == "5" else V311
        self.published = 0
        self.acked = 0
        self.refused = 0  # MQTT 5 PUBACKs with a reason code >= 0x80 (e.g. 0x87 not authorized)
        self._next_id = 0
        self._cond = threading.Condition()
        self._error: str | None = None
        self._last_sent = time.monotonic()
        self._send_lock = threading.Lock()
        self._sock = self._connect(will)
        self._reader = threading.Thread(target=self._read_acks, name="mqtt-pub", daemon=True)
        self._reader.start()

    def _connect(self, will: tuple[str, bytes] | None) -> socket.socket:
        sock = open_socket(self.config)
        options = ConnectOptions(
            client_id=self.client_id,
            version=self.version,
            keepalive_s=self.config.keepalive_s,
            username=self.config.username,
            password=self.config.password,
            clean=True,
            will_topic=will[0] if will else None,
            will_payload=will[1] if will else b"",
        )
        reader = PacketReader(self.version, self.config.max_packet_size)
        try:
            sock.sendall(connect_packet(options))
            while True:
                data = sock.recv(4096)
                if not data:
                    raise MqttError(f"{self.config.url} closed the connection before CONNACK")
                parsed = reader.feed(data)
                if parsed.topics or parsed.controls:
                    break
            first = parsed.controls[0] if parsed.controls and not parsed.topics else None
            if first is None or first.type != CONNACK:  # MQTT-3.2.0-1
                raise MqttProtocolError(f"{self.config.url} sent another packet before CONNACK")
            accepted_connack(first, self.version)
        except (MqttError, OSError) as exc:  # refused, malformed, reset or timed out
            sock.close()
            raise MqttError(f"{self.client_id} to {self.config.url}: {exc}") from exc
        self._pending_reader = reader
        sock.settimeout(None)  # sends block until done; the reader polls with select
        return sock

    @property
    def inflight(self) -> int:
        return self.published - self.acked if self.qos else 0

    def publish(self, messages: Sequence[Message]) -> None:
        """Send ``messages`` in order, waiting for window space as needed."""
        start = 0
        while start < len(messages):
            room = self._wait_for_room(len(messages) - start)
            chunk = messages[start : start + room]
            self._send(b"".join(self._packets(chunk)))
            start += len(chunk)

    def _packets(self, chunk: Sequence[Message]) -> list[bytes]:
        packets = []
        version, qos = self.version, self.qos
        for topic, payload, retain in chunk:
            packet_id = 0
            if qos:
                self._next_id = self._next_id % MAX_PACKET_ID + 1
                packet_id = self._next_id
            packets.append(publish_packet(topic, payload, packet_id, version, retain))
        with self._cond:
            self.published += len(chunk)
        return packets

    def _wait_for_room(self, wanted: int) -> int:
        if not self.qos:
            return wanted
        with self._cond:
            while self.max_inflight - self.inflight <= 0:
                self._raise_if_failed()
                self._cond.wait(0.5)
                self._ping_if_idle()
            return min(wanted, self.max_inflight - self.inflight)

    def _send(self, data: bytes) -> None:
        with self._send_lock:  # the reader thread pings on the same socket
            self._sock.sendall(data)
            self._last_sent = time.monotonic()

    def _ping_if_idle(self) -> None:
        """Keep an idle connection alive: a device link waits for its outage, maybe for hours,
        and a broker drops a silent client after 1.5 x keepalive (its will would fire)."""
        if time.monotonic() - self._last_sent > self.config.keepalive_s / 2:
            with contextlib.suppress(OSError):
                self._send(PINGREQ_PACKET)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until the broker acknowledged everything published."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.inflight > 0:
                self._raise_if_failed()
                if time.monotonic() > deadline:
                    raise MqttError(f"{self.inflight} messages unacknowledged after {timeout_s}s")
                self._cond.wait(0.2)
                self._ping_if_idle()

    def _raise_if_failed(self) -> None:
        if self._error:
            raise MqttError(self._error)

    def _read_acks(self) -> None:
        reader = self._pending_reader
        while True:
            try:
                pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()
                if not pending and not select.select([self._sock], [], [], 1.0)[0]:
                    self._ping_if_idle()
                    continue
                with self._send_lock:  # one thread at a time on the socket (TLS needs it)
                    data = self._sock.recv(65_536)
            except (OSError, ValueError) as exc:  # ValueError: select on a closed socket
                data, error = b"", str(exc)
            else:
                error = "the broker closed the connection"
            if data:
                try:
                    self._count_acks(reader.feed(data).controls)
                    continue
                except MqttError as exc:  # malformed, or the broker's DISCONNECT
                    error = f"{self.config.url}: {exc}"
            with self._cond:
                self._error = self._error or error
                self._cond.notify_all()
            return

    def _count_acks(self, controls: list[Control]) -> None:
        acks = refused = 0
        for control in controls:
            if control.type == PUBACK:
                acks += 1
                if puback_reason(control, self.version) >= 0x80:
                    refused += 1
            elif control.type == DISCONNECT:
                raise MqttError(f"disconnected: {disconnect_reason(control, self.version)}")
            elif control.type == CONNACK:
                raise MqttProtocolError("a second CONNACK on one connection")
        if acks:
            with self._cond:
                self.acked += acks
                self.refused += refused
                self._cond.notify_all()

    def close(self) -> None:
        """Disconnect cleanly (no last will)."""
        with contextlib.suppress(OSError):
            self._sock.sendall(DISCONNECT_PACKET)
        self._close_socket()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the last will."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._close_socket()

    def _close_socket(self) -> None:
        with self._cond:
            self._error = self._error or "closed"
        with contextlib.suppress(OSError):
            self._sock.close()
        self._reader.join(timeout=5)


class DeviceLinks:
    """Per-device connections with a last will, for devices that will drop off."""

    def __init__(self, config: MqttConfig, client_prefix: str) -> None:
        self.config = config
        self.prefix = client_prefix
        self._links: dict[int, BulkPublisher] = {}
        self.published = 0

    def connect(self, number: int, status_topic: str, birth: bytes) -> None:
        """Connect as the device (will: retained offline) and publish its retained birth."""
        link = BulkPublisher(
            self.config, f"{self.prefix}-dev{number}", will=(status_topic, OFFLINE)
        )
        link.publish([(status_topic, birth, True)])
        link.flush(10)
        self._links[number] = link
        self.published += 1

    def drop(self, number: int) -> None:
        link = self._links.pop(number, None)
        if link is not None:
            link.abort()

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
