"""The ingest loop: MQTT batch -> decode -> validate -> line protocol -> durable sink -> ack.

One :class:`Pipeline` per worker process. A batch is acknowledged only after the sink made it
durable (database or fsynced spool) and the broker confirmed its dead letters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cityflux.analytics.link import AnalyticsLink
from cityflux.config import Config
from cityflux.errors import SpoolFull, StoreError
from cityflux.ingest.batch import Columns, Rejection
from cityflux.ingest.contract import Reason
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.mqtt import MessageBatch, MqttConsumer
from cityflux.ingest.validate import validate
from cityflux.observability import Metrics, MetricsServer
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import BatchEncoder, encode_point
from cityflux.store.schema import PIPELINE_MEASUREMENT
from cityflux.store.sink import DurableSink, RejectedLines
from cityflux.store.spool import Spool

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


class Pipeline:
    def __init__(self, config: Config, worker: int = 0, workers: int = 1) -> None:
        self.config = config
        self.metrics = Metrics()
        self.consumer = MqttConsumer(config.mqtt, self.metrics, worker, workers)
        self.decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
        self.encoder = BatchEncoder()
        self.letters = DeadLetterFactory(
            config.mqtt.topic_root, config.ingest.deadletter_prefix_bytes
        )
        spool_dir = Path(config.spool.dir) / (f"worker-{worker}" if workers > 1 else "")
        self.spool = Spool(spool_dir, config.spool.max_bytes, config.spool.segment_bytes)
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
            AnalyticsLink(config, self.consumer, self._write_derived) if analytics else None
        )
        self.stopping = threading.Event()
        self._next_health = 0.0
        self._handover: queue.Queue[tuple[MessageBatch, BatchOutcome] | None] = queue.Queue(1)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, wait_connected_s: float = 0.0) -> None:
        self._prepare_database()
        if self.analytics is not None:
            self.analytics.recover(self.writer)
        self.sink.start_draining()
        if self.config.metrics.enabled:
            self.server = MetricsServer(
                self.metrics, self.health, self.config.metrics.host, self.metrics_port
            )
            self.server.start()
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
            threading.Thread(target=self._commit_loop, name=f"commit-{i}", daemon=True)
            for i in range(ingest.write_concurrency)
        ]
        for committer in committers:
            committer.start()
        try:
            while not self.stopping.is_set():
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
            for _ in committers:  # one end marker each; they take them as they finish
                self._handover.put(None)
            for committer in committers:
                committer.join(timeout=30)

    def _hand_over(self, work: tuple[MessageBatch, BatchOutcome]) -> None:
        while not self.stopping.is_set():
            try:
                self._handover.put(work, timeout=0.2)
                return
            except queue.Full:
                continue

    def _commit_loop(self) -> None:
        while (work := self._handover.get()) is not None:
            self.commit(*work)

    def stop(self) -> None:
        self.stopping.set()

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
        if self.analytics is not None:
            self.analytics.close()
        self.consumer.stop()
        self.sink.stop()
        if self.server is not None:
            self.server.stop()

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
        """Everything between the broker and the database, with no I/O."""
        decoded = self.decoder.decode(batch.topics, batch.payloads, now_ns)
        self.metrics.ignored.inc(decoded.ignored)
        outcome = BatchOutcome()
        rejections = decoded.rejections
        newest = 0
        accepted: dict[str, Columns] = {}
        for kind, columns in decoded.columns.items():
            good, bad = validate(columns, self.config.ingest, now_ns)
            rejections += bad
            outcome.lines += self.encoder.encode(good)
            outcome.accepted[kind] = good.readings()
            accepted[kind] = good
            if len(good):
                newest = max(newest, int(good.ts_ns.max()))
        if self.analytics is not None:
            outcome.lines += self._analyse(batch, accepted, rejections, decoded.ignored)
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
        while True:
            try:
                result = self.sink.write(lines)
            except SpoolFull as exc:
                self.metrics.spool_full.set(1)
                log.error("%s: holding acknowledgements; the broker keeps the messages", exc)
                if self.stopping.wait(SPOOL_FULL_PAUSE_S):
                    return None
                continue
            self.metrics.spool_full.set(0)
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
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        confirmed = sum(1 for info in infos if info.is_published())
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
        connected = self.consumer.connected.is_set()
        spool_full = self.metrics.value("spool_full") == 1
        return {
            "healthy": connected and not spool_full,
            "mqtt_connected": connected,
            "database_up": self.sink.database_up,
            "spool_records": len(self.spool),
            "spool_bytes": self.spool.size,
            "spool_full": spool_full,
        }
