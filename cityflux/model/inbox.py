"""Messages a source received and the pipeline has not taken yet (MQTT, JetStream).

Kept as the chunks the reader appended (one per socket read), so that taking a batch copies that
batch only; slicing one list off the front of the whole buffer copied everything behind it on
every take (a backlog holds several batches: ~7 % of cityflux's CPU in a py-spy profile).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from cityflux.model.messages import MessageBatch


@dataclass(slots=True)
class _Chunk:
    topics: list[str]
    payloads: list[bytes]
    receipts: list[int]
    received: float  # time.monotonic() of its arrival


class Inbox:
    """FIFO of received messages; not thread-safe (the consumer holds its lock)."""

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation  # the connection these messages arrived on
        self._chunks: deque[_Chunk] = deque()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, topics: list[str], payloads: list[bytes], receipts: list[int]) -> None:
        if receipts:
            self._chunks.append(_Chunk(topics, payloads, receipts, time.monotonic()))
            self._count += len(receipts)

    def take(self, size: int) -> MessageBatch:
        """The first ``size`` messages (or all), in arrival order."""
        batch = MessageBatch(generation=self.generation)
        if not self._chunks:
            return batch
        batch.first_received = self._chunks[0].received
        while self._chunks and len(batch.receipts) < size:
            chunk = self._chunks[0]
            room = size - len(batch.receipts)
            if len(chunk.receipts) <= room:
                self._chunks.popleft()
                batch.topics += chunk.topics
                batch.payloads += chunk.payloads
                batch.receipts += chunk.receipts
            else:  # the rest of this chunk stays, with its own arrival time
                batch.topics += chunk.topics[:room]
                batch.payloads += chunk.payloads[:room]
                batch.receipts += chunk.receipts[:room]
                del chunk.topics[:room], chunk.payloads[:room], chunk.receipts[:room]
        self._count -= len(batch.receipts)
        return batch
