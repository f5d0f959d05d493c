"""The JetStream source: readings from the partitioned stream, for the pipeline's threads.

Each worker owns some partitions (:mod:`cityflux.nats.members` decides which, from the live
workers); for each it pulls from the partition's durable consumer as a member of its priority
group with the ``pinned_client`` policy, so the server hands a partition's messages to one
worker at a time, whatever the workers believe about each other (ADR-42). A worker that stops
asking for ``nats.pin_timeout_s`` loses the pin; the next worker asking gets it.

nats-py is asyncio and the pipeline is threads: the client runs on an event loop in a thread of
the pipeline's supervisor, and :meth:`take`, :meth:`ack` and the publishes cross over with
``run_coroutine_threadsafe``. nats-py 2.16 has no priority groups, so pull requests are sent on
the raw API (``$JS.API.CONSUMER.MSG.NEXT``) with the group and the pin id.

A message is acknowledged only after the pipeline made it durable (as with MQTT); one that was
delivered ``nats.max_deliver`` times without that (it keeps killing the worker) is handed to
``on_poison``, which dead-letters it, and is then terminated: counted, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Final

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from cityflux.config import Config
from cityflux.errors import NatsError
from cityflux.model.inbox import WaitingInbox
from cityflux.model.messages import MessageBatch
from cityflux.nats.connect import connect
from cityflux.nats.members import Members
from cityflux.nats.partition import TopicCache, deliveries
from cityflux.observability import Metrics
from cityflux.supervisor import Component, Supervisor

log = logging.getLogger(__name__)

# statuses that end a pull request (100 is an idle heartbeat)
_DONE: Final = frozenset({"404", "408", "409"})
_PIN_LOST: Final = "423"
Partitions = Callable[[frozenset[int], frozenset[int]], None]  # (gained, lost)
Poison = Callable[[str, bytes, int], bool]  # (topic, payload, deliveries) -> dead-lettered?


@dataclass(slots=True)
class _Request:
    """One pull request in flight on a partition's inbox."""

    wanted: int
    messages: list[Msg] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = ""


class JetStreamSource:
    """The pipeline's :class:`~cityflux.pipeline.seams.Source` over NATS JetStream."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        supervisor: Supervisor,
        client_id: str,
    ) -> None:
        self.config = config
        self.nats = config.nats
        self.metrics = metrics
        self.supervisor = supervisor
        self.client_id = client_id
        self.topic_root = config.mqtt.topic_root.rstrip("/")
        self._topic_of = TopicCache(config.nats.subject_root, self.topic_root)
        self.connected = threading.Event()
        # called on the loop's thread (through to_thread) before a gained partition's first
        # message is handed over, and after a lost one's last
        self.on_partitions: Partitions = lambda gained, lost: None
        self.on_poison: Poison = lambda topic, payload, deliveries: False
        self._inbox = WaitingInbox()
        self._lock = threading.Lock()  # guards _replies and _receipt
        self._replies: dict[int, tuple[int, str]] = {}  # receipt -> (partition, ack subject)
        self._receipt = 0
        # messages in hand (received, not acknowledged) above which the pullers pause
        self._limit = config.ingest.batch_size * (config.ingest.write_concurrency + 2)
        self._fetch = min(config.ingest.batch_size, 1_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc: Client | None = None
        self._stopping = threading.Event()
        self._owned: frozenset[int] = frozenset()  # assigned: we ask for their messages
        self._active: set[int] = set()  # pinned to us: messages came, on_partitions told
        self._pullers: dict[int, asyncio.Task[None]] = {}
        self._releasing = 0  # partitions being handed back now
        self.puller_restarts = 0  # pullers that ended by an error and were started again
        self._asked: dict[int, float] = {}  # partition -> when we last sent a pull request
        self._warned_no_stream = False
        self._live: list[str] = []  # the live workers at the last heartbeat
        # partitions being handed back: their pullers send no new request, and the messages
        # of the one out are handed over (redelivered only after ack_wait, they would come
        # to the next owner late, behind newer ones)
        self._winding_down: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_s: float = 0.0) -> None:
        self.supervisor.spawn("nats-source", self._run)
        if wait_s and not self.connected.wait(wait_s):
            raise NatsError(f"no connection to {', '.join(self.nats.urls)} within {wait_s:.0f}s")

    def stop(self) -> None:
        self._stopping.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: None)  # wake it to see the stop
        component = self.supervisor.components.get("nats-source")
        if component is not None and component.thread is not None:
            component.thread.join(timeout=15)

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def owned(self) -> frozenset[int]:
        """The partitions this worker pulls from now."""
        return self._owned

    def handing_back(self) -> bool:
        """Partitions are being handed back to the group now (their last messages settled,
        their engines' last checkpoints written)."""
        return self._releasing > 0

    # -- the pipeline's side ----------------------------------------------------------------
    def has_pending(self) -> bool:
        return len(self._inbox) > 0

    def take(self, max_messages: int, wait_s: float) -> MessageBatch:
        batch = self._inbox.take(max_messages, wait_s)
        self.metrics.received.inc(len(batch))
        return batch

    def ack(self, batch: MessageBatch) -> bool:
        """Acknowledge every message of a durable batch (each on its own ack subject)."""
        with self._lock:
            replies = [self._replies.pop(r)[1] for r in batch.receipts if r in self._replies]
        if not replies:
            return True
        try:
            self._call(self._ack(replies), timeout_s=10.0)
        except (NatsError, FutureTimeout) as exc:
            log.warning(
                "acknowledging %d messages failed (%s): they will be redelivered", len(replies), exc
            )
            return False
        self.metrics.acked.inc(len(replies))
        return True

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> object:
        """Core NATS publish (alert changes, health): MQTT subscribers of the topic get it.
        ``retain`` has no NATS equivalent; retained state lives in the KV buckets."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._nc is None:
            log.warning("not connected to NATS: %s not published", topic)
            return None
        return asyncio.run_coroutine_threadsafe(self._nc.publish(_subject(topic), payload), loop)

    def publish_confirmed(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        """JetStream publishes (dead letters go to a stream, `cityflux nats init`): how many
        the server stored."""
        if not messages:
            return 0
        try:
            return int(self._call(self._publish_stored(messages, timeout_s), timeout_s + 1.0))
        except (NatsError, FutureTimeout) as exc:
            log.warning("publishing %d messages failed: %s", len(messages), exc)
            return 0

    def put_object(self, name: str, data: bytes) -> None:
        """Store ``data`` in the checkpoints bucket (replicated like the stream)."""
        self._call(self._put_object(name, data), timeout_s=30.0)

    def get_object(self, name: str) -> bytes | None:
        """The object ``name`` from the checkpoints bucket; None if there is none."""
        data: bytes | None = self._call(self._get_object(name), timeout_s=30.0)
        return data

    async def _put_object(self, name: str, data: bytes) -> None:
        store = await self._client().jetstream().object_store(self.nats.checkpoints_bucket)
        await store.put(name, data)

    async def _get_object(self, name: str) -> bytes | None:
        store = await self._client().jetstream().object_store(self.nats.checkpoints_bucket)
        try:
            result = await store.get(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return result.data

    # -- crossing into the loop ---------------------------------------------------------------
    def _call(self, coroutine: Any, timeout_s: float) -> Any:
        loop = self._loop
        if loop is None or loop.is_closed():
            coroutine.close()
            raise NatsError("not connected to NATS")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    async def _ack(self, replies: list[str]) -> None:
        nc = self._client()
        for reply in replies:
            await nc.publish(reply, b"+ACK")
        await nc.flush(timeout=5)

    async def _publish_stored(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        """Into the stream that holds their subjects; where no stream does (no dead-letter
        stream set up), the server's taking them is the confirmation, as a broker's PUBACK."""
        nc = self._client()
        js = nc.jetstream(timeout=timeout_s)
        stored = 0
        for topic, payload in messages:
            try:
                await js.publish(_subject(topic), payload)
            except nats.js.errors.NoStreamResponseError:
                await nc.publish(_subject(topic), payload)
                if not self._warned_no_stream:
                    self._warned_no_stream = True
                    log.warning("no stream keeps %s: published, not stored in NATS", topic)
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("JetStream did not store %s: %s", topic, exc)
                continue
            stored += 1
        await nc.flush(timeout=max(1, int(timeout_s)))
        return stored

    def _client(self) -> Client:
        if self._nc is None:
            raise NatsError("not connected to NATS")
        return self._nc

    # -- the loop thread ------------------------------------------------------------------------
    def _run(self, component: Component) -> None:
        if not self._stopping.is_set():
            asyncio.run(self._main(component))

    async def _main(self, component: Component) -> None:
        self._loop = asyncio.get_running_loop()
        nc = await connect(self.nats, self.client_id)
        self._nc = nc
        self.connected.set()
        members = await Members.open(nc, self.nats, self.client_id)
        live = asyncio.get_running_loop().create_future()
        beating = asyncio.create_task(self._beat(members, live))
        try:
            await asyncio.wait([beating, live], return_when=asyncio.FIRST_COMPLETED)
            while not self._stopping.is_set() and not beating.done():
                component.beat()
                self._restart_failed_pullers()
                await self._rebalance(members.assignment(self._live))
                await self._sleep(self.nats.heartbeat_s)
            if beating.done() and not self._stopping.is_set():
                beating.result()  # its failure: the supervisor restarts the source
        finally:
            beating.cancel()
            self.connected.clear()
            await self._rebalance(frozenset())  # hand every partition back at once
            with contextlib.suppress(Exception):
                await members.leave()
            with contextlib.suppress(Exception):
                await nc.drain()
            self._nc = None

    async def _beat(self, members: Members, first: asyncio.Future[None]) -> None:
        """The membership heartbeat, on a task of its own: a hand-over (the outstanding pull
        requests, the checkpoints) may take longer than the worker's key lives (3 beats), and
        a worker that beats late drops out of the others' view, then rejoins: every worker
        then moves partitions back and forth (measured: every 2-4 s with 3 workers, before
        any reading came). A beat that fails (a NATS node lost) is retried at the next one."""
        beats = 0
        while not self._stopping.is_set():
            try:
                self._live = await members.heartbeat(self._owned)
            except (NatsError, nats.errors.Error, TimeoutError) as exc:
                log.warning("%s: membership heartbeat failed: %s", self.client_id, exc)
            else:
                beats += 1
                # the first claim after two beats: workers started together see each other
                # first, instead of the first one taking every partition and handing most
                # back a beat later (a hand-over each, under load if readings already flow)
                if beats >= 2 and not first.done():
                    first.set_result(None)
            await self._sleep(self.nats.heartbeat_s)

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, seconds))

    async def _rebalance(self, assigned: frozenset[int]) -> None:
        """Ask for the messages of the partitions now assigned; hand the others back: stop
        asking, let what is in hand be acknowledged, tell on_partitions (the engine's last
        checkpoint goes to the cluster), then unpin, so that the next owner's first message
        comes after that checkpoint."""
        gained, lost = assigned - self._owned, self._owned - assigned
        if not gained and not lost:
            return
        log.info(
            "%s: partitions %s (gained %s, lost %s)",
            self.client_id, sorted(assigned), sorted(gained), sorted(lost),
        )  # fmt: skip
        self._owned = assigned
        # all at once: one after another, a worker handing back 8 partitions took ~8 s
        await asyncio.gather(*(self._release(partition) for partition in sorted(lost)))
        for partition in sorted(gained):
            self._pullers[partition] = asyncio.create_task(self._pull(partition))

    def _restart_failed_pullers(self) -> None:
        """A partition's puller that ended by an error is started again (counted, logged):
        left alone, its partition would stay ours and unread, and nobody would say so."""
        for partition, task in list(self._pullers.items()):
            if not task.done() or task.cancelled() or partition in self._winding_down:
                continue
            error = task.exception()
            self.puller_restarts += 1
            self.metrics.component_restarts.labels("nats-puller").inc()
            log.error(
                "%s: reading partition %d failed (%r): reading it again",
                self.client_id, partition, error,
            )  # fmt: skip
            self._pullers[partition] = asyncio.create_task(self._pull(partition))

    async def _release(self, partition: int) -> None:
        self._releasing += 1
        try:
            await self._hand_back(partition)
        finally:
            self._releasing -= 1

    async def _hand_back(self, partition: int) -> None:
        task = self._pullers.pop(partition)
        self._winding_down.add(partition)  # no new pull request; the one out completes
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), self.nats.fetch_expires_s + 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self._winding_down.discard(partition)
        await self._settled(partition)
        if partition not in self._active:
            # never pinned to us: no unpin, which would take the pin from the worker that
            # holds it (measured: the engines of two partitions restarted mid-run, on the
            # one-vs-three-workers test, by the unpins of the workers' first rebalances)
            return
        self._active.discard(partition)
        await asyncio.to_thread(self.on_partitions, frozenset(), frozenset({partition}))
        if time.monotonic() - self._asked.get(partition, 0.0) < self.nats.pin_timeout_s:
            await self._unpin(partition)  # else the pin has expired, and may be another's

    async def _settled(self, partition: int) -> None:
        """Wait (bounded by the pin timeout) until no message of ``partition`` is in hand."""
        deadline = time.monotonic() + self.nats.pin_timeout_s
        while time.monotonic() < deadline and not self._stopping.is_set():
            with self._lock:
                if all(p != partition for p, _ in self._replies.values()):
                    return
            await asyncio.sleep(0.05)
        if not self._stopping.is_set():  # stopping: they are redelivered to the next owner
            log.warning("partition %d handed back with messages still in hand", partition)

    async def _unpin(self, partition: int) -> None:
        """Release the pin now, so that the new owner need not wait out pin_timeout_s."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        subject = f"$JS.API.CONSUMER.UNPIN.{self.nats.stream}.{self._consumer(partition)}"
        with contextlib.suppress(Exception):
            await nc.request(subject, json.dumps({"group": self.nats.group}).encode(), timeout=2)

    def _consumer(self, partition: int) -> str:
        return f"{self.nats.group}-p{partition}"

    # -- one partition ------------------------------------------------------------------------
    async def _pull(self, partition: int) -> None:
        """Pull requests on one partition's consumer until cancelled (the partition moved)."""
        nc = self._client()
        inbox = nc.new_inbox()
        request: _Request | None = None
        pin: str | None = None

        async def on_message(msg: Msg) -> None:
            nonlocal pin
            status = msg.headers.get("Status") if msg.headers else None
            if request is None:
                return
            if status is None:
                new_pin = msg.headers.get("Nats-Pin-Id") if msg.headers else None
                if new_pin:
                    pin = new_pin
                request.messages.append(msg)
                if len(request.messages) >= request.wanted:
                    request.done.set()
            elif status != "100":
                request.status = status
                request.done.set()

        subscription = await nc.subscribe(inbox, cb=on_message)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.nats.stream}.{self._consumer(partition)}"
        expires = self.nats.fetch_expires_s
        try:
            while partition not in self._winding_down:
                await self._wait_for_room()
                request = _Request(self._fetch)
                body: dict[str, Any] = {
                    "batch": self._fetch,
                    "expires": int(expires * 1e9),
                    "group": self.nats.group,
                }
                if pin:
                    body["id"] = pin
                self._asked[partition] = time.monotonic()
                await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(request.done.wait(), expires + 1.0)
                done, request = request, None
                if done.messages:
                    await self._hand_over(partition, done.messages)
                if done.status == _PIN_LOST:
                    pin = None  # another worker holds it: keep asking, as its standby
                    await self._pin_lost(partition)
                elif done.status == "409" or (not done.status and not done.messages):
                    await asyncio.sleep(min(expires, 1.0))  # consumer gone, or no answer
        finally:
            if request is not None:  # cancelled mid-request: back to the stream at once
                for msg in request.messages:
                    with contextlib.suppress(Exception):
                        await msg.nak()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _pin_lost(self, partition: int) -> None:
        """The server pinned ``partition`` to another worker: its state goes with it."""
        if partition in self._active:
            log.warning(
                "%s: partition %d is pinned to another worker now", self.client_id, partition
            )
            self._active.discard(partition)
            await asyncio.to_thread(self.on_partitions, frozenset(), frozenset({partition}))

    async def _wait_for_room(self) -> None:
        """Pause pulling while the pipeline has enough in hand, but ask again well within the
        pin timeout: a paused owner must not lose its partitions."""
        deadline = time.monotonic() + self.nats.pin_timeout_s / 3
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._replies) < self._limit:  # received, not yet acknowledged
                    return
            await asyncio.sleep(0.02)

    async def _hand_over(self, partition: int, messages: list[Msg]) -> None:
        if partition not in self._active:  # the pin is ours: the partition's state first
            self._active.add(partition)
            await asyncio.to_thread(self.on_partitions, frozenset({partition}), frozenset())
        topics: list[str] = []
        payloads: list[bytes] = []
        replies: list[str] = []
        for msg in messages:
            topic = self._topic_of(msg.subject)
            delivered = deliveries(msg.reply) if msg.reply else 1
            if delivered >= self.nats.max_deliver:
                await self._poison(topic, msg, delivered)
                continue
            topics.append(topic)
            payloads.append(msg.data)
            replies.append(msg.reply)
        if not topics:
            return
        with self._lock:  # the replies first: a taken message must be one we can settle
            receipts = list(range(self._receipt + 1, self._receipt + 1 + len(topics)))
            self._receipt += len(topics)
            self._replies.update(zip(receipts, ((partition, r) for r in replies), strict=True))
        self._inbox.append(topics, payloads, receipts)

    async def _poison(self, topic: str, msg: Msg, deliveries: int) -> None:
        """A message delivered max_deliver times and never settled: dead-letter, terminate."""
        lettered = await asyncio.to_thread(self.on_poison, topic, msg.data, deliveries)
        if lettered:
            await msg.term()
            log.error(
                "%s: delivered %d times without being settled: dead-lettered", topic, deliveries
            )
        else:  # not durable yet: the server redelivers it after ack_wait
            log.warning("%s: could not dead-letter the poison message yet", topic)


def _subject(topic: str) -> str:
    return topic.replace("/", ".")
