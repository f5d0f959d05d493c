"""The ingest loop: MQTT batch -> decode -> validate -> line protocol -> durable sink -> ack.

One :class:`Pipeline` per worker process. A batch is acknowledged only after the sink made it
durable (database or fsynced spool) and the broker confirmed its dead letters.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from cityflux.analytics.engine import alert_line
from cityflux.config import Config
from cityflux.errors import SpoolError, SpoolFull, StoreError
from cityflux.ingest.boundary import stage
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.ingest.decode import BatchDecoder
from cityflux.model.columns import Columns, Rejection
from cityflux.model.contract import Reason
from cityflux.mqtt.consumer import MessageBatch, MqttConsumer
from cityflux.observability import Metrics, MetricsServer
from cityflux.pipeline.analytics_link import AnalyticsLink
from cityflux.pipeline.broker_stats import BrokerWatcher
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import BatchEncoder, encode_point
from cityflux.store.schema import PIPELINE_MEASUREMENT
from cityflux.store.sink import DurableSink, RejectedLines
from cityflux.store.spool import Spool
from cityflux.supervisor import Component, Policy, Supervisor

log = logging.getLogger(__name__)
DERIVED_SLICE = 10_000  # lines per write of analytics results
DERIVED_PAUSE_S = 0.01
SPOOL_FULL_PAUSE_S = 0.5
DEADLETTER_CONFIRM_S = 5.0


@dataclass(slots=True)
class BatchOutcome:
    lines: list[str] = field(default_factory=list)
    letters: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload)
    accepted: dict[str, int] = field(default_factory=dict)


Work = tuple[MessageBatch, BatchOutcome]


class Pipeline:
    def __init__(
        self, config: Config, worker: int = 0, workers: int = 1, connect_timeout_s: float = 0.0
    ) -> None:
        """``connect_timeout_s``: how long ``with Pipeline(...)`` waits for the broker's
        CONNACK before raising (0: connect in the background, retrying forever)."""
        self.config = config
        self.connect_timeout_s = connect_timeout_s
        self.runner: threading.Thread | None = None  # run(), when used as a context manager
        self.metrics = Metrics()
        self.failure: str | None = None  # set when a component gave up: exit non-zero
        supervision = config.supervision
        self.supervisor = Supervisor(
            Policy(
                supervision.restart_min_s,
                supervision.restart_max_s,
                supervision.max_restarts,
                supervision.restart_window_s,
                supervision.stall_after_s,
            ),
            on_restart=lambda name: self.metrics.component_restarts.labels(name).inc(),
            on_fatal=self._give_up,
        )
        self.consumer = MqttConsumer(config.mqtt, self.metrics, worker, workers, self.supervisor)
        self.decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
        self.encoder = BatchEncoder()
        self.letters = DeadLetterFactory(
            config.mqtt.topic_root, config.ingest.deadletter_prefix_bytes
        )
        spool_dir = Path(config.spool.dir) / (f"worker-{worker}" if workers > 1 else "")
        self.spool = Spool(spool_dir, config.spool.max_bytes)
        self.writer = InfluxWriter(config.influx)
        self.sink = DurableSink(self.writer, self.spool, self.metrics, self._dead_letter_lines)
        self.metrics_port = config.metrics.port + worker if config.metrics.port else 0
        self.server: MetricsServer | None = None
        # A shared subscription deals messages round-robin, so with several workers no process
        # sees all readings of a road: windows would be wrong. Until workers are partitioned by
        # district, analytics run only with one worker (docs/analytics.md).
        analytics = config.analytics.enabled and workers == 1
        if config.analytics.enabled and workers > 1 and worker == 0:
            log.warning(
                "analytics are off with --workers %d: run them in a single-worker cityflux", workers
            )
        self.analytics = (
            AnalyticsLink(config, self.consumer, self._write_derived, self.supervisor.start_thread)
            if analytics
            else None
        )
        if self.analytics is not None:
            self.metrics.checkpoint_corrupt.inc(self.analytics.engine.counts["checkpoint_corrupt"])
            self.analytics.engine.on_worker_error = self.metrics.analytics_errors.inc
        # the broker's own drop counters ($SYS): one watcher per host is enough
        self.broker_stats = (
            BrokerWatcher(
                config.mqtt,
                self.metrics,
                config.analytics.alerts_db,
                on_alert=lambda alert: self._write_derived([alert_line(alert)]),
            )
            if config.mqtt.broker_stats and worker == 0
            else None
        )
        self.stopping = threading.Event()
        self._next_health = 0.0
        self._handover: queue.Queue[Work | None] = queue.Queue(1)
        # work of a commit thread that failed, taken first by its restarted successor: the
        # broker redelivers unacknowledged messages only after a reconnect, so dropping the
        # batch would stall its messages until then
        self._retry: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._committing: set[str] = set()  # commit threads in the middle of a commit
        self.store_problem: str | None = None  # why durable writes are failing right now
        self.starting: str | None = "not started"  # what start() is waiting for
        self._ingest = self.supervisor.watch("ingest", self.consumer.has_pending)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_connected_s: float = 0.0) -> None:
        # /healthz first: a database that hangs at start (each call waits influx.timeout_s)
        # must show as "starting: ...", not as a process that does not answer
        if self.config.metrics.enabled:
            server = MetricsServer(
                self.metrics, self.health, self.config.metrics.host, self.metrics_port
            )
            self.server = server
            self.supervisor.spawn("metrics-http", lambda component: server.serve())
        self.starting = "checking the database"
        self._prepare_database()
        if self.analytics is not None:
            self.starting = "re-reading open analytics windows from the database"
            self.analytics.recover(self.writer)
        self.starting = None
        self.supervisor.spawn(
            "spool-drain",
            lambda component: self.sink.drain_loop(component.beat),
            waiting=lambda: not self.spool.empty and self.sink.database_up,
        )
        if self.broker_stats is not None:
            self.broker_stats.start(self.supervisor.start_thread)
        self.consumer.start(wait_connected_s)

    def _prepare_database(self) -> None:
        try:
            self.writer.ensure_database()
        except StoreError as exc:
            log.warning("database not ready at start (%s); writes go to the spool", exc)

    def run(self) -> None:
        """Process batches until :meth:`stop`; unacknowledged messages stay with the broker.

        Two stages overlap: this thread decodes, validates and encodes batch k+1 while
        ``write_concurrency`` commit threads write earlier batches and acknowledge them (the
        database parses one request while it stores another). The hand-over queue holds one
        batch, so a stalled database (or a full spool) stops this thread from taking more.
        """
        ingest = self.config.ingest
        committers = [
            self.supervisor.spawn(name, self._commit_loop, self._is_committing(name))
            for name in (f"commit-{i}" for i in range(ingest.write_concurrency))
        ]
        try:
            while not self.stopping.is_set():
                self._ingest.beat()
                batch = self.consumer.take(ingest.batch_size, ingest.flush_interval_s)
                if len(batch):
                    self._hand_over((batch, self.transform(batch, time.time_ns())))
                elif self.analytics is not None:  # idle: close windows, checkpoint
                    lines = self.analytics.idle()
                    if lines:
                        self._hand_over((MessageBatch(), BatchOutcome(lines=lines)))
                health = self._health_line()
                if health is not None:
                    self._hand_over((MessageBatch(), BatchOutcome(lines=[health])))
        finally:
            self.supervisor.stop()  # from here on a component's end is the shutdown
            self._end_committers([c.thread for c in committers if c.thread is not None])

    def _end_committers(self, threads: list[threading.Thread], timeout_s: float = 30.0) -> None:
        """One end marker per live commit thread, which takes it once its batch is done; a
        thread the supervisor gave up on takes none, so never wait on the queue for it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            with contextlib.suppress(queue.Full):
                self._handover.put(None, timeout=0.1)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _hand_over(self, work: tuple[MessageBatch, BatchOutcome]) -> None:
        while not self.stopping.is_set():
            try:
                self._handover.put(work, timeout=0.2)
                return
            except queue.Full:
                continue

    def _commit_loop(self, component: Component) -> None:
        """Commit handed-over batches until the end marker. A failure is retried by the
        restarted loop (the supervisor counts it); the batch is never acknowledged unstored."""
        while True:
            work: Work | None
            try:
                work = self._retry.get_nowait()
            except queue.Empty:
                work = self._handover.get()
            if work is None:
                return
            # the watchdog's view: this thread is busy from here until its commit is done (an
            # idle thread waiting for work is not stalled; a full hand-over queue shows as the
            # ingest loop's stall)
            component.beat()
            self._committing.add(component.name)
            try:
                self.commit(*work)
            except Exception as exc:
                self.metrics.commit_errors.labels(type(exc).__name__).inc()
                self._retry.put(work)
                raise
            finally:
                self._committing.discard(component.name)
            component.beat()

    def _is_committing(self, name: str) -> Callable[[], bool]:
        return lambda: name in self._committing

    def _give_up(self, reason: str) -> None:
        """A component keeps failing: end :meth:`run` so the process exits non-zero."""
        self.failure = reason
        self.stopping.set()

    def stop(self) -> None:
        self.stopping.set()

    # -- as a context manager: the one lifecycle every caller uses ---------------------------
    def __enter__(self) -> Pipeline:
        """Start, and :meth:`run` on a thread of its own; ``with`` ends it and closes all."""
        try:
            self.start(self.connect_timeout_s)
        except BaseException:
            self.close()
            raise
        self.runner = threading.Thread(target=self._run_or_fail, name="pipeline", daemon=True)
        self.runner.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_running()
        self.close()

    def stop_running(self, timeout_s: float = 30.0) -> None:
        """Stop the main loop and wait for it (its batches in hand committed); the servers'
        connections stay open until the ``with`` ends."""
        self.stop()
        if self.runner is not None:
            self.runner.join(timeout=timeout_s)

    def _run_or_fail(self) -> None:
        """The main loop raising is a failure of the whole process, like a component the
        supervisor gave up on (the caller exits non-zero)."""
        try:
            self.run()
        except BaseException as exc:
            log.exception("the ingest loop failed")
            self.failure = f"the ingest loop failed: {type(exc).__name__}: {exc}"
            self.stopping.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the pipeline stops (a signal's :meth:`stop`, or a failure); True if it
        has. Waits in short slices so that signal handlers run meanwhile."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.stopping.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def drain(self, timeout_s: float = 30.0, quiet_s: float = 1.0, at_least: int = 0) -> bool:
        """Wait until at least ``at_least`` messages are acknowledged (durable), all received
        ones are, and nothing new arrived for ``quiet_s``: the end of a simulated run."""
        deadline = time.monotonic() + timeout_s
        seen, quiet_since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            received = self.metrics.value("messages_received_total")
            if received != seen:
                seen, quiet_since = received, time.monotonic()
            acked = self.metrics.value("messages_acked_total")
            settled = acked >= max(received, at_least)
            if settled and time.monotonic() - quiet_since >= quiet_s:
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        """Stop everything, each step even if an earlier one raised (a final checkpoint on a
        full disk must not leave the broker connection and the spool open); the first error
        is raised at the end."""
        self.supervisor.stop()
        with contextlib.ExitStack() as steps:  # callbacks run last-in first-out
            steps.callback(self.spool.close)
            steps.callback(self.sink.close)
            steps.callback(self._join_threads)
            if self.server is not None:
                steps.callback(self.server.stop)
            steps.callback(self.sink.stop)
            if self.broker_stats is not None:
                steps.callback(self.broker_stats.stop)
            steps.callback(self.consumer.stop)
            if self.analytics is not None:
                steps.callback(self.analytics.close)

    def _join_threads(self) -> None:
        stuck = self.supervisor.join(timeout_s=10)
        if stuck:
            log.warning("threads still running at close: %s", ", ".join(stuck))

    # -- one batch ------------------------------------------------------------------------
    def commit(self, batch: MessageBatch, outcome: BatchOutcome) -> bool:
        """Store durably, dead-letter, acknowledge. False if not acknowledged."""
        result = self._write_durably(outcome.lines)
        if result is None:
            return False  # stopping while the spool was full: the broker keeps the batch
        self._publish_letters(outcome.letters)
        if result.rejected:
            self._dead_letter_lines(result.rejected)
        for kind, count in outcome.accepted.items():
            self.metrics.accepted.labels(kind).inc(count)
        if not len(batch):
            return True
        acked = self.consumer.ack(batch)
        self.metrics.batch_messages.observe(len(batch))
        self.metrics.ack_lag_seconds.observe(time.monotonic() - batch.first_received)
        return acked

    def transform(self, batch: MessageBatch, now_ns: int) -> BatchOutcome:
        """Everything between the broker and the database, with no I/O. Decode, validate and
        encode run under the error boundary per message (cityflux/ingest/boundary.py): a
        payload that makes them raise is dead-lettered as internal_error, the rest stored."""
        staged = stage(
            self.decoder, self.encoder, self.config.ingest, batch.topics, batch.payloads, now_ns
        )
        self.metrics.ignored.inc(staged.ignored)
        outcome = BatchOutcome(lines=staged.lines)
        rejections = staged.rejections
        newest = 0
        accepted = staged.columns
        for kind, good in accepted.items():
            outcome.accepted[kind] = good.readings()
            if len(good):
                newest = max(newest, int(good.ts_ns.max()))
        if self.analytics is not None:
            outcome.lines += self._analyse(batch, accepted, rejections, staged.ignored)
        if newest:
            self.metrics.event_lag_seconds.set((now_ns - newest) / 1e9)
        # dead letters in the order their messages arrived
        rejections.sort(key=lambda r: (r.index, -1 if r.reading is None else r.reading))
        for offset, rejection in enumerate(rejections):
            self._reject(batch, rejection, now_ns, offset, outcome)
        return outcome

    def _analyse(
        self,
        batch: MessageBatch,
        accepted: dict[str, Columns],
        rejections: list[Rejection],
        ignored: int,
    ) -> list[str]:
        """Analytics on the validated batch. A failure there is logged and counted, never
        allowed to stop ingest: the readings are stored whatever the analytics make of them."""
        assert self.analytics is not None
        try:
            lines = self.analytics.acknowledgements(batch.topics, batch.payloads) if ignored else []
            derived, late = self.analytics.process(accepted)
        except Exception:
            log.exception("analytics failed on a batch of %d messages", len(batch))
            self.metrics.analytics_errors.inc()
            return []
        rejections += late
        return lines + derived

    def _reject(
        self,
        batch: MessageBatch,
        rejection: Rejection,
        now_ns: int,
        offset: int,
        outcome: BatchOutcome,
    ) -> None:
        self.metrics.rejected.labels(rejection.reason.value).inc()
        letter = self.letters.letter(
            rejection, batch.topics[rejection.index], batch.payloads[rejection.index], now_ns
        )
        outcome.letters.append((self.letters.topic(rejection.reason), self.letters.encode(letter)))
        # distinct timestamps: points with equal series and time would overwrite each other
        outcome.lines.append(self.letters.line(letter, now_ns + offset))

    def _write_durably(self, lines: list[str]) -> Any:
        """Database or spool, retried while neither can take the lines (spool full, disk
        full, an unwritable spool): acknowledgements wait, the broker keeps the messages, and
        /healthz says why. None if stopping meanwhile."""
        while True:
            try:
                result = self.sink.write(lines)
            except SpoolError as exc:
                full = isinstance(exc, SpoolFull)
                self.metrics.spool_full.set(1 if full else 0)
                if self.store_problem != str(exc):
                    log.error("%s: holding acknowledgements; the broker keeps the messages", exc)
                self.store_problem = str(exc)
                if self.stopping.wait(SPOOL_FULL_PAUSE_S):
                    return None
                continue
            self.metrics.spool_full.set(0)
            self.store_problem = None
            return result

    def _write_derived(self, lines: list[str]) -> None:
        """Analytics results, written by the analytics worker (spooled like everything else),
        in slices with a breath between them: one 100,000-line request would hold the
        database (and, on a small host, the CPU) while readings and alerts wait."""
        for start in range(0, len(lines), DERIVED_SLICE):
            result = self._write_durably(lines[start : start + DERIVED_SLICE])
            if result is not None and result.rejected:
                self._dead_letter_lines(result.rejected)
            if start + DERIVED_SLICE < len(lines):
                self.stopping.wait(DERIVED_PAUSE_S)

    def _publish_letters(self, letters: list[tuple[str, bytes]]) -> None:
        """Publish dead letters and wait for the broker to have them before the batch is acked.

        If the broker does not confirm in time, paho keeps them queued and sends them on
        reconnect; the rejections are also in InfluxDB (cityflux_deadletter) already.
        """
        infos = [self.consumer.publish(topic, payload) for topic, payload in letters]
        deadline = time.monotonic() + DEADLETTER_CONFIRM_S
        for info in infos:
            if info.rc == paho.MQTT_ERR_NO_CONN:
                continue  # queued while disconnected: waiting would raise, not help
            with contextlib.suppress(RuntimeError, ValueError):  # a disconnect meanwhile
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        confirmed = sum(1 for info in infos if _confirmed(info))
        self.metrics.deadletters_published.inc(confirmed)
        if confirmed < len(infos):
            log.warning(
                "%d dead letters not yet confirmed by the broker; paho will resend them",
                len(infos) - confirmed,
            )

    def _dead_letter_lines(self, rejected: RejectedLines) -> None:
        """Lines the database refused (e.g. a field type conflict): dead-letter, never retry."""
        for line, error in rejected:
            self.metrics.rejected.labels(Reason.WRITE_REJECTED.value).inc()
            letter = self.letters.letter(
                Rejection(Reason.WRITE_REJECTED, error, 0),
                "(database)",
                line.encode(),
                time.time_ns(),
            )
            self.consumer.publish(
                self.letters.topic(Reason.WRITE_REJECTED), self.letters.encode(letter)
            )
            self.metrics.deadletters_published.inc()

    # -- health ---------------------------------------------------------------------------
    def _health_line(self) -> str | None:
        """The pipeline-health point, when it is due."""
        now = time.monotonic()
        if now < self._next_health or self.config.metrics.health_interval_s <= 0:
            return None
        self._next_health = now + self.config.metrics.health_interval_s
        fields: dict[str, float | int | bool | str] = dict(self.metrics.snapshot())
        return encode_point(
            PIPELINE_MEASUREMENT, {"worker": self.consumer.client_id}, fields, time.time_ns()
        )

    def health(self) -> dict[str, Any]:
        """What /healthz answers: unhealthy (503) while disconnected from the broker, while
        durable writes fail, or while a component is down or stalled with work waiting."""
        connected = self.consumer.connected.is_set()
        spool_full = self.metrics.value("spool_full") == 1
        problems = self.supervisor.problems()
        if not connected:
            problems["mqtt"] = "not connected to the broker"
        if self.store_problem is not None:
            problems["store"] = self.store_problem
        if self.starting is not None:
            problems["starting"] = self.starting
        return {
            "healthy": not problems,
            "problems": problems,
            "mqtt_connected": connected,
            "database_up": self.sink.database_up,
            "spool_records": len(self.spool),
            "spool_bytes": self.spool.size,
            "spool_full": spool_full,
            **(self.broker_stats.health() if self.broker_stats is not None else {}),
        }


def _confirmed(info: paho.MQTTMessageInfo) -> bool:
    """The broker has the message; paho raises instead of saying no for one it only queued."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
