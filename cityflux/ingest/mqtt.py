"""The MQTT side: a paho-mqtt client with manual acknowledgements and a persistent session.

paho's network thread only appends each message to a buffer (the least per-message Python work
we can do: see docs/performance.md for why paho and not aiomqtt); the pipeline thread takes the
buffer as a batch and acknowledges its messages once they are durable. After a disconnect the
broker redelivers every unacknowledged message of the session, so the batch in hand and the
buffer are discarded instead of acknowledged: packet ids of an old connection mean nothing on
the new one, and the redelivered copies are written again (idempotent in InfluxDB).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cityflux.config import MqttConfig
from cityflux.errors import IngestError
from cityflux.observability import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MessageBatch:
    """Messages taken together; ``generation`` names the connection they arrived on."""

    topics: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    mids: list[int] = field(default_factory=list)
    generation: int = 0
    first_received: float = 0.0  # time.monotonic() of the first message

    def __len__(self) -> int:
        return len(self.mids)


class MqttConsumer:
    """Subscribes to ``{topic_root}/#`` (shared when several workers split the load)."""

    def __init__(self, config: MqttConfig, metrics: Metrics, worker: int = 0, workers: int = 1):
        self.config = config
        self.metrics = metrics
        self.client_id = config.client_id if workers == 1 else f"{config.client_id}-{worker}"
        pattern = f"{config.topic_root}/#"
        self.subscription = pattern if workers == 1 else f"$share/{config.shared_group}/{pattern}"
        self.status_topic = f"{config.topic_root}/health/{self.client_id}/status"
        self._cond = threading.Condition()
        self._batch = MessageBatch()
        self._generation = 0
        self.connected = threading.Event()
        self._client = self._make_client()

    # -- set-up ---------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        v5 = self.config.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        client.max_queued_messages_set(0)  # our own dead letters: never dropped client-side
        client.max_inflight_messages_set(1_000)
        client.reconnect_delay_set(
            min_delay=max(1, round(self.config.reconnect_min_s)),
            max_delay=max(1, round(self.config.reconnect_max_s)),
        )
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self.config.tls.enabled or self.config.url.startswith("mqtts://"):
            self._configure_tls(client)
        client.will_set(self.status_topic, b'{"state":"offline"}', qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _configure_tls(self, client: paho.Client) -> None:
        tls = self.config.tls
        client.tls_set(
            ca_certs=tls.ca_file,
            certfile=tls.cert_file,
            keyfile=tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure)

    def _connect_properties(self) -> Properties | None:
        if self.config.protocol != "5":
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = min(self.config.receive_maximum, 65_535)
        return properties

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_s: float = 0.0) -> None:
        """Connect in the background (paho retries forever); optionally wait for CONNACK."""
        try:
            self._client.connect_async(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=self._connect_properties(),
            )
        except (OSError, ValueError) as exc:
            raise IngestError(f"cannot connect to {self.config.url}: {exc}") from exc
        self._client.loop_start()
        if wait_s and not self.connected.wait(wait_s):
            raise IngestError(f"no CONNACK from {self.config.url} within {wait_s:.0f}s")

    def stop(self) -> None:
        self._client.publish(self.status_topic, b'{"state":"offline"}', qos=1, retain=True)
        self._client.disconnect()
        self._client.loop_stop()

    # -- callbacks (paho's network thread) -----------------------------------------------------
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker %s refused the connection: %s", self.config.url, reason)
            return
        client.subscribe(self.subscription, qos=1)
        client.publish(self.status_topic, b'{"state":"online"}', qos=1, retain=True)
        self.metrics.mqtt_connected.set(1)
        self.connected.set()
        log.info(
            "connected to %s as %s (session present: %s)",
            self.config.url,
            self.client_id,
            flags.session_present,
        )

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        self.metrics.mqtt_connected.set(0)
        with self._cond:
            self._generation += 1
            self._batch = MessageBatch(generation=self._generation)
        log.warning(
            "disconnected from %s: %s; paho reconnects with backoff", self.config.url, reason
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            batch = self._batch
            if not batch.mids:
                batch.first_received = time.monotonic()
            batch.topics.append(_topic(message))
            batch.payloads.append(bytes(message.payload))
            batch.mids.append(message.mid)
            self._cond.notify()

    # -- the pipeline's side ----------------------------------------------------------------
    def take(self, max_messages: int, wait_s: float) -> MessageBatch:
        """Up to ``max_messages`` messages, after at most ``wait_s`` seconds of waiting."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while len(self._batch) < max_messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, self._batch = _split(self._batch, max_messages)
        self.metrics.received.inc(len(batch))
        return batch

    def ack(self, batch: MessageBatch) -> bool:
        """Acknowledge a durable batch; False if the connection it came on is gone."""
        with self._cond:
            if batch.generation != self._generation:
                return False
        for mid in batch.mids:
            self._client.ack(mid, 1)
        self.metrics.acked.inc(len(batch))
        return True

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; queued by paho while disconnected and sent on reconnect."""
        self._client.publish(topic, payload, qos=1)


def _split(batch: MessageBatch, size: int) -> tuple[MessageBatch, MessageBatch]:
    """The first ``size`` messages, and the rest as the new buffer."""
    if len(batch) <= size:
        return batch, MessageBatch(generation=batch.generation)
    head = MessageBatch(
        batch.topics[:size],
        batch.payloads[:size],
        batch.mids[:size],
        batch.generation,
        batch.first_received,
    )
    tail = MessageBatch(
        batch.topics[size:],
        batch.payloads[size:],
        batch.mids[size:],
        batch.generation,
        time.monotonic(),
    )
    return head, tail


def _topic(message: paho.MQTTMessage) -> str:
    try:
        return message.topic
    except UnicodeDecodeError:  # brokers refuse such topics; if one slips through, reject it
        return message._topic.decode("utf-8", "replace")
