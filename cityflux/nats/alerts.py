"""The alert store of a city's workers: a replicated JetStream KV bucket (``nats.alerts_bucket``).

Each worker raises the alerts of its own districts; all of them, and ``cityflux alerts
list/ack``, share one bucket, so an alert's id and its acknowledgement mean the same to every
process whichever worker raised it. The interface is the SQLite :class:`AlertStore`'s
(``cityflux.analytics.alerts.AlertStorage``), so the alert engine takes either.

Keys:

* ``seq``: the last alert id handed out. Ids are allocated by compare-and-set on it
  (``update(last=revision)``, retried on a conflict), a block of n ids per save, so two
  workers raising alerts at the same moment never get the same id.
* ``a.<id>``: the alert as JSON (msgspec, the fields of :class:`Alert`) plus ``acks``, the
  trail of every applied acknowledgement. An acknowledgement is one compare-and-set of this
  key: of two operators at once, one wins, the other re-reads and the rule applies to what
  the winner wrote (refused unless ``force``; both recorded when forced), exactly as SQLite's
  ``BEGIN IMMEDIATE`` does for one process.

Why the trail is inside the alert's value rather than the key's history (``kv.history``) or
keys of its own (``ack.<id>.<n>``): the engine rewrites an active alert at every window
(value, count), so the history of ``a.<id>`` (64 revisions at most) would lose an ack after
an hour of updates; separate keys would be a second write after the compare-and-set, and a
worker dying between the two would leave an acknowledgement in force that the trail does not
show. Inside the value, the decision and its record are one atomic write.

The engine is synchronous and runs on pipeline threads; nats-py is asyncio. The store runs its
client on an event loop of its own (a daemon thread it starts), or on a loop it is given, and
every call waits at most ``timeout_s`` (transient failures such as a leader election are
retried within it) and then raises :class:`NatsError`: a lost cluster never hangs the
pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Final, ParamSpec, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from cityflux.config import NatsConfig
from cityflux.errors import NatsError
from cityflux.model.alerts import Ack, AckRecord, Alert
from cityflux.nats.connect import connect, js_request

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

SEQ_KEY: Final = "seq"
# a few revisions of each alert for forensics; the acknowledgement trail is in the value
HISTORY: Final = 5
# One call, retries included. A bucket whose leader died has none for 4-9 s (the Raft
# election timeout of nats-server, server/raft.go), plus up to 1 s to reconnect when it was
# our server: 15 s covers the worst case with a margin. Measured 4.4-8.8 s (docs/analytics.md).
TIMEOUT_S: Final = 15.0
ATTEMPT_S: Final = 1.0  # one request within a call (answers take ~1 ms; a retry soon after)
PAUSE_S: Final = 0.1  # between retries of a transient failure
WATCH_AGAIN_S: Final = 1.0  # before a watch of the acks that ended is started again
# the failures that a retry can cure: a node lost, a leader being elected, a reconnect
TRANSIENT: Final = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
# the fields the engine owns; the acknowledgement fields are only written by acknowledge()
ENGINE_FIELDS: Final = (
    "state", "flapping", "value", "message", "updated_ns", "cleared_ns", "count",
)  # fmt: skip


class StoredAlert(Alert, kw_only=True):
    """The value of ``a.<id>``: the alert and every applied acknowledgement, oldest first."""

    acks: list[AckRecord] = msgspec.field(default_factory=list)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StoredAlert).decode


def _decoded(key: str, value: bytes | None) -> StoredAlert | None:
    """The alert under ``key``; None (logged) for a value that is not one: a key written by
    hand must not break `alerts list` or the ack watch."""
    try:
        return _decode(value or b"")
    except msgspec.DecodeError as exc:
        log.warning("alerts bucket: %s is not an alert (%s): skipped", key, exc)
        return None


def plain(stored: StoredAlert) -> Alert:
    """The alert without its trail (what the engine, the CLI and MQTT see)."""
    return Alert(**{name: getattr(stored, name) for name in Alert.__struct_fields__})


def alerts_bucket_config(config: NatsConfig) -> KeyValueConfig:
    """The alerts bucket as ``cityflux nats init`` creates it. ``direct=False``: reads go to
    the stream leader, so an acknowledgement is seen at once by every worker and the CLI."""
    return KeyValueConfig(
        bucket=config.alerts_bucket,
        description="cityflux alerts and their acknowledgements",
        history=HISTORY,
        replicas=config.replicas,
        storage=StorageType.FILE,
        direct=False,
    )


class LoopThread:
    """An asyncio event loop running on a daemon thread: the sync side submits coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)
        if not self.thread.is_alive():
            self.loop.close()


class KvAlertStore:
    """Every alert of the city, active or cleared, with its acknowledgements, in a KV bucket.

    Open it with :meth:`open` (connects, finds the bucket); ``create=True`` creates a missing
    bucket (tests, one-node trials), else a missing bucket is a NatsError naming
    ``cityflux nats init``."""

    def __init__(
        self,
        nc: Client,
        kv: KeyValue,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float = TIMEOUT_S,
        owned_loop: LoopThread | None = None,
    ) -> None:
        self.nc, self.kv, self.loop, self.timeout_s = nc, kv, loop, timeout_s
        self._owned_loop = owned_loop
        self.bucket = kv._name  # nats-py keeps the name private; for messages only
        # id -> (revision, value) of the alerts this process wrote last: an update is one
        # compare-and-set, not a read and a write; a conflict (an ack elsewhere) re-reads
        self._known: dict[int, tuple[int, StoredAlert]] = {}
        self.conflicts = 0  # compare-and-set retries (ids, updates, acks): contention
        # follow_acks(): acks per alert seen so far, and the new ones not yet taken
        self._acks_seen: dict[int, int] = {}
        self._new_acks: deque[AckRecord] = deque()
        self._follower: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None  # the follower's current watch
        self.follower_restarts = 0  # watches of the acks that ended and were started again

    @classmethod
    def open(
        cls,
        config: NatsConfig,
        name: str = "cityflux-alerts",
        *,
        timeout_s: float = TIMEOUT_S,
        create: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> KvAlertStore:
        """Connected to ``config.urls`` with the alerts bucket; on ``loop`` if given, else on a
        loop thread of its own. NatsError when NATS or the bucket is not there in time."""
        owned = LoopThread(f"{name}-loop") if loop is None else None
        running = owned.loop if owned is not None else loop
        assert running is not None

        async def start() -> tuple[Client, KeyValue]:
            nc = await connect(config, name, wait_s=timeout_s)
            try:
                return nc, await _bucket(nc, config, create, timeout_s)
            except BaseException:
                await nc.close()
                raise

        try:
            nc, kv = _call(running, start(), timeout_s * 2, f"open {config.alerts_bucket}")
        except BaseException:
            if owned is not None:
                owned.stop()
            raise
        return cls(nc, kv, running, timeout_s, owned)

    # the AlertStorage interface (cityflux/analytics/alerts.py), synchronous

    def save(self, alerts: list[Alert]) -> None:
        """Store new alerts (id 0: an id is allocated here) and update known ones. The
        acknowledgement is never written here; the one in the bucket is copied onto the
        engine's alert, so a running engine follows acks made by other processes."""
        if alerts:
            self._run(self._save(alerts), "save alerts")

    def acknowledge(
        self, alert_id: int, by: str, force: bool = False, at_ns: int | None = None
    ) -> Ack:
        """The SQLite store's rule: another operator's acknowledgement stands unless
        ``force``; every applied one is kept in the alert's ``acks``."""
        at_ns = time.time_ns() if at_ns is None else at_ns
        return self._run(self._acknowledge(alert_id, by, force, at_ns), f"acknowledge {alert_id}")

    def acknowledgements(self, alert_id: int) -> list[AckRecord]:
        stored = self._run(self._get(alert_id), f"read alert {alert_id}")
        return [] if stored is None else list(stored[1].acks)

    def select(self) -> list[Alert]:
        """All alerts, oldest (lowest id) first."""
        return [plain(s) for s in self._run(self._all(), "list alerts")]

    def with_state(self, state: str) -> list[Alert]:
        return [alert for alert in self.select() if alert.state == state]

    def active(self) -> list[Alert]:
        return self.with_state("active")

    def active_in(self, districts: Collection[str]) -> list[Alert]:
        """The active alerts of these districts (a worker taking over partitions)."""
        return [alert for alert in self.active() if alert.district in districts]

    def get(self, alert_id: int) -> Alert | None:
        stored = self._run(self._get(alert_id), f"read alert {alert_id}")
        return None if stored is None else plain(stored[1])

    def follow_acks(self) -> None:
        """Watch the bucket for acknowledgements made by other processes (`alerts ack`,
        another worker); :meth:`take_acks` hands them out. A worker applies them as if they
        had come over MQTT, so its published alerts and InfluxDB points show the ack."""
        if self._follower is None:
            self._follower = self._run(self._start_following(), "follow acknowledgements")

    def take_acks(self) -> list[AckRecord]:
        """The acknowledgements that appeared since the last call, oldest first. It may hold
        this store's own (the watch can see a write before its answer arrives): applying one
        again is an "already", which changes nothing."""
        taken: list[AckRecord] = []
        while self._new_acks:  # popleft is atomic: the loop thread appends meanwhile
            taken.append(self._new_acks.popleft())
        return taken

    def close(self) -> None:
        if self._follower is not None:
            self.loop.call_soon_threadsafe(self._follower.cancel)
        with contextlib.suppress(NatsError):
            self._run(self.nc.close(), "close")
        if self._owned_loop is not None:
            self._owned_loop.stop()

    # on the event loop

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        return _call(self.loop, coro, self.timeout_s, f"alerts bucket {self.bucket}: {what}")

    async def _save(self, alerts: list[Alert]) -> None:
        new = [alert for alert in alerts if not alert.id]
        if new:
            first = await _retry(self._allocate, len(new))
            for offset, alert in enumerate(new):
                # set before the write: a save that times out leaves an id that the next
                # save creates (an update of a missing key creates it)
                alert.id = first + offset
        await asyncio.gather(*(self._write(alert, alert in new) for alert in alerts))

    async def _allocate(self, count: int) -> int:
        """The first of ``count`` fresh ids (compare-and-set on ``seq``)."""
        while True:
            try:
                entry = await self.kv.get(SEQ_KEY)
                last, revision = int(entry.value or b"0"), entry.revision or 0
            except nats.js.errors.KeyNotFoundError:
                last, revision = 0, 0
            value = str(last + count).encode()
            try:
                if revision:
                    await self.kv.update(SEQ_KEY, value, last=revision)
                else:
                    await self.kv.create(SEQ_KEY, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts += 1  # another worker allocated first: read again
                continue
            return last + 1

    async def _write(self, alert: Alert, new: bool) -> None:
        """Merge the engine's fields into the stored alert; compare-and-set, re-read on a
        conflict. The engine's alert takes the acknowledgement in force from the bucket."""
        known = None if new else self._known.get(alert.id) or await _retry(self._get, alert.id)
        while True:
            if known is None:  # new, or lost: create it with what the engine has
                stored = StoredAlert(**msgspec.structs.asdict(alert))
                revision = await _retry(self._create, stored)
                break
            engine = {name: getattr(alert, name) for name in ENGINE_FIELDS}
            stored = msgspec.structs.replace(known[1], **engine)
            try:
                revision = await _retry(self._update, stored, known[0])
                break
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts += 1  # acknowledged meanwhile (or another worker wrote it)
                known = await _retry(self._get, alert.id)
        alert.acknowledged, alert.acknowledged_by = stored.acknowledged, stored.acknowledged_by
        alert.acknowledged_ns = stored.acknowledged_ns
        self._remember(alert.id, revision, stored)

    async def _create(self, stored: StoredAlert) -> int:
        try:
            return await self.kv.create(f"a.{stored.id}", _encode(stored))
        except nats.js.errors.KeyWrongLastSequenceError:
            # an earlier attempt of this call stored it and its answer was lost: ids are
            # never handed out twice, so the key is ours
            found = await self._get(stored.id)
            if found is None:
                raise NatsError(f"a.{stored.id} holds something other than an alert") from None
            return found[0]

    async def _update(self, stored: StoredAlert, revision: int) -> int:
        return await self.kv.update(f"a.{stored.id}", _encode(stored), last=revision)

    async def _get(self, alert_id: int) -> tuple[int, StoredAlert] | None:
        try:
            entry = await self.kv.get(f"a.{alert_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        stored = _decoded(entry.key, entry.value)
        return None if stored is None else (entry.revision or 0, stored)

    def _remember(self, alert_id: int, revision: int, stored: StoredAlert) -> None:
        if stored.state == "active":
            self._known[alert_id] = (revision, stored)
        else:  # the engine forgets a cleared alert: so does the cache
            self._known.pop(alert_id, None)

    async def _acknowledge(self, alert_id: int, by: str, force: bool, at_ns: int) -> Ack:
        first: tuple[str, int] | None = None  # the ack in force when this call first looked
        while True:
            found = await _retry(self._get, alert_id)
            if found is None:
                return Ack("unknown", None)
            revision, stored = found
            previous = (stored.acknowledged_by or "", stored.acknowledged_ns or 0)
            if stored.acknowledged and stored.acknowledged_by == by:
                if stored.acknowledged_ns == at_ns and first is not None:
                    # our own write of an earlier attempt, whose answer was lost
                    return Ack("acknowledged", plain(stored), *first)
                return Ack("already", plain(stored), *previous)
            if stored.acknowledged and not force:
                return Ack("refused", plain(stored), *previous)
            first = previous
            record = AckRecord(alert_id, by, at_ns, stored.acknowledged, stored.state)
            acked = msgspec.structs.replace(
                stored, acknowledged=True, acknowledged_by=by, acknowledged_ns=at_ns,
                acks=[*stored.acks, record],
            )  # fmt: skip
            try:
                revision = await _retry(self._update, acked, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.conflicts += 1  # another operator (or the engine) wrote first: re-read
                continue
            self._remember(alert_id, revision, acked)
            # not news for follow_acks (unless the watch saw it first, before this answer)
            self._acks_seen[alert_id] = max(self._acks_seen.get(alert_id, 0), len(acked.acks))
            return Ack("acknowledged", plain(acked), *previous)

    async def _start_following(self) -> asyncio.Task[None]:
        self._watcher = await _retry(self.kv.watch, "a.*", ignore_deletes=True)
        return asyncio.get_running_loop().create_task(self._follow_forever(self._watcher))

    async def _follow_forever(self, watcher: KeyValue.KeyWatcher) -> None:
        """Follow the acks for as long as the store is open: a watch that ends (stopped, or
        failing) is started again, and what changed meanwhile is news (it ended the task for
        good once, and the worker never heard of an ack again, without a word)."""
        first = True
        while True:
            try:
                await self._follow(watcher, old_news=first)
                why = "the watch ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged, counted, and started again
                why = repr(exc)
            first = False
            self.follower_restarts += 1
            log.warning(
                "alerts bucket %s: following acknowledgements stopped (%s): watching again",
                self.bucket, why,
            )  # fmt: skip
            await asyncio.sleep(WATCH_AGAIN_S)
            try:
                watcher = self._watcher = await _retry(self.kv.watch, "a.*", ignore_deletes=True)
            except Exception as exc:  # NATS away: the next round retries
                log.warning("alerts bucket %s: no watch (%r)", self.bucket, exc)

    async def _follow(self, watcher: KeyValue.KeyWatcher, old_news: bool) -> None:
        """The current alerts first (their acks are old news on the first watch; on a later
        one, those beyond what was seen are new), then every change, until the watch ends."""
        updates: Callable[..., Awaitable[Any]] = watcher.updates  # untyped in nats-py
        current = old_news
        try:
            while True:
                try:
                    entry = await updates(timeout=3600.0)
                except nats.errors.TimeoutError:
                    continue  # an hour without a change
                if entry is None:  # the end of the current values
                    current = False
                    continue
                if not isinstance(entry, KeyValue.Entry):  # nats-py's end marker: stopped
                    return
                stored = _decoded(entry.key, entry.value)
                if stored is None:
                    continue
                seen = self._acks_seen.get(stored.id, 0)
                if not current and len(stored.acks) > seen:
                    self._new_acks.extend(stored.acks[seen:])
                self._acks_seen[stored.id] = len(stored.acks)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _all(self) -> list[StoredAlert]:
        """Every alert. nats-py's watch may say "no more values" before the first one when
        its consumer is asked for its pending count too early (under load: an empty list from
        a bucket holding 300 alerts, once in CI); the bucket's stream says how many keys there
        are, and an empty answer from a bucket that has some is asked again."""
        for _ in range(5):
            found = await self._watched_values()
            if found or not await self._has_alert_keys():
                return found
            await asyncio.sleep(PAUSE_S)
        return found

    async def _has_alert_keys(self) -> bool:
        info = await js_request(
            self.nc,
            f"$JS.API.STREAM.INFO.KV_{self.bucket}",
            {"subjects_filter": f"$KV.{self.bucket}.a.*"},
        )
        return bool((info.get("state") or {}).get("subjects"))

    async def _watched_values(self) -> list[StoredAlert]:
        watcher = await _retry(self.kv.watch, "a.*", ignore_deletes=True)
        found: list[StoredAlert] = []
        try:
            # the watcher hands the last value of every key, then None
            updates: Callable[..., Awaitable[Any]] = watcher.updates  # untyped in nats-py
            while (entry := await updates(timeout=self.timeout_s)) is not None:
                if (stored := _decoded(entry.key, entry.value)) is not None:
                    found.append(stored)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(found, key=lambda alert: alert.id)


async def _bucket(nc: Client, config: NatsConfig, create: bool, timeout_s: float) -> KeyValue:
    js = nc.jetstream(timeout=min(ATTEMPT_S, timeout_s))
    try:
        return await _retry(js.key_value, config.alerts_bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise NatsError(
                f"no alerts bucket {config.alerts_bucket!r} in NATS: run `cityflux nats init`"
            ) from None
    return await _retry(js.create_key_value, alerts_bucket_config(config))


async def _retry(attempt: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """``attempt(...)`` until it does not fail transiently; the caller's timeout bounds it."""
    while True:
        try:
            return await attempt(*args, **kwargs)
        except TRANSIENT as exc:
            log.debug("alerts bucket: %r, retrying", exc)
            await asyncio.sleep(PAUSE_S)


def _call(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout_s: float, what: str
) -> T:
    """Run ``coro`` on ``loop`` from a synchronous thread, at most ``timeout_s``."""
    with contextlib.suppress(RuntimeError):  # RuntimeError: no loop runs on this thread
        if asyncio.get_running_loop() is loop:
            coro.close()
            raise NatsError(f"{what}: called on the store's own event loop (it would deadlock)")
    if loop.is_closed():
        coro.close()
        raise NatsError(f"{what}: the store is closed")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout_s)
    except FutureTimeout:
        future.cancel()
        raise NatsError(f"{what}: no answer from NATS within {timeout_s:g}s", 408) from None
    except (nats.errors.Error, OSError) as exc:
        raise NatsError(f"{what}: {exc or type(exc).__name__}") from exc
