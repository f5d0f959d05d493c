"""A batch of raw messages as a source hands it to the pipeline (cityflux/pipeline/source.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class MessageBatch:
    """Messages taken together, in arrival order.

    ``receipts`` are the source's handles to settle each message once it is durable (MQTT: the
    packet identifier, 0 for QoS 0, nothing to acknowledge); they are valid only on the
    connection ``generation`` the messages arrived on.
    """

    topics: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    receipts: list[int] = field(default_factory=list)
    generation: int = 0
    first_received: float = 0.0  # time.monotonic() of the first message

    def __len__(self) -> int:
        return len(self.receipts)
