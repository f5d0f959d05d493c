"""The commit stage writes the analytics lines of its batches in the order they were analysed.

Two commit threads wrote batches side by side (``ingest.write_concurrency``): a batch carrying
an alert's newer point (its count, value or acknowledgement) could reach the database before
the batch with the older one, which then won (points overwrite). The database here is an
in-memory sink that records the order of writes and makes the first one slow (a busy
database); everything else is the real Committer."""

from __future__ import annotations

import threading
import time

from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.model.messages import MessageBatch
from cityflux.observability import Metrics
from cityflux.pipeline.commit import Committer
from cityflux.pipeline.transform import BatchOutcome
from cityflux.store.sink import SinkResult


class SlowFirstSink:
    """The first write takes until another write came (at most 2 s): a busy database."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.first = True
        self.lock = threading.Lock()
        self.another = threading.Event()

    def write(self, lines: list[str]) -> SinkResult:
        with self.lock:
            slow, self.first = self.first, False
        if slow:
            self.another.wait(2.0)
        else:
            self.another.set()
        with self.lock:
            self.written += lines
        return SinkResult(written=len(lines))


class Source:
    def ack(self, batch: MessageBatch) -> bool:
        return True

    def publish_confirmed(self, messages: list[tuple[str, bytes]], timeout_s: float) -> int:
        return len(messages)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> object:
        return None


def committer(sink: SlowFirstSink) -> Committer:
    letters = DeadLetterFactory("cityflux/v1", 256)
    return Committer(Source(), sink, letters, Metrics(), threading.Event())  # type: ignore[arg-type]


def commit_side_by_side(commit: Committer, outcomes: list[BatchOutcome]) -> None:
    threads = []
    for outcome in outcomes:  # in the order the pipeline hands them over
        thread = threading.Thread(target=commit.commit, args=(MessageBatch(), outcome))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    for thread in threads:
        thread.join(10)


def test_an_alerts_newer_point_is_written_after_the_older_one() -> None:
    sink = SlowFirstSink()
    commit = committer(sink)
    older = BatchOutcome(lines=["cityflux_alert,id=7 count=1i 100"], derived=True)
    newer = BatchOutcome(lines=["cityflux_alert,id=7 count=2i 100"], derived=True)
    older.turn, newer.turn = commit.take_turn(), commit.take_turn()
    commit_side_by_side(commit, [older, newer])
    assert sink.written == older.lines + newer.lines


def test_batches_of_readings_alone_are_not_held_back() -> None:
    sink = SlowFirstSink()
    commit = committer(sink)
    slow = BatchOutcome(lines=["pole,device_id=p-1 noise_dba=50 100"])
    fast = BatchOutcome(lines=["pole,device_id=p-2 noise_dba=51 100"])
    commit_side_by_side(commit, [slow, fast])
    assert sink.written == fast.lines + slow.lines  # side by side, as before


def test_when_stopping_a_turn_never_handed_over_holds_nobody_back() -> None:
    sink = SlowFirstSink()
    sink.first = False
    commit = committer(sink)
    commit.take_turn()  # a batch numbered, then never queued (the pipeline stopping)
    later = BatchOutcome(lines=["cityflux_alert,id=8 count=1i 100"], derived=True)
    later.turn = commit.take_turn()
    started = time.monotonic()
    commit.stopping.set()  # stopping: no wait at all
    assert commit.commit(MessageBatch(), later)
    assert sink.written == later.lines and time.monotonic() - started < 1.0
