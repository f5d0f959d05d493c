"""The pipeline: one per worker process, wiring source -> ingest -> analytics -> store.

    Source.take() -> Transform (decode, validate, encode, analytics, dead letters; no I/O)
                  -> hand-over queue (one batch) -> commit threads
                  -> Committer (sink write: database or fsynced spool; dead letters) -> ack

It owns every thread, under one :class:`Supervisor`, and the lifecycle every caller uses:
``with Pipeline(config) as p:`` starts it and runs the loop on a thread of its own; leaving the
block stops it, commits what is in hand, and closes everything. A batch is acknowledged only
after the sink made it durable and the broker confirmed its dead letters.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cityflux.analytics.alerts import Alert
from cityflux.analytics.traffic import TrafficView
from cityflux.config import Config
from cityflux.errors import StoreError
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.model.contract import Reason
from cityflux.model.messages import MessageBatch
from cityflux.mqtt.consumer import MqttConsumer
from cityflux.nats.source import JetStreamSource
from cityflux.observability import Metrics, MetricsServer
from cityflux.pipeline.analytics_link import AnalyticsLink, alert_line
from cityflux.pipeline.broker_stats import BrokerWatcher
from cityflux.pipeline.commit import Committer
from cityflux.pipeline.partitioned import PartitionedAnalytics
from cityflux.pipeline.seams import Source
from cityflux.pipeline.transform import BatchOutcome, Transform
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import encode_point
from cityflux.store.schema import PIPELINE_MEASUREMENT
from cityflux.store.sink import DurableSink
from cityflux.store.spool import Spool
from cityflux.supervisor import Component, Policy, Supervisor

log = logging.getLogger(__name__)

Work = tuple[MessageBatch, BatchOutcome]
HANDOVER_BATCHES = 4  # batches transformed and waiting for a commit thread


class Pipeline:
    def __init__(
        self,
        config: Config,
        worker: int = 0,
        workers: int = 1,
        connect_timeout_s: float = 0.0,
        source: Source | None = None,
    ) -> None:
        """``connect_timeout_s``: how long ``with Pipeline(...)`` waits for the broker's
        CONNACK before raising (0: connect in the background, retrying forever). ``source``:
        where messages come from (default: the MQTT consumer of ``config.mqtt``)."""
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
        self.source: Source = source or self._source(config, worker, workers)
        letters = DeadLetterFactory(config.mqtt.topic_root, config.ingest.deadletter_prefix_bytes)
        spool_dir = Path(config.spool.dir) / (f"worker-{worker}" if workers > 1 else "")
        self.spool = Spool(spool_dir, config.spool.max_bytes)
        self.writer = InfluxWriter(config.influx)
        self.sink = DurableSink(self.writer, self.spool, self.metrics)
        self.stopping = threading.Event()
        self.committer = Committer(self.source, self.sink, letters, self.metrics, self.stopping)
        self.sink.on_rejected = self.committer.dead_letter_lines
        self.metrics_port = config.metrics.port + worker if config.metrics.port else 0
        self.server: MetricsServer | None = None
        self.analytics = self._analytics(config, worker, workers)
        # the broker's own drop counters ($SYS): one watcher per host is enough
        self.broker_stats = (
            BrokerWatcher(
                config.mqtt,
                self.metrics,
                config.analytics.alerts_db,
                on_alert=self._write_alert,
            )
            if config.mqtt.broker_stats and worker == 0 and config.source.kind == "mqtt"
            else None
        )
        self.transform = Transform(config, self.metrics, letters, self.analytics)
        self._next_health = 0.0
        # room for a few batches: a database write that takes longer than a batch must not
        # stop the loop that raises alerts (a probe's latency is the loop's, not the write's).
        # Bounded twice: by batches, and by messages to one full batch (_hand_over), so what is
        # unacknowledged stays within batch_size x (write_concurrency + 2), the figure that
        # mqtt.receive_maximum and the broker's in-flight limit are sized by (config.py)
        self._handover: queue.Queue[Work | None] = queue.Queue(HANDOVER_BATCHES)
        self._queued = 0  # messages in the hand-over queue
        self._queued_changed = threading.Condition()
        # work of a commit thread that failed, taken first by its restarted successor: the
        # broker redelivers unacknowledged messages only after a reconnect, so dropping the
        # batch would stall its messages until then
        self._retry: queue.SimpleQueue[Work] = queue.SimpleQueue()
        self._committing: set[str] = set()  # commit threads in the middle of a commit
        self.starting: str | None = "not started"  # what start() is waiting for
        self._ingest = self.supervisor.watch("ingest", self.source.has_pending)

    def _source(self, config: Config, worker: int, workers: int) -> Source:
        if config.source.kind == "nats":
            client_id = (
                config.mqtt.client_id if workers == 1 else f"{config.mqtt.client_id}-{worker}"
            )
            nats = JetStreamSource(config, self.metrics, self.supervisor, client_id)
            nats.on_poison = self._dead_letter_poison
            return nats
        return MqttConsumer(config.mqtt, self.metrics, worker, workers, self.supervisor)

    def _analytics(
        self, config: Config, worker: int, workers: int
    ) -> AnalyticsLink | PartitionedAnalytics | None:
        if not config.analytics.enabled:
            return None
        if isinstance(self.source, JetStreamSource):
            # whole districts per worker (partitions): the analytics run in every worker
            partitioned = PartitionedAnalytics(
                config, self.source, self.committer.write_derived,
                self.supervisor.start_thread, self.writer, self.source, self.supervisor.retire,
            )  # fmt: skip
            partitioned.on_worker_error = self.metrics.analytics_errors.inc
            self.source.on_partitions = partitioned.on_partitions
            return partitioned
        # A shared subscription deals messages round-robin, so with several workers no process
        # sees all readings of a road: windows would be wrong. With MQTT, analytics run only
        # with one worker (docs/analytics.md); the JetStream source partitions by district.
        if workers > 1:
            if worker == 0:
                log.warning(
                    "analytics are off with --workers %d on MQTT: run them in a single-worker "
                    "cityflux, or on the JetStream source (docs/scale.md)", workers,
                )  # fmt: skip
            return None
        link = AnalyticsLink(
            config, self.source, self.committer.write_derived, self.supervisor.start_thread
        )
        self.metrics.checkpoint_corrupt.inc(link.engine.counts["checkpoint_corrupt"])
        link.engine.on_worker_error = self.metrics.analytics_errors.inc
        return link

    def _dead_letter_poison(self, topic: str, payload: bytes, deliveries: int) -> bool:
        """A message the source delivered nats.max_deliver times without a settlement."""
        message = f"delivered {deliveries} times without being settled (it may crash workers)"
        return self.committer.dead_letter_now(Reason.REDELIVERED, message, topic, payload)

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
        # What start-up built (modules, the city model, caches) lives as long as the process:
        # out of the collector's sight, so that the collections the hot path's allocations
        # trigger do not walk it again and again (docs/performance.md, "Garbage collection")
        gc.freeze()
        self.source.start(wait_connected_s)

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
                batch = self.source.take(ingest.batch_size, ingest.flush_interval_s)
                if len(batch):
                    self._hand_over((batch, self.transform(batch, time.time_ns())))
                elif self.analytics is not None:  # idle: close windows, checkpoint
                    lines = self.analytics.idle()
                    if lines:
                        idle = BatchOutcome(lines=lines, derived=True)
                        self._hand_over((MessageBatch(), idle))
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
        if work[1].derived:  # analytics lines: committed in the order analysed
            work[1].turn = self.committer.take_turn()
        size, limit = len(work[0]), self.config.ingest.batch_size
        with self._queued_changed:  # small batches queue up; a full one waits for room
            while self._queued and self._queued + size > limit:
                if self.stopping.is_set():
                    return
                self._queued_changed.wait(0.2)
            self._queued += size
        while not self.stopping.is_set():
            try:
                self._handover.put(work, timeout=0.2)
                return
            except queue.Full:
                continue
        self._taken(size)  # stopping: never queued

    def _taken(self, size: int) -> None:
        with self._queued_changed:
            self._queued -= size
            self._queued_changed.notify_all()

    def _commit_loop(self, component: Component) -> None:
        """Commit handed-over batches until the end marker. A failure is retried by the
        restarted loop (the supervisor counts it); the batch is never acknowledged unstored."""
        while True:
            work: Work | None
            try:
                work = self._retry.get_nowait()
            except queue.Empty:
                work = self._handover.get()
                if work is not None:
                    self._taken(len(work[0]))
            if work is None:
                return
            # the watchdog's view: this thread is busy from here until its commit is done (an
            # idle thread waiting for work is not stalled; a full hand-over queue shows as the
            # ingest loop's stall)
            component.beat()
            self._committing.add(component.name)
            try:
                self.committer.commit(*work)
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
            steps.callback(self.sink.close)  # then the spool
            steps.callback(self._join_threads)
            if self.server is not None:
                steps.callback(self.server.stop)
            steps.callback(self.sink.stop)
            if self.broker_stats is not None:
                steps.callback(self.broker_stats.stop)
            steps.callback(self.source.stop)
            if self.analytics is not None:
                steps.callback(self.analytics.close)

    def _join_threads(self) -> None:
        stuck = self.supervisor.join(timeout_s=10)
        if stuck:
            log.warning("threads still running at close: %s", ", ".join(stuck))

    # -- the analytics, for the CLI ---------------------------------------------------------
    def finish_windows(self) -> None:
        """Close every open analytics window now and store its results durably: the end of a
        simulated run (a live city's windows close as event time moves on)."""
        if self.analytics is not None:
            self.committer.write_derived(self.analytics.flush())

    def alert_history(self) -> list[Alert]:
        """Every alert so far, oldest first (none with the analytics off)."""
        return self.analytics.alert_history() if self.analytics is not None else []

    def latest_traffic(self) -> TrafficView | None:
        """The last closed minute's traffic indices (None with the analytics off)."""
        return self.analytics.latest_traffic() if self.analytics is not None else None

    # -- one batch ------------------------------------------------------------------------
    def commit(self, batch: MessageBatch, outcome: BatchOutcome) -> bool:
        """Store durably, dead-letter, acknowledge (:class:`Committer`). False if not
        acknowledged."""
        return self.committer.commit(batch, outcome)

    def _write_alert(self, alert: Alert) -> None:
        self.committer.write_derived([alert_line(alert)])

    # -- health ---------------------------------------------------------------------------
    def _health_line(self) -> str | None:
        """The pipeline-health point, when it is due."""
        now = time.monotonic()
        if now < self._next_health or self.config.metrics.health_interval_s <= 0:
            return None
        self._next_health = now + self.config.metrics.health_interval_s
        fields: dict[str, float | int | bool | str] = dict(self.metrics.snapshot())
        return encode_point(
            PIPELINE_MEASUREMENT, {"worker": self.source.client_id}, fields, time.time_ns()
        )

    def health(self) -> dict[str, Any]:
        """What /healthz answers: unhealthy (503) while disconnected from the broker, while
        durable writes fail, or while a component is down or stalled with work waiting."""
        connected = self.source.is_connected()
        spool_full = self.metrics.value("spool_full") == 1
        problems = self.supervisor.problems()
        if not connected:
            problems["mqtt"] = "not connected to the broker"
        if self.committer.store_problem is not None:
            problems["store"] = self.committer.store_problem
        if self.starting is not None:
            problems["starting"] = self.starting
        spool_records, spool_bytes = self.sink.backlog()
        return {
            "healthy": not problems,
            "problems": problems,
            "mqtt_connected": connected,
            "database_up": self.sink.database_up,
            "spool_records": spool_records,
            "spool_bytes": spool_bytes,
            "spool_full": spool_full,
            **(self.broker_stats.health() if self.broker_stats is not None else {}),
        }
