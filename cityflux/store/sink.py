"""The durable sink: a batch is either in the database or fsynced in the spool when
:meth:`DurableSink.write` returns. Only then does the pipeline acknowledge MQTT messages.

While the spool holds anything, new batches are appended behind it so the database receives
them in order; a drain thread empties the spool when the database answers again.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cityflux.errors import WriteRejected, WriteRetryable
from cityflux.observability import Metrics
from cityflux.store.influx import InfluxWriter
from cityflux.store.spool import Spool, SpoolRecord
from cityflux.supervisor import backoff

RejectedLines = list[tuple[str, str]]  # (line, the database's error message)


@dataclass(slots=True)
class SinkResult:
    written: int = 0
    spooled: int = 0
    rejected: RejectedLines = field(default_factory=list)

    def add(self, other: SinkResult) -> None:
        self.written += other.written
        self.spooled += other.spooled
        self.rejected += other.rejected


class DurableSink:
    def __init__(
        self,
        writer: InfluxWriter,
        spool: Spool,
        metrics: Metrics,
        on_rejected: Callable[[RejectedLines], None] | None = None,
    ) -> None:
        self.writer = writer
        self.spool = spool
        self.metrics = metrics
        self.on_rejected = on_rejected  # for lines refused while draining the spool
        self.database_up = True
        self._appended = threading.Event()
        self._stop = threading.Event()
        self._corrupt_seen = (0, 0)  # the spool's counts already added to the metrics
        self._corrupt_lock = threading.Lock()  # both the ingest and the drain thread add them
        self._update_spool_gauges()  # the spool may have found damage while opening

    # -- the ingest side --------------------------------------------------------------------
    def write(self, lines: list[str]) -> SinkResult:
        """Durable on return (written or spooled). Raises SpoolFull for back-pressure."""
        if not lines:
            return SinkResult()
        body = self.writer.encode_body(lines)
        if not self.spool.empty:
            return self._to_spool(body, len(lines))
        try:
            with self.metrics.write_seconds.time():
                self.writer.send_with_retry(body, self.writer.gzip)
        except WriteRetryable:
            self._mark_database(False)
            return self._to_spool(body, len(lines))
        except WriteRejected as exc:
            return self._bisect(lines, exc.message)
        self._mark_database(True)
        self.metrics.lines_written.inc(len(lines))
        return SinkResult(written=len(lines))

    def _to_spool(self, body: bytes, count: int) -> SinkResult:
        self.spool.append(body, self.writer.gzip)
        self.metrics.lines_spooled.inc(count)
        self._update_spool_gauges()
        self._appended.set()
        return SinkResult(spooled=count)

    def _bisect(self, lines: list[str], error: str, draining: bool = False) -> SinkResult:
        """Find the lines the database refuses by halving; write or spool the rest.

        Re-sending lines that a partial write already stored is harmless (same series and
        timestamp overwrite themselves), so halves are simply sent again. Order holds through
        an outage in the middle: on the ingest side, once one half is spooled the later halves
        go behind it; while draining, the outage ends the bisection and the record stays at
        the head of the spool, to be retried whole (its refused lines may then be reported
        twice: dead letters are at least once).
        """
        if len(lines) == 1:
            return SinkResult(rejected=[(lines[0], error)])
        result = SinkResult()
        middle = len(lines) // 2
        for half in (lines[:middle], lines[middle:]):
            body = self.writer.encode_body(half)
            if not draining and not self.spool.empty:
                result.add(self._to_spool(body, len(half)))
                continue
            try:
                self.writer.send_with_retry(body, self.writer.gzip)
                self.metrics.lines_written.inc(len(half))
                result.written += len(half)
            except WriteRejected as exc:
                result.add(self._bisect(half, exc.message, draining))
            except WriteRetryable:
                if draining:
                    raise
                result.add(self._to_spool(body, len(half)))
        return result

    # -- the drain side -----------------------------------------------------------------------
    def stop(self) -> None:
        """End :meth:`drain_loop` (its thread belongs to the caller's supervisor)."""
        self._stop.set()
        self._appended.set()

    def close(self) -> None:
        """Close the database connection, then the spool (each even if the other raised)."""
        try:
            self.writer.close()
        finally:
            self.spool.close()

    def backlog(self) -> tuple[int, int]:
        """Records and bytes in the spool, waiting for the database."""
        return len(self.spool), self.spool.size

    def drain_once(self) -> bool:
        """Move the oldest spooled record to the database; False if there was none or it failed."""
        record = self.spool.peek()
        if record is None:
            self._update_spool_gauges()  # peek may have quarantined corrupt records
            return False
        try:
            self.writer.send(record.body, record.gzip)
        except WriteRetryable:
            self._mark_database(False)
            return False
        except WriteRejected as exc:
            try:
                self._drain_rejected(record, exc.message)
            except WriteRetryable:  # the database went away mid-bisection: retried whole
                self._mark_database(False)
                return False
        else:
            self.metrics.lines_written.inc(_line_count(record))
        self._mark_database(True)
        self.spool.commit(record)
        self._update_spool_gauges()
        return True

    def _drain_rejected(self, record: SpoolRecord, error: str) -> None:
        result = self._bisect(_lines(record), error, draining=True)
        if result.rejected and self.on_rejected is not None:
            self.on_rejected(result.rejected)

    def drain_loop(self, progress: Callable[[], None] = lambda: None) -> None:
        """Empty the spool into the database until :meth:`stop`, backing off while it is
        down; ``progress`` is called after each record moved and while there is none."""
        attempt = 0
        while not self._stop.is_set():
            if self.spool.empty:
                progress()
                self._appended.wait(0.5)
                self._appended.clear()
                attempt = 0
                continue
            if self.drain_once():
                progress()
                attempt = 0
                continue
            attempt += 1
            delay = backoff(
                attempt, self.writer.config.retry_base_s, self.writer.config.retry_max_s
            )
            self._stop.wait(max(delay, 0.05))

    def _mark_database(self, up: bool) -> None:
        self.database_up = up
        self.metrics.database_up.set(1 if up else 0)

    def _update_spool_gauges(self) -> None:
        self.metrics.spool_bytes.set(self.spool.size)
        self.metrics.spool_records.set(len(self.spool))
        with self._corrupt_lock:
            records, files = self.spool.corrupt_records, self.spool.corrupt_files
            self.metrics.spool_corrupt_records.inc(max(0, records - self._corrupt_seen[0]))
            self.metrics.spool_corrupt_files.inc(max(0, files - self._corrupt_seen[1]))
            self._corrupt_seen = (records, files)


def _body(record: SpoolRecord) -> bytes:
    return gzip.decompress(record.body) if record.gzip else record.body


def _lines(record: SpoolRecord) -> list[str]:
    return _body(record).decode("utf-8").split("\n")


def _line_count(record: SpoolRecord) -> int:
    return _body(record).count(b"\n") + 1
