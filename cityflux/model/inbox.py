"""Messages a source received and the pipeline has not taken yet (MQTT, JetStream).

Kept as the chunks the reader appended (one per socket read), so that taking a batch copies that
batch only; slicing one list off the front of the whole buffer copied everything behind it on
every take (a backlog holds several batches: ~7 % of cityflux's CPU in a py-spy profile).
"""

from __future__ import annotations

import threading
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


class WaitingInbox:
    """An :class:`Inbox` shared by a source's receiving side (:meth:`append`) and the pipeline
    (:meth:`take`, which waits for a full batch or its deadline). The receiving side wakes
    the pipeline only once a waiting take has enough: a wake per socket read or pull request
    would only send it back to waiting."""

    def __init__(self) -> None:
        self.lock = threading.Condition()  # also guards what a source changes with the inbox
        self._inbox = Inbox()
        self._wanted = 1  # messages the waiting take() needs before it is worth waking

    def __len__(self) -> int:
        with self.lock:
            return len(self._inbox)

    def append(self, topics: list[str], payloads: list[bytes], receipts: list[int]) -> None:
        with self.lock:
            self._inbox.append(topics, payloads, receipts)
            if len(self._inbox) >= self._wanted:
                self.lock.notify()

    def take(self, max_messages: int, wait_s: float) -> MessageBatch:
        """Up to ``max_messages`` messages, after at most ``wait_s`` seconds of waiting."""
        deadline = time.monotonic() + wait_s
        with self.lock:
            self._wanted = max_messages
            while len(self._inbox) < max_messages:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.lock.wait(remaining)
            self._wanted = 1
            return self._inbox.take(max_messages)

    def reset(self, generation: int) -> None:
        """Drop what is held (a connection lost: the broker redelivers it) and stamp what comes
        next with the new connection's ``generation``. The caller holds :attr:`lock`."""
        self._inbox = Inbox(generation)
