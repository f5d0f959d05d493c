"""Replay from the stream (``cityflux replay --from-stream --since 2h``): what the readings stream
still keeps, from a start time to the end it had when the replay began, as a pipeline Source.

The stream keeps every reading for ``nats.max_age_s`` (the replay horizon), whatever the live
workers have acknowledged. A replay reads it through a consumer of its own: ephemeral (no
durable name; the server deletes it ``INACTIVE_S`` after the replay stops asking), in memory,
one replica, ``ack_policy: none``, starting ``by_start_time`` at now - since. The live
partition consumers are different objects on the server: their pending counts, ack floors and
pins do not move (tests/integration/test_nats_replay.py checks it).

Ordered by hand, on the raw pull API as :mod:`cityflux.nats.source` is: nats-py 2.16's
``ordered_consumer`` keeps ``opt_start_time`` when it recreates its consumer by start sequence
after a gap, which the server refuses (nats.go #1281, nats.py #657). Each message carries its
consumer sequence; one missing (a message lost on the way: with ``ack_policy: none`` nothing is
redelivered) or a consumer gone (its server restarted) recreates the consumer
``by_start_sequence`` at the stream sequence after the last one handed over, so every message
in the range is handed over once, in stream order.

The end is fixed at the start: the stream's last sequence then. A message after it (readings
that arrived during the replay) ends the replay and is not handed over; so does a message with
nothing pending behind it on the consumer (the last of a partition).

Batches are cut as the live worker's were: at most ``batch_span_s`` of arrival time (the stream's
timestamps; default ``ingest.flush_interval_s``, the live batch's time limit) and ``batch_size``
messages. Lateness is judged per batch (docs/analytics.md), so a batch spanning minutes of event
time, as an uncut one at full speed does, would find readings too late that live were not.

Nothing a replay publishes reaches the live topics: alert changes and dead letters are dropped
and counted (:attr:`ReplayStats.alerts_dropped`, :attr:`ReplayStats.letters_dropped`); the
replay's alerts are in its own alerts database and, as points, in its own InfluxDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from nats.aio.client import Client
from nats.aio.msg import Msg

from cityflux.config import Config
from cityflux.errors import NatsError
from cityflux.model.messages import MessageBatch
from cityflux.nats.admin import NS, consumer_info, stream_info
from cityflux.nats.connect import connect, js_request
from cityflux.nats.partition import partition_subject, topic_of

log = logging.getLogger(__name__)

INACTIVE_S: Final = 30.0  # an abandoned replay's consumer is deleted by the server after this
FETCH: Final = 1_000  # messages per pull request
EXPIRES_S: Final = 1.0  # one pull request's life
_V1_TOKENS: Final = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>


@dataclass(slots=True)
class ReplayStats:
    """Where a replay stands; read by the command's progress line and summary."""

    start_ns: int = 0  # the start time asked for (arrival time in the stream)
    end_seq: int = 0  # the stream's last sequence when the replay began: it ends there
    expected: int = 0  # messages in the range when the consumer was made (the bar's total)
    first_seq: int = 0  # stream sequence of the first message handed over
    last_seq: int = 0  # ... and of the last
    delivered: int = 0  # messages handed over (received, in the range)
    taken: int = 0  # taken by the pipeline
    settled: int = 0  # acknowledged by the pipeline: durable
    resets: int = 0  # consumer re-created after a gap or its loss
    alerts_dropped: int = 0  # alert changes not published (a replay is not live)
    letters_dropped: int = 0  # dead letters not published (they are in the replay's database)
    caught_up: bool = False  # every message up to end_seq handed over
    began: float = field(default_factory=time.monotonic)
    caught_up_s: float = 0.0  # seconds from the start to caught_up


@dataclass(slots=True)
class _Request:
    """One pull request in flight."""

    messages: list[Msg] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Buffer:
    """Messages handed over and not taken yet, with their arrival times (stream timestamps)."""

    topics: deque[str] = field(default_factory=deque)
    payloads: deque[bytes] = field(default_factory=deque)
    arrived: deque[int] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.topics)

    def span_complete(self, span_ns: int, size: int) -> bool:
        """A whole batch is here: ``size`` messages, or one arrived after the span's end."""
        return len(self) >= size or (
            span_ns > 0 and len(self) > 0 and self.arrived[-1] - self.arrived[0] >= span_ns
        )

    def take(self, size: int, span_ns: int) -> tuple[list[str], list[bytes]]:
        topics: list[str] = []
        payloads: list[bytes] = []
        if not self.topics:
            return topics, payloads
        until = self.arrived[0] + span_ns if span_ns > 0 else None
        while self.topics and len(topics) < size:
            if until is not None and self.arrived[0] >= until:
                break
            topics.append(self.topics.popleft())
            payloads.append(self.payloads.popleft())
            self.arrived.popleft()
        return topics, payloads


class ReplaySource:
    """The pipeline's :class:`~cityflux.pipeline.seams.Source` over a range of the stream.

    ``partition``: one partition's readings only (default: the whole stream, every district,
    in stream order: the order they arrived in, across partitions).
    """

    def __init__(
        self,
        config: Config,
        since_s: float,
        partition: int | None = None,
        batch_span_s: float | None = None,
        client_id: str | None = None,
    ) -> None:
        if since_s <= 0:
            raise NatsError(f"--since must be positive, not {since_s}")
        if partition is not None and not 0 <= partition < config.nats.partitions:
            raise NatsError(f"partition {partition} is not one of 0..{config.nats.partitions - 1}")
        self.config = config
        self.nats = config.nats
        self.since_s = since_s
        self.partition = partition
        span = config.ingest.flush_interval_s if batch_span_s is None else batch_span_s
        self.span_ns = round(span * NS)
        self.client_id = client_id or f"cityflux-replay-{uuid.uuid4().hex[:8]}"
        self.topic_root = config.mqtt.topic_root.rstrip("/")
        self.stats = ReplayStats()
        self.connected = threading.Event()
        self.finished = threading.Event()  # caught up, or failed (then .failure says why)
        self.failure: str | None = None
        self._cond = threading.Condition()
        self._buffer = _Buffer()
        self._limit = config.ingest.batch_size * (config.ingest.write_concurrency + 2)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._consumer: str | None = None
        self._next_cseq = 1  # the consumer sequence the next message must carry

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_s: float = 0.0) -> None:
        """Connect, find the range and make the consumer; with ``wait_s`` > 0 raise NatsError
        if that fails or takes longer (a missing stream, an unreachable server)."""
        self._thread = threading.Thread(target=self._run, name="nats-replay", daemon=True)
        self._thread.start()
        if not wait_s:
            return
        deadline = time.monotonic() + wait_s
        while not self.connected.wait(0.05):
            if self.failure is not None:
                raise NatsError(self.failure)
            if time.monotonic() >= deadline:
                raise NatsError(
                    f"no connection to {', '.join(self.nats.urls)} within {wait_s:.0f}s"
                )

    def stop(self) -> None:
        self._stopping.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout=15)

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def done(self) -> bool:
        """Every message of the range handed over, taken and made durable."""
        stats = self.stats
        return (
            self.finished.is_set() and stats.settled == stats.delivered and not self.has_pending()
        )

    # -- the pipeline's side ----------------------------------------------------------------
    def has_pending(self) -> bool:
        with self._cond:
            return len(self._buffer) > 0

    def take(self, max_messages: int, wait_s: float) -> MessageBatch:
        deadline = time.monotonic() + wait_s
        with self._cond:
            while not self._buffer.span_complete(self.span_ns, max_messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.finished.is_set():
                    break
                self._cond.wait(remaining)
            topics, payloads = self._buffer.take(max_messages, self.span_ns)
            self._cond.notify_all()  # room for the puller
        batch = MessageBatch()
        if topics:
            first = self.stats.taken + 1
            batch.topics, batch.payloads = topics, payloads
            batch.receipts = list(range(first, first + len(topics)))
            batch.first_received = time.monotonic()
            self.stats.taken += len(topics)
        return batch

    def ack(self, batch: MessageBatch) -> bool:
        """Nothing to settle on the server (``ack_policy: none``): counted, for :meth:`done`."""
        with self._cond:
            self.stats.settled += len(batch)
        return True

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> object:
        """Alert changes of the replay: dropped and counted, never on the live topics."""
        with self._cond:
            self.stats.alerts_dropped += 1
        return None

    def publish_confirmed(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        """Dead letters of the replay: dropped and counted (each is also a point in the
        replay's database); reported as settled so that the batch is acknowledged."""
        with self._cond:
            self.stats.letters_dropped += len(messages)
        return len(messages)

    # -- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except NatsError as exc:  # no stream, no server: the command says so and exits 1
            self.failure = str(exc)
        except Exception as exc:
            log.exception("replay from the stream failed")
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.set()
            with self._cond:
                self._cond.notify_all()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        nc = await connect(self.nats, self.client_id, wait_s=10.0)
        self._nc = nc
        try:
            await self._begin(nc)
            self.connected.set()
            await self._pull_all(nc)
        finally:
            self.connected.clear()
            await self._delete_consumer(nc)
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _begin(self, nc: Client) -> None:
        """The range: from now - since to the stream's last sequence now."""
        info = await stream_info(nc, self.nats.stream)
        if info is None:
            raise NatsError(
                f"no stream {self.nats.stream} on {', '.join(self.nats.urls)}: "
                "run `cityflux nats init` (and let devices publish) first"
            )
        stats = self.stats
        stats.end_seq = int(info["state"].get("last_seq", 0))
        stats.start_ns = time.time_ns() - round(self.since_s * NS)
        created = await self._create({"deliver_policy": "by_start_time", "opt_start_time":
                                      _rfc3339(stats.start_ns)})  # fmt: skip
        stats.expected = int(created.get("num_pending", 0))
        if stats.end_seq == 0 or stats.expected == 0:
            self._caught_up()

    async def _create(self, start: dict[str, Any]) -> dict[str, Any]:
        self.stats.resets += self._consumer is not None
        self._consumer = f"{self.client_id}-{self.stats.resets}"
        config: dict[str, Any] = {
            "name": self._consumer,
            "ack_policy": "none",
            "replay_policy": "instant",
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(INACTIVE_S * NS),
            "max_waiting": 4,
            **start,
        }
        if self.partition is not None:
            config["filter_subject"] = partition_subject(self.nats.subject_root, self.partition)
        self._next_cseq = 1
        subject = f"$JS.API.CONSUMER.CREATE.{self.nats.stream}.{self._consumer}"
        body = {"stream_name": self.nats.stream, "config": config}
        return await js_request(self._client(), subject, body)

    def _client(self) -> Client:
        if self._nc is None:
            raise NatsError("not connected to NATS")
        return self._nc

    async def _reset(self, why: str) -> None:
        """Resume after the last message handed over, on a new consumer."""
        log.warning("replay: %s; resuming after stream sequence %d", why, self.stats.last_seq)
        await self._delete_consumer(self._client())
        if self.stats.last_seq:
            start: dict[str, Any] = {
                "deliver_policy": "by_start_sequence",
                "opt_start_seq": self.stats.last_seq + 1,
            }
        else:  # nothing handed over yet: the same start time
            start = {"deliver_policy": "by_start_time",
                     "opt_start_time": _rfc3339(self.stats.start_ns)}  # fmt: skip
        created = await self._create(start)
        if int(created.get("num_pending", 0)) == 0:
            self._caught_up()

    async def _delete_consumer(self, nc: Client) -> None:
        if self._consumer is None or not nc.is_connected:
            return
        with contextlib.suppress(Exception):
            await js_request(
                nc, f"$JS.API.CONSUMER.DELETE.{self.nats.stream}.{self._consumer}", timeout_s=2
            )

    async def _pull_all(self, nc: Client) -> None:
        """Pull requests until the range is handed over (or the replay is stopped)."""
        request: _Request | None = None

        async def on_message(msg: Msg) -> None:
            if request is None:
                return
            status = msg.headers.get("Status") if msg.headers else None
            if status is None:
                request.messages.append(msg)
                if len(request.messages) >= FETCH:
                    request.done.set()
            elif status != "100":  # 404, 408: the request ended; 409: the consumer is gone
                request.done.set()

        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox, cb=on_message)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.nats.stream}"
        body = json.dumps({"batch": FETCH, "expires": int(EXPIRES_S * NS)}).encode()
        try:
            while not self.finished.is_set() and not self._stopping.is_set():
                await self._wait_for_room()
                if self._stopping.is_set():
                    break
                request = _Request()
                await nc.publish(f"{subject}.{self._consumer}", body, reply=inbox)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(request.done.wait(), EXPIRES_S + 1.0)
                done, request = request, None
                if not await self._hand_over(done.messages):
                    await self._check_consumer(nc)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _hand_over(self, messages: list[Msg]) -> bool:
        """A request's messages into the buffer, in order, up to the end of the range; False
        if none was this consumer's. A gap in the consumer sequence re-creates the consumer
        (the rest of the answer is dropped: the new consumer delivers it again)."""
        topics: list[str] = []
        payloads: list[bytes] = []
        arrived: list[int] = []
        stats, end, expected = self.stats, self.stats.end_seq, self._next_cseq
        first = last = 0
        gap = ""
        for msg in messages:
            if not msg.reply:
                continue
            consumer, sseq, cseq, at, pending = _fields(msg.reply)
            if consumer != self._consumer:
                continue  # of a consumer a reset replaced, still on its way
            if cseq != expected:
                gap = f"consumer sequence {cseq}, expected {expected}"
                break
            expected += 1
            if sseq > end:  # arrived after the replay began: not in the range
                self._caught_up()
                break
            topics.append(topic_of(msg.subject, self.nats.subject_root, self.topic_root))
            payloads.append(msg.data)
            arrived.append(at)
            first, last = first or sseq, sseq
            if sseq == end or pending == 0:
                self._caught_up()
                break
        self._next_cseq = expected
        if topics:
            with self._cond:
                self._buffer.topics.extend(topics)
                self._buffer.payloads.extend(payloads)
                self._buffer.arrived.extend(arrived)
                stats.delivered += len(topics)
                stats.first_seq = stats.first_seq or first
                stats.last_seq = last
                self._cond.notify_all()
        if gap and not self.finished.is_set():
            await self._reset(gap)
        return bool(topics) or bool(gap) or self.finished.is_set()

    async def _check_consumer(self, nc: Client) -> None:
        """An empty answer: is the consumer still there, and did its last messages arrive?"""
        info = await consumer_info(nc, self.nats.stream, self._consumer or "")
        if info is None:
            await self._reset("the replay's consumer is gone")
            return
        delivered = int(info.get("delivered", {}).get("consumer_seq", 0))
        if delivered >= self._next_cseq:
            await self._reset(f"{delivered - self._next_cseq + 1} messages lost on the way")
        elif int(info.get("num_pending", 0)) == 0:
            self._caught_up()

    def _caught_up(self) -> None:
        self.stats.caught_up = True
        self.stats.caught_up_s = time.monotonic() - self.stats.began
        self.finished.set()
        with self._cond:
            self._cond.notify_all()

    async def _wait_for_room(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                if len(self._buffer) < self._limit:
                    return
            await asyncio.sleep(0.01)


def _fields(reply: str) -> tuple[str, int, int, int, int]:
    """(consumer, stream sequence, consumer sequence, stream timestamp ns, pending) from a
    JetStream reply subject, in the v1 layout or the v2 one (with domain and account hash)."""
    tokens = reply.split(".")
    base = 3 if len(tokens) == _V1_TOKENS else 5
    return (
        tokens[base],
        int(tokens[base + 2]),
        int(tokens[base + 3]),
        int(tokens[base + 4]),
        int(tokens[base + 5]),
    )


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
