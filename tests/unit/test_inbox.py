"""The consumer's inbox (cityflux/model/inbox.py): batches in arrival order across the chunks
the reader appended, none lost or repeated, whatever the sizes."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from cityflux.model.inbox import Inbox
from tests.support import examples


def _chunk(start: int, size: int) -> tuple[list[str], list[bytes], list[int]]:
    ids = list(range(start, start + size))
    return [f"t/{i}" for i in ids], [str(i).encode() for i in ids], ids


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.integers(0, 30), max_size=12), st.lists(st.integers(1, 40), min_size=1))
def test_every_message_comes_out_once_in_order(chunks: list[int], takes: list[int]) -> None:
    inbox = Inbox(generation=3)
    start = 0
    for size in chunks:
        inbox.append(*_chunk(start, size))
        start += size
    out: list[int] = []
    for size in takes * (start + 1):  # enough takes to empty it
        batch = inbox.take(size)
        assert len(batch) == min(size, len(batch) + len(inbox))
        assert batch.generation == 3
        assert batch.topics == [f"t/{i}" for i in batch.receipts]
        assert batch.payloads == [str(i).encode() for i in batch.receipts]
        out += batch.receipts
        if not len(inbox):
            break
    assert out == list(range(start))
    assert len(inbox) == 0
    assert len(inbox.take(5)) == 0


def test_a_batch_is_stamped_with_its_first_message_arrival() -> None:
    inbox = Inbox()
    inbox.append(*_chunk(0, 10))
    first = time.monotonic()
    time.sleep(0.01)
    inbox.append(*_chunk(10, 10))
    head = inbox.take(5)
    assert head.first_received <= first
    rest_of_first_chunk = inbox.take(5)  # the rest of a split chunk keeps its arrival time
    assert rest_of_first_chunk.first_received == head.first_received
    second = inbox.take(100)
    assert second.first_received > first
    assert second.receipts == list(range(10, 20))


def test_a_waiting_take_returns_once_a_batch_is_there_or_at_its_deadline() -> None:
    import threading

    from cityflux.model.inbox import WaitingInbox

    inbox = WaitingInbox()
    inbox.append(*_chunk(0, 3))
    started = time.monotonic()
    assert inbox.take(10, 0.2).receipts == [0, 1, 2]  # not a full batch: the deadline
    assert time.monotonic() - started >= 0.19

    def feed() -> None:
        for start in range(0, 10, 2):
            time.sleep(0.02)
            inbox.append(*_chunk(start, 2))

    thread = threading.Thread(target=feed)
    started = time.monotonic()
    thread.start()
    batch = inbox.take(10, 5.0)  # full well before the deadline
    thread.join()
    assert batch.receipts == list(range(10))
    assert time.monotonic() - started < 2.0
    assert len(inbox) == 0
