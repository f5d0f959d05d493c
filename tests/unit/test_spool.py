from __future__ import annotations

from pathlib import Path

import pytest

from cityflux.errors import SpoolFull
from cityflux.store.spool import Spool


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (record := spool.peek()) is not None:
        out.append(record.body)
        spool.commit(record)
    return out


def test_in_order_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=100)
    bodies = [f"batch-{i}".encode() * 5 for i in range(20)]
    for body in bodies:
        spool.append(body, gzip=False)
    assert len(list(tmp_path.glob("*.spool"))) > 1
    reopened = Spool(tmp_path, max_bytes=10_000, segment_bytes=100)
    assert len(reopened) == 20
    assert drain(reopened) == bodies
    assert reopened.empty and reopened.size == 0
    assert list(tmp_path.glob("*.spool")) == []


def test_cap_raises_spool_full_and_draining_frees_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100, segment_bytes=100)
    spool.append(b"x" * 60, gzip=True)
    with pytest.raises(SpoolFull):
        spool.append(b"y" * 60, gzip=True)
    record = spool.peek()
    assert record is not None and record.gzip
    spool.commit(record)
    spool.append(b"y" * 60, gzip=True)
    assert drain(spool) == [b"y" * 60]


def test_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000)
    spool.append(b"first", gzip=False)
    spool.append(b"second", gzip=False)
    segment = next(tmp_path.glob("*.spool"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # a crash in the middle of the second append
    reopened = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000)
    assert drain(reopened) == [b"first"]
    assert reopened.corrupt_records == 1


def test_partially_drained_segment_is_resent_after_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=10_000)
    for body in (b"a", b"b", b"c"):
        spool.append(body, gzip=False)
    record = spool.peek()
    assert record is not None
    spool.commit(record)  # "a" written, then the process dies
    assert drain(Spool(tmp_path, 10_000, 10_000)) == [b"a", b"b", b"c"]  # at least once
