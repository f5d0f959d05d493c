"""The durable sink against a fake database writer: a real spool on disk, real metrics, and a
writer whose network is replaced by a switch (up, down) and a list of refused markers.

The fake subclasses :class:`InfluxWriter` and overrides only :meth:`send` and :meth:`close`, so
the body encoding (plain or gzip) and ``send_with_retry`` under test are the shipped ones.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from cityflux.config import Config
from cityflux.errors import SpoolError, SpoolFull, StoreError, WriteRejected, WriteRetryable
from cityflux.observability import Metrics
from cityflux.store.influx import InfluxWriter
from cityflux.store.sink import DurableSink, RejectedLines
from cityflux.store.spool import Spool

BAD = "BAD"  # a line holding this is refused by the fake database


class FakeWriter(InfluxWriter):
    """A database that is up or down, and refuses (HTTP 400) any body holding a marker."""

    def __init__(self, gzipped: bool = False) -> None:
        config = msgspec.structs.replace(
            Config().influx, gzip=gzipped, max_retries=2, retry_base_s=0.001, retry_max_s=0.01
        )
        super().__init__(config)
        self.up = True
        self.refuse = {BAD}
        self.stored: list[str] = []  # lines the fake database accepted, in arrival order
        self.attempts = 0
        self.down_after_refusal = False  # the database refuses a body, then goes away
        self.outage_after_refusal = 0  # ... or goes away for this many sends only
        self._outage = 0
        self.closed = False
        self.close_error: Exception | None = None
        self._lock = threading.Lock()  # the ingest (test) and the drain thread both send

    def send(self, body: bytes, gzipped: bool) -> None:
        text = (gzip.decompress(body) if gzipped else body).decode("utf-8")
        with self._lock:
            self.attempts += 1
            if not self.up:
                raise WriteRetryable("connection refused (fake)")
            if self._outage > 0:
                self._outage -= 1
                raise WriteRetryable("connection reset (fake, brief)")
            lines = text.split("\n")
            for line in lines:
                if any(marker in line for marker in self.refuse):
                    if self.down_after_refusal:
                        self.up = False
                    self._outage = self.outage_after_refusal
                    raise WriteRejected(400, f"unable to parse '{line}': bad field (fake)")
            self.stored += lines

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error


def lines(prefix: str, count: int) -> list[str]:
    return [f"m,batch={prefix} v={i}i {1_000 + i}" for i in range(count)]


def make_sink(
    tmp_path: Path,
    gzipped: bool = False,
    on_rejected: Callable[[RejectedLines], None] | None = None,
) -> tuple[DurableSink, FakeWriter, Metrics]:
    writer, metrics = FakeWriter(gzipped), Metrics()
    return DurableSink(writer, Spool(tmp_path, 1_000_000), metrics, on_rejected), writer, metrics


def oldest_lines(spool: Spool) -> list[str]:
    """The lines of the oldest spooled record (read, not committed)."""
    record = spool.peek()
    assert record is not None
    body = gzip.decompress(record.body) if record.gzip else record.body
    return body.decode("utf-8").split("\n")


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- writing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gzipped", [False, True])
def test_written_when_the_database_is_up(tmp_path: Path, gzipped: bool) -> None:
    sink, writer, metrics = make_sink(tmp_path, gzipped)
    batch = lines("a", 5)
    result = sink.write(batch)
    assert (result.written, result.spooled, result.rejected) == (5, 0, [])
    assert writer.stored == batch
    assert writer.attempts == 1
    assert sink.spool.empty and sink.backlog() == (0, 0)
    assert metrics.value("lines_written_total") == 5
    assert metrics.value("lines_spooled_total") == 0
    assert metrics.value("database_up") == 1
    assert sink.write([]).written == 0 and writer.attempts == 1  # nothing to send, not sent


@pytest.mark.parametrize("gzipped", [False, True])
def test_spooled_when_down_and_durable_across_a_new_spool(tmp_path: Path, gzipped: bool) -> None:
    sink, writer, metrics = make_sink(tmp_path, gzipped)
    writer.up = False
    batch = lines("a", 4)
    result = sink.write(batch)
    assert (result.written, result.spooled, result.rejected) == (0, 4, [])
    assert writer.attempts == 1 + writer.config.max_retries  # retried before spooling
    assert writer.stored == []
    assert sink.database_up is False
    assert metrics.value("database_up") == 0
    assert metrics.value("lines_spooled_total") == 4
    assert metrics.value("lines_written_total") == 0
    assert metrics.value("spool_records") == 1
    assert metrics.value("spool_bytes") == sink.spool.size > 0
    sink.close()
    # a new process: the batch is still there, whole, and drains into the database
    reopened = Spool(tmp_path, 1_000_000)
    assert len(reopened) == 1
    assert oldest_lines(reopened) == batch
    writer2 = FakeWriter(gzipped)
    sink2 = DurableSink(writer2, reopened, Metrics())
    assert sink2.drain_once() is True
    assert writer2.stored == batch
    assert reopened.empty
    sink2.close()


def test_new_writes_go_behind_a_non_empty_spool(tmp_path: Path) -> None:
    sink, writer, metrics = make_sink(tmp_path)
    first, second, third = lines("a", 3), lines("b", 2), lines("c", 1)
    writer.up = False
    assert sink.write(first).spooled == 3
    writer.up = True  # back, but the spool is not empty: the new batch must not jump the queue
    attempts = writer.attempts
    assert sink.write(second).spooled == 2
    assert sink.write(third).spooled == 1
    assert writer.attempts == attempts  # not even tried
    assert writer.stored == []
    assert len(sink.spool) == 3
    assert [sink.drain_once() for _ in range(4)] == [True, True, True, False]
    assert writer.stored == first + second + third
    assert metrics.value("lines_written_total") == 6
    assert metrics.value("spool_records") == 0 and metrics.value("spool_bytes") == 0
    assert metrics.value("database_up") == 1
    # empty again: writes go straight to the database
    assert sink.write(lines("d", 2)).written == 2


def test_drain_once_fails_while_down_and_keeps_the_record(tmp_path: Path) -> None:
    sink, writer, metrics = make_sink(tmp_path)
    writer.up = False
    sink.write(lines("a", 2))
    assert sink.drain_once() is False
    assert len(sink.spool) == 1
    assert metrics.value("database_up") == 0
    writer.up = True
    assert sink.drain_once() is True
    assert writer.stored == lines("a", 2)


def test_drain_loop_empties_the_spool_in_order_once_the_database_is_back(tmp_path: Path) -> None:
    sink, writer, metrics = make_sink(tmp_path, gzipped=True)
    writer.up = False
    batches = [lines(str(i), i + 1) for i in range(6)]
    for batch in batches:
        assert sink.write(batch).spooled == len(batch)
    progress = threading.Event()
    before = writer.attempts  # the first write tried (with retries), the others went behind it
    thread = threading.Thread(target=sink.drain_loop, args=(progress.set,), daemon=True)
    thread.start()
    try:
        time.sleep(0.2)  # the loop backs off against a database that is down
        assert len(sink.spool) == len(batches) and writer.stored == []
        assert writer.attempts > before  # it did try
        writer.up = True
        wait_until(lambda: sink.spool.empty)
        # a batch written while the loop waits goes straight in, and the loop stays idle
        assert sink.write(lines("late", 2)).written == 2
        progress.clear()
        assert progress.wait(5)  # progress is reported while idle, too
    finally:
        sink.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert writer.stored == [line for batch in batches for line in batch] + lines("late", 2)
    assert metrics.value("lines_written_total") == 21 + 2
    assert metrics.value("database_up") == 1


def test_drain_loop_wakes_for_a_record_spooled_while_it_idles(tmp_path: Path) -> None:
    sink, writer, _ = make_sink(tmp_path)
    thread = threading.Thread(target=sink.drain_loop, daemon=True)
    thread.start()
    try:
        writer.up = False
        sink.write(lines("a", 3))
        writer.up = True
        wait_until(lambda: sink.spool.empty)
    finally:
        sink.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert writer.stored == lines("a", 3)


def test_a_full_spool_is_back_pressure_not_loss(tmp_path: Path) -> None:
    writer, metrics = FakeWriter(), Metrics()
    sink = DurableSink(writer, Spool(tmp_path, max_bytes=100), metrics)
    writer.up = False
    assert sink.write(lines("a", 2)).spooled == 2
    with pytest.raises(SpoolFull):  # the caller holds its acknowledgements back
        sink.write(lines("b", 5))
    assert len(sink.spool) == 1
    assert metrics.value("lines_spooled_total") == 2
    writer.up = True
    assert sink.drain_once() is True
    assert sink.write(lines("b", 5)).written == 5  # room again, and the database is back
    assert writer.stored == lines("a", 2) + lines("b", 5)


# -- rejected lines --------------------------------------------------------------------------
@pytest.mark.parametrize("bad_at", [[0], [5], [7], [2, 3], [0, 7], list(range(8))])
def test_rejected_lines_are_bisected_out_and_the_rest_written(
    tmp_path: Path, bad_at: list[int]
) -> None:
    sink, writer, metrics = make_sink(tmp_path)
    batch = [
        line.replace("v=", f"{BAD}=") if i in bad_at else line
        for i, line in enumerate(lines("a", 8))
    ]
    result = sink.write(batch)
    good = [line for i, line in enumerate(batch) if i not in bad_at]
    assert [line for line, _ in result.rejected] == [batch[i] for i in bad_at]
    for line, error in result.rejected:
        assert error == f"unable to parse '{line}': bad field (fake)"
    assert (result.written, result.spooled) == (len(good), 0)
    assert writer.stored == good
    assert metrics.value("lines_written_total") == len(good)
    assert sink.spool.empty


def test_a_database_lost_while_bisecting_spools_both_halves(tmp_path: Path) -> None:
    sink, writer, metrics = make_sink(tmp_path)
    writer.down_after_refusal = True
    batch = lines("a", 4)
    batch[0] = batch[0].replace("v=", f"{BAD}=")
    result = sink.write(batch)
    # refused, then gone: nothing lost, nothing judged, each half spooled as sent
    assert (result.written, result.spooled, result.rejected) == (0, 4, [])
    assert len(sink.spool) == 2
    assert oldest_lines(sink.spool) == batch[:2]
    assert metrics.value("lines_spooled_total") == 4
    writer.up, writer.down_after_refusal = True, False
    reported: list[RejectedLines] = []
    sink.on_rejected = reported.append
    assert [sink.drain_once() for _ in range(3)] == [True, True, False]
    assert [line for line, _ in reported[0]] == [batch[0]]
    assert writer.stored == batch[1:]


def test_lines_rejected_while_draining_reach_on_rejected(tmp_path: Path) -> None:
    reported: list[RejectedLines] = []
    sink, writer, metrics = make_sink(tmp_path, gzipped=True, on_rejected=reported.append)
    writer.up = False
    batch = lines("a", 5)
    batch[3] = batch[3].replace("v=", f"{BAD}=")
    assert sink.write(batch).spooled == 5  # down: nothing judged yet
    assert sink.write(lines("b", 2)).spooled == 2
    writer.up = True
    assert sink.drain_once() is True  # the record is done with, even though one line failed
    assert len(reported) == 1
    assert [line for line, _ in reported[0]] == [batch[3]]
    assert reported[0][0][1].startswith("unable to parse")
    assert writer.stored == batch[:3] + batch[4:]
    assert sink.drain_once() is True
    assert writer.stored == batch[:3] + batch[4:] + lines("b", 2)
    assert sink.spool.empty
    assert metrics.value("lines_written_total") == 6


def test_a_rejection_while_draining_without_a_callback_is_not_fatal(tmp_path: Path) -> None:
    sink, writer, _ = make_sink(tmp_path)
    writer.up = False
    sink.write([f"m {BAD}=1 1"])
    writer.up = True
    assert sink.drain_once() is True
    assert sink.spool.empty and writer.stored == []


# -- backlog and close -----------------------------------------------------------------------
def test_backlog_reports_records_and_bytes(tmp_path: Path) -> None:
    sink, writer, metrics = make_sink(tmp_path)
    assert sink.backlog() == (0, 0)
    writer.up = False
    first, second = lines("a", 3), lines("bb", 10)
    sink.write(first)
    sink.write(second)
    size = sum(len("\n".join(batch).encode()) for batch in (first, second))
    assert sink.backlog() == (2, size)
    assert (metrics.value("spool_records"), metrics.value("spool_bytes")) == (2, size)
    writer.up = True
    sink.drain_once()
    assert sink.backlog() == (1, len("\n".join(second).encode()))
    sink.drain_once()
    assert sink.backlog() == (0, 0)


def test_close_closes_writer_and_spool(tmp_path: Path) -> None:
    sink, writer, _ = make_sink(tmp_path)
    sink.close()
    assert writer.closed
    with pytest.raises(SpoolError, match="closed"):
        sink.spool.peek()


def test_close_closes_the_spool_even_if_the_writer_raises(tmp_path: Path) -> None:
    sink, writer, _ = make_sink(tmp_path)
    writer.close_error = StoreError("connection pool already gone")
    with pytest.raises(StoreError, match="already gone"):
        sink.close()
    assert writer.closed
    with pytest.raises(SpoolError, match="closed"):
        sink.spool.peek()
    Spool(tmp_path, 1_000).close()  # and the file is free for the next process


def test_an_outage_in_the_middle_of_a_bisection_keeps_the_order(tmp_path: Path) -> None:
    """The first half is spooled (the database went away for its retries), the database is
    back for the second: the second must go behind the first, not ahead of it."""
    sink, writer, _ = make_sink(tmp_path)
    writer.outage_after_refusal = writer.config.max_retries + 1  # every try of the first half
    batch = lines("a", 4)
    batch[0] = batch[0].replace("v=", f"{BAD}=")
    result = sink.write(batch)
    assert (result.written, result.spooled) == (0, 4)
    assert writer.stored == []  # before the fix: the second half, written ahead of the first
    writer.outage_after_refusal = 0
    reported: list[RejectedLines] = []
    sink.on_rejected = reported.append
    sink.write(lines("b", 2))  # newer, behind both halves
    while sink.drain_once():
        pass
    assert [line for line, _ in reported[0]] == [batch[0]]
    assert writer.stored == batch[1:] + lines("b", 2)


def test_an_outage_while_bisecting_a_drained_record_leaves_it_at_the_head(tmp_path: Path) -> None:
    sink, writer, _ = make_sink(tmp_path)
    writer.up = False
    batch = lines("a", 4)
    batch[2] = batch[2].replace("v=", f"{BAD}=")
    sink.write(batch)
    sink.write(lines("b", 2))
    assert len(sink.spool) == 2
    writer.up, writer.outage_after_refusal = True, writer.config.max_retries + 1
    reported: list[RejectedLines] = []
    sink.on_rejected = reported.append
    assert sink.drain_once() is False  # refused, then gone mid-bisection: not committed
    assert len(sink.spool) == 2 and oldest_lines(sink.spool) == batch
    writer.outage_after_refusal = 0
    while sink.drain_once():
        pass
    # before the fix: the record's halves went to the end of the spool, behind "b"
    assert writer.stored[-2:] == lines("b", 2)
    assert [line for line, _ in reported[-1]] == [batch[2]]
    assert [line for line in writer.stored if "batch=a" in line][-3:] == [
        batch[0],
        batch[1],
        batch[3],
    ]
