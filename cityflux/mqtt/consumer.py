"""The MQTT side: a lean QoS 1 consumer with a persistent session, and a paho publisher.

Receiving is the hot path, so it uses :mod:`cityflux.mqtt.codec` on a plain socket: one
thread reads large chunks, parses every packet in them, and appends them to the current batch
under one lock acquisition per chunk. The pipeline thread takes the batch and, once it is
durable, acknowledges it with one ``sendall`` of all its PUBACKs.

Publishing (dead letters, cityflux's own birth and last will) is rare and must survive
reconnects with its own QoS 1 state, so it uses paho-mqtt, the well-kept library.

After a disconnect the broker redelivers every unacknowledged message of the session, so the
buffer and the batch in hand are discarded instead of acknowledged: packet ids of an old
connection mean nothing on the new one, and the redelivered copies are written again
(idempotent in InfluxDB).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cityflux.config import MqttConfig
from cityflux.errors import MqttError, MqttProtocolError
from cityflux.model.contract import OFFLINE, ONLINE
from cityflux.model.inbox import WaitingInbox
from cityflux.model.messages import MessageBatch
from cityflux.mqtt.codec import (
    AUTH,
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    SUBACK,
    V5,
    V311,
    ConnectOptions,
    Control,
    PacketReader,
    Parsed,
    connect_packet,
    puback_packets,
    subscribe_packet,
)
from cityflux.mqtt.control import Connack, accepted_connack, disconnect_reason, suback_codes
from cityflux.mqtt.oversize import OversizedPayload
from cityflux.observability import Metrics
from cityflux.supervisor import Component, Supervisor, backoff

log = logging.getLogger(__name__)
RECV_BYTES = 256 * 1024
V311_WARNING = (
    "mqtt.protocol is 3.1.1: the broker %s decides how many messages it holds for us, and "
    "mosquitto's defaults (max_inflight_messages 20, max_queued_messages 1000) drop a burst; "
    "size them as in deploy/mosquitto/mosquitto.conf (docs/deploy.md), or use protocol 5"
)


class MqttConsumer:
    """Subscribes to ``{topic_root}/#`` (shared when several workers split the load)."""

    def __init__(
        self,
        config: MqttConfig,
        metrics: Metrics,
        worker: int = 0,
        workers: int = 1,
        supervisor: Supervisor | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.client_id = config.client_id if workers == 1 else f"{config.client_id}-{worker}"
        pattern = f"{config.topic_root}/#"
        self.subscription = pattern if workers == 1 else f"$share/{config.shared_group}/{pattern}"
        self.status_topic = f"{config.topic_root}/health/{self.client_id}/status"
        self.version = V5 if config.protocol == "5" else V311
        self.connected = threading.Event()
        self._inbox = WaitingInbox()
        self._generation = 0
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._last_sent = 0.0
        self.connack: Connack | None = None  # the last CONNACK: the broker's MQTT 5 limits
        self._stopping = threading.Event()
        self._owns_supervisor = supervisor is None
        self.supervisor = supervisor or Supervisor()
        self.publisher = _make_publisher(config, f"{self.client_id}-pub", self.status_topic)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_s: float = 0.0) -> None:
        """Connect in the background (retrying forever); optionally wait for the CONNACK."""
        if self.version == V311:  # the broker's limits, not our Receive Maximum, decide loss
            log.warning(V311_WARNING, self.config.url)
        self.publisher.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        # paho's own network loop, on a supervised thread instead of loop_start's bare one
        self.supervisor.spawn("mqtt-publisher", paho_network_loop(self.publisher))
        self.supervisor.spawn("mqtt-reader", self._connection_loop)
        if wait_s and not self.connected.wait(wait_s):
            raise MqttError(f"no CONNACK from {self.config.url} within {wait_s:.0f}s")

    def stop(self) -> None:
        if self._owns_supervisor:
            self.supervisor.stop()
        self._stopping.set()
        self._send(DISCONNECT_PACKET)
        self._close_socket()
        reader = self.supervisor.components.get("mqtt-reader")
        if reader is not None and reader.thread is not None:
            reader.thread.join(timeout=10)
        if self.publisher.is_connected():
            info = self.publisher.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # raced with a disconnect
                info.wait_for_publish(2)
        self.publisher.disconnect()  # ends its network loop
        publisher = self.supervisor.components.get("mqtt-publisher")
        if publisher is not None and publisher.thread is not None:
            publisher.thread.join(timeout=5)

    # -- the connection thread --------------------------------------------------------------
    def _connection_loop(self, component: Component) -> None:
        attempt = 0
        while not self._stopping.is_set():
            component.beat()
            try:
                reader = self._connect()
                attempt = 0
                self._serve(reader)
            except (OSError, MqttError) as exc:
                if isinstance(exc, MqttProtocolError):  # a malformed packet: reconnect, counted
                    self.metrics.mqtt_protocol_errors.inc()
                if not self._stopping.is_set():
                    log.warning("MQTT connection to %s: %s", self.config.url, exc)
            finally:
                self._on_disconnect()
            attempt += 1
            delay = backoff(attempt, self.config.reconnect_min_s, self.config.reconnect_max_s)
            self._stopping.wait(max(delay, self.config.reconnect_min_s / 2))

    def _connect(self) -> PacketReader:
        sock = open_socket(self.config)
        self._sock = sock
        reader = PacketReader(self.version, self.config.max_packet_size)
        self._send(connect_packet(self._connect_options()))
        connack = accepted_connack(self._await_control(sock, reader, CONNACK), self.version)
        self.connack = connack
        self._send(subscribe_packet(1, self.subscription, 1, self.version))
        suback = self._await_control(sock, reader, SUBACK)
        codes = suback_codes(suback, self.version, packet_id=1)
        if codes[0] >= 0x80:
            raise MqttError(f"broker refused the subscription {self.subscription}: {codes}")
        log.info(
            "connected to %s as %s (session present: %s, keep alive %ss, receive maximum %s, "
            "maximum packet size %s)",
            self.config.url,
            self.client_id,
            connack.session_present,
            self._keepalive_s(),
            connack.receive_maximum,  # both limit what we send: only PUBACKs and SUBSCRIBE
            connack.maximum_packet_size,
        )
        self.metrics.mqtt_connected.set(1)
        self.connected.set()
        return reader

    def _await_control(self, sock: socket.socket, reader: PacketReader, kind: int) -> Control:
        """Read until a control packet of ``kind``; PUBLISHes before it are kept."""
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise MqttError("broker closed the connection")
            parsed = reader.feed(data)
            self._append(parsed.topics, parsed.payloads, parsed.packet_ids)
            for control in parsed.controls:
                if control.type == kind:
                    return control
                if kind == CONNACK:  # MQTT-3.2.0-1: the server's first packet is CONNACK
                    raise MqttProtocolError(f"packet type {control.type} before the CONNACK")
                self._check_control(control)

    def _check_control(self, control: Control) -> None:
        """Raise for a control packet that ends the connection; others need no answer."""
        if control.type == DISCONNECT:  # MQTT 5: the broker says why it closes
            raise MqttError(f"broker disconnected us: {disconnect_reason(control, self.version)}")
        if control.type == CONNACK:
            raise MqttProtocolError("a second CONNACK on one connection")
        if control.type == AUTH:
            raise MqttProtocolError("AUTH without enhanced authentication")

    def _keepalive_s(self) -> int:
        """MQTT 5 Server Keep Alive replaces ours (MQTT-3.2.2-21). Its 0 (no keep alive)
        keeps ours: pinging is always allowed and is how we notice a dead broker."""
        server = self.connack.server_keep_alive if self.connack else None
        return server if server else self.config.keepalive_s

    def _serve(self, reader: PacketReader) -> None:
        sock = self._sock
        assert sock is not None
        keepalive = self._keepalive_s()
        sock.settimeout(max(keepalive / 2, 0.5))
        last_received = time.monotonic()
        while not self._stopping.is_set():
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                data = None
            now = time.monotonic()
            if data == b"":
                raise MqttError("broker closed the connection")
            if data:
                last_received = now
                oversized = reader.oversized
                parsed = reader.feed(data)
                if parsed.topics:
                    self._append(parsed.topics, parsed.payloads, parsed.packet_ids)
                if reader.oversized != oversized:  # rare: each one is over max_packet_size
                    _log_oversized(parsed, reader.max_packet_size)
                for control in parsed.controls:
                    self._check_control(control)
            elif now - last_received > keepalive * 1.5:
                raise MqttError(f"nothing from the broker for {keepalive * 1.5:.0f}s")
            if now - self._last_sent >= keepalive / 2:
                self._send(PINGREQ_PACKET)

    def _append(self, topics: list[str], payloads: list[bytes], ids: list[int]) -> None:
        if not topics:
            return
        self._inbox.append(topics, payloads, ids)

    def _on_disconnect(self) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
        self._close_socket()
        with self._inbox.lock:
            self._generation += 1
            self._inbox.reset(self._generation)
        if was_connected and not self._stopping.is_set():
            log.warning(
                "disconnected from %s; unacknowledged messages will be redelivered", self.config.url
            )

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # shutdown first: close() alone does not wake the reader thread's blocked recv
            # (it would wait for its timeout, keepalive / 2) unless the broker hangs up too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _send(self, data: bytes) -> bool:
        with self._send_lock:
            return self._send_locked(data)

    def _send_locked(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendall(data)
        except OSError:
            return False
        self._last_sent = time.monotonic()
        return True

    def _connect_options(self) -> ConnectOptions:
        return ConnectOptions(
            client_id=self.client_id,
            version=self.version,
            keepalive_s=self.config.keepalive_s,
            username=self.config.username,
            password=self.config.password,
            session_expiry_s=self.config.session_expiry_s,
            receive_maximum=min(self.config.receive_maximum, 65_535),
            # not sent by default: mosquitto drops what exceeds it without counting the drop;
            # the reader reads an oversized PUBLISH through into a too_large dead letter instead
            max_packet_size=self.config.max_packet_size
            if self.config.send_max_packet_size
            else None,
        )

    # -- the pipeline's side ----------------------------------------------------------------
    def has_pending(self) -> bool:
        """Messages received and not yet taken: work waiting for the pipeline."""
        return len(self._inbox) > 0

    def take(self, max_messages: int, wait_s: float) -> MessageBatch:
        """Up to ``max_messages`` messages, after at most ``wait_s`` seconds of waiting."""
        batch = self._inbox.take(max_messages, wait_s)
        self.metrics.received.inc(len(batch))
        return batch

    def ack(self, batch: MessageBatch) -> bool:
        """Acknowledge a durable batch; False if the connection it came on is gone."""
        acks = puback_packets(batch.receipts)
        with self._send_lock:  # no reconnect can slip between the check and the send
            with self._inbox.lock:
                if batch.generation != self._generation:
                    return False
            if not self._send_locked(acks):
                return False
        self.metrics.acked.inc(len(batch))
        return True

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        """QoS 1 through paho: queued while disconnected and sent on reconnect."""
        return self.publisher.publish(topic, payload, qos=1, retain=retain)

    def publish_confirmed(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        """Publish and wait up to ``timeout_s`` for the broker to have them; how many it
        confirmed. The rest stay queued in paho and are sent on reconnect."""
        infos = [self.publish(topic, payload) for topic, payload in messages]
        deadline = time.monotonic() + timeout_s
        for info in infos:
            if info.rc == paho.MQTT_ERR_NO_CONN:
                continue  # queued while disconnected: waiting would raise, not help
            with contextlib.suppress(RuntimeError, ValueError):  # a disconnect meanwhile
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        return sum(1 for info in infos if _confirmed(info))


def open_socket(config: MqttConfig, timeout_s: float = 10.0) -> socket.socket:
    """A TCP (or TLS, for ``mqtts://`` or ``tls.enabled``) connection to the broker."""
    sock = socket.create_connection((config.host, config.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if config.tls.enabled or config.url.startswith("mqtts://"):
        tls = config.tls
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.insecure:
            context.check_hostname = False
        sock = context.wrap_socket(sock, server_hostname=config.host)
    return sock


def paho_network_loop(client: paho.Client) -> Callable[[Component], None]:
    """paho's network loop as a supervised target, instead of loop_start's bare thread: it
    reconnects by itself and returns after the client's ``disconnect()``."""

    def loop(component: Component) -> None:
        component.beat()
        client.loop_forever(retry_first_connection=True)

    return loop


def apply_credentials(client: paho.Client, config: MqttConfig) -> None:
    """The configured username/password and TLS on a paho client (publisher, broker watcher,
    doctor, `alerts ack`). TLS is set up before anything is sent, so a password never goes
    in clear to an ``mqtts://`` URL; a missing or unreadable CA, certificate or key is one
    MqttError naming the setting."""
    if config.tls.enabled or config.url.startswith("mqtts://"):
        tls = config.tls
        for key, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file)):
            if path and not Path(path).is_file():
                raise MqttError(f"mqtt.tls.{key} {path} is not a readable file")
        try:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        except (OSError, ValueError) as exc:
            raise MqttError(f"TLS settings (mqtt.tls): {exc}") from exc
        client.tls_insecure_set(tls.insecure)
    if config.username:
        client.username_pw_set(config.username, config.password)


def _make_publisher(config: MqttConfig, client_id: str, status_topic: str) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5
        if config.protocol == "5"
        else MQTTProtocolVersion.MQTTv311,
        clean_session=None if config.protocol == "5" else False,
        reconnect_on_failure=True,
    )
    client.max_queued_messages_set(0)  # dead letters are never dropped client-side
    client.reconnect_delay_set(1, max(1, round(config.reconnect_max_s)))
    apply_credentials(client, config)
    client.will_set(status_topic, OFFLINE, qos=1, retain=True)
    client.on_connect = lambda c, *args: c.publish(status_topic, ONLINE, qos=1, retain=True)
    return client


def _log_oversized(parsed: Parsed, limit: int) -> None:
    for topic, payload in zip(parsed.topics, parsed.payloads, strict=True):
        if isinstance(payload, OversizedPayload):
            log.warning(
                "a PUBLISH on %s with a payload of %d bytes exceeds mqtt.max_packet_size (%d): "
                "read through without buffering it, dead-lettered too_large",
                topic[:200],
                len(payload),
                limit,
            )


def _confirmed(info: paho.MQTTMessageInfo) -> bool:
    """The broker has the message; paho raises instead of saying no for one it only queued."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
