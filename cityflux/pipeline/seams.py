"""The two seams of the pipeline: where messages come from and where results go.

Protocols, not base classes: :class:`cityflux.mqtt.consumer.MqttConsumer` is the source today
and a NATS JetStream consumer is the next one (docs/architecture.md); the sink is the InfluxDB
writer with the spool behind it (:class:`cityflux.store.sink.DurableSink`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cityflux.model.messages import MessageBatch
from cityflux.store.sink import SinkResult


class Source(Protocol):
    """At-least-once delivery: a message taken but never acknowledged comes back (after a
    reconnect or a restart), so the pipeline acknowledges only what is durable."""

    client_id: str

    def start(self, wait_s: float = 0.0) -> None:
        """Connect in the background; raise if ``wait_s`` > 0 and not connected by then."""

    def stop(self) -> None: ...

    def is_connected(self) -> bool: ...

    def has_pending(self) -> bool:
        """Messages received and not yet taken (the watchdog's "work waiting")."""

    def take(self, max_messages: int, wait_s: float) -> MessageBatch: ...

    def ack(self, batch: MessageBatch) -> bool:
        """Settle a durable batch; False if it can no longer be settled (redelivered later)."""

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> object:
        """Send one message (alert changes, dead letters), queued while disconnected."""

    def publish_confirmed(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        """Send and wait for the server to have them; how many it confirmed."""


class Sink(Protocol):
    """Durable on return of :meth:`write` (stored, or spooled to disk to be drained later)."""

    @property
    def database_up(self) -> bool: ...

    def write(self, lines: list[str]) -> SinkResult: ...

    def drain_loop(self, progress: Callable[[], None]) -> None:
        """Empty the backlog into the database while it answers, until :meth:`stop`."""

    def backlog(self) -> tuple[int, int]:
        """Records and bytes waiting to be drained."""

    def stop(self) -> None: ...

    def close(self) -> None: ...
