"""The commit stage: make a batch's outcome durable, publish its dead letters, then settle it
with the source. Nothing is acknowledged before the sink returned (database or fsynced spool)
and the broker confirmed the dead letters (or paho holds them for the reconnect)."""

from __future__ import annotations

import logging
import threading
import time

from cityflux.errors import SpoolError, SpoolFull
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.model.columns import Rejection
from cityflux.model.contract import Reason
from cityflux.model.messages import MessageBatch
from cityflux.observability import Metrics
from cityflux.pipeline.seams import Sink, Source
from cityflux.pipeline.transform import BatchOutcome
from cityflux.store.sink import RejectedLines, SinkResult

log = logging.getLogger(__name__)
DERIVED_SLICE = 10_000  # lines per write of analytics results
DERIVED_PAUSE_S = 0.01
SPOOL_FULL_PAUSE_S = 0.5
DEADLETTER_CONFIRM_S = 5.0
TURN_WAIT_S = 10.0  # a batch's analytics lines wait this long at most for an earlier batch's


class Committer:
    def __init__(
        self,
        source: Source,
        sink: Sink,
        letters: DeadLetterFactory,
        metrics: Metrics,
        stopping: threading.Event,
    ) -> None:
        self.source = source
        self.sink = sink
        self.letters = letters
        self.metrics = metrics
        self.stopping = stopping
        self.store_problem: str | None = None  # why durable writes are failing right now
        # Batches carrying analytics lines are written in the order they were analysed: two
        # commit threads could otherwise land an alert's older point (its count, its value,
        # its acknowledgement) after the newer one, and points overwrite.
        self._turns_given = 0
        self._turn = 0  # the next numbered batch whose lines may be written
        self._turn_changed = threading.Condition()

    def take_turn(self) -> int:
        """A number for a batch with analytics lines (the pipeline thread, in analysis order)."""
        with self._turn_changed:
            self._turns_given += 1
            return self._turns_given - 1

    def commit(self, batch: MessageBatch, outcome: BatchOutcome) -> bool:
        """Store durably, dead-letter, acknowledge. False if not acknowledged."""
        if outcome.turn < 0:
            result = self.write_durably(outcome.lines)
        else:
            self._wait_for_turn(outcome.turn)
            try:
                result = self.write_durably(outcome.lines)
            finally:
                self._end_turn(outcome.turn)
        if result is None:
            return False  # stopping while the spool was full: the broker keeps the batch
        self._publish_letters(outcome.letters)
        if result.rejected:
            self.dead_letter_lines(result.rejected)
        for kind, count in outcome.accepted.items():
            self.metrics.accepted.labels(kind).inc(count)
        if not len(batch):
            return True
        acked = self.source.ack(batch)
        self.metrics.batch_messages.observe(len(batch))
        self.metrics.ack_lag_seconds.observe(time.monotonic() - batch.first_received)
        return acked

    def _wait_for_turn(self, turn: int) -> None:
        deadline = time.monotonic() + TURN_WAIT_S
        with self._turn_changed:
            while self._turn < turn and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:  # an earlier batch is stuck (or was never queued): go on
                    log.warning(
                        "analytics lines of batch %d written before those of batch %d",
                        turn, self._turn,
                    )  # fmt: skip
                    return
                self._turn_changed.wait(min(left, 0.5))

    def _end_turn(self, turn: int) -> None:
        with self._turn_changed:
            self._turn = max(self._turn, turn + 1)
            self._turn_changed.notify_all()

    def write_durably(self, lines: list[str]) -> SinkResult | None:
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

    def write_derived(self, lines: list[str]) -> None:
        """Analytics results, written by the analytics worker (spooled like everything else),
        in slices with a breath between them: one 100,000-line request would hold the
        database (and, on a small host, the CPU) while readings and alerts wait."""
        for start in range(0, len(lines), DERIVED_SLICE):
            result = self.write_durably(lines[start : start + DERIVED_SLICE])
            if result is not None and result.rejected:
                self.dead_letter_lines(result.rejected)
            if start + DERIVED_SLICE < len(lines):
                self.stopping.wait(DERIVED_PAUSE_S)

    def _publish_letters(self, letters: list[tuple[str, bytes]]) -> None:
        """Publish dead letters and wait for the broker to have them before the batch is acked.

        If the broker does not confirm in time, the source keeps them queued and sends them on
        reconnect; the rejections are also in InfluxDB (cityflux_deadletter) already.
        """
        if not letters:
            return
        confirmed = self.source.publish_confirmed(letters, DEADLETTER_CONFIRM_S)
        self.metrics.deadletters_published.inc(confirmed)
        if confirmed < len(letters):
            log.warning(
                "%d dead letters not yet confirmed by the broker; they are resent on reconnect",
                len(letters) - confirmed,
            )

    def dead_letter_now(self, reason: Reason, message: str, topic: str, payload: bytes) -> bool:
        """One message rejected outside a batch (the JetStream source's poison message):
        its dead letter stored durably and published; True once it is durable."""
        now = time.time_ns()
        letter = self.letters.letter(Rejection(reason, message, 0), topic, payload, now)
        if self.write_durably([self.letters.line(letter, now)]) is None:
            return False
        self.metrics.rejected.labels(reason.value).inc()
        self._publish_letters([(self.letters.topic(reason), self.letters.encode(letter))])
        return True

    def dead_letter_lines(self, rejected: RejectedLines) -> None:
        """Lines the database refused (e.g. a field type conflict): dead-letter, never retry."""
        for line, error in rejected:
            self.metrics.rejected.labels(Reason.WRITE_REJECTED.value).inc()
            letter = self.letters.letter(
                Rejection(Reason.WRITE_REJECTED, error, 0),
                "(database)",
                line.encode(),
                time.time_ns(),
            )
            self.source.publish(
                self.letters.topic(Reason.WRITE_REJECTED), self.letters.encode(letter)
            )
            self.metrics.deadletters_published.inc()
