from __future__ import annotations

import errno
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cityflux.config import Config, load_config
from cityflux.errors import SpoolError, SpoolFull
from cityflux.files import set_aside
from cityflux.observability import Metrics
from cityflux.store import spool_db
from cityflux.store.influx import InfluxWriter
from cityflux.store.sink import DurableSink
from cityflux.store.spool import DB_NAME, Spool
from tests.support import drain


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Files must be private whatever the umask says."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_in_order_across_restarts_and_the_wal_is_empty_at_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    bodies = [f"batch-{i}".encode() * 5 for i in range(20)]
    for body in bodies:
        spool.append(body, gzip=False)
        # every append is checkpointed: no acknowledged record lives only in the WAL
        assert (tmp_path / f"{DB_NAME}-wal").stat().st_size == 0
    assert spool.size == sum(map(len, bodies))
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert len(reopened) == 20
    assert drain(reopened) == bodies
    assert reopened.empty and reopened.size == 0
    assert reopened.corrupt_records == 0 and reopened.corrupt_files == 0


def test_draining_keeps_synchronous_full(tmp_path: Path) -> None:
    """One durability setting for every transaction: no per-record PRAGMA switching."""
    spool = Spool(tmp_path, max_bytes=10_000)
    for body in (b"one", b"two"):
        spool.append(body, gzip=False)
    assert spool._conn is not None
    statements: list[str] = []
    spool._conn.set_trace_callback(statements.append)
    assert drain(spool) == [b"one", b"two"]
    assert any(s.startswith("DELETE FROM records") for s in statements)
    assert not [s for s in statements if "synchronous" in s.lower()]
    assert spool._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    spool.close()
    assert drain(Spool(tmp_path, max_bytes=10_000)) == []  # the commits are on disk


def test_cap_raises_spool_full_and_draining_frees_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    spool.append(b"x" * 60, gzip=True)
    with pytest.raises(SpoolFull):
        spool.append(b"y" * 60, gzip=True)
    record = spool.peek()
    assert record is not None and record.gzip
    spool.commit(record)
    spool.append(b"y" * 60, gzip=True)
    assert drain(spool) == [b"y" * 60]


def test_a_committed_record_stays_committed_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    for body in (b"a", b"b", b"c"):
        spool.append(body, gzip=False)
    record = spool.peek()
    assert record is not None
    spool.commit(record)
    spool.commit(record)  # idempotent
    assert drain(Spool(tmp_path, 10_000)) == [b"b", b"c"]


def test_directory_and_files_are_private(tmp_path: Path, open_umask: None) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10_000)
    spool.append(b"secret readings", gzip=False)
    assert directory.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert modes == {
        DB_NAME: 0o600,
        f"{DB_NAME}-wal": 0o600,
        f"{DB_NAME}-shm": 0o600,
        f"{DB_NAME}.created": 0o600,  # an empty marker: the file was made once
    }


def test_an_existing_world_readable_spool_is_made_private(tmp_path: Path) -> None:
    Spool(tmp_path / "s", 10_000).close()
    os.chmod(tmp_path / "s", 0o755)
    os.chmod(tmp_path / "s" / DB_NAME, 0o644)
    Spool(tmp_path / "s", 10_000)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / DB_NAME).stat().st_mode & 0o777 == 0o600


def test_stray_files_do_not_stop_the_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"kept", gzip=False)
    spool.close()
    (tmp_path / "notes.spool").write_text("not a segment")
    (tmp_path / "README").write_text("hello")
    (tmp_path / "old").mkdir()
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert drain(reopened) == [b"kept"]
    assert {"notes.spool", "README", "old"} <= files(tmp_path)


def old_segment(path: Path, records: list[tuple[bytes, bool]], tail: bytes = b"") -> None:
    """The segment format of the previous version: <IIB length, CRC-32, flags> + body."""
    data = b"".join(
        struct.pack("<IIB", len(body), zlib.crc32(body), int(gzip)) + body for body, gzip in records
    )
    path.write_bytes(data + tail)


def test_segments_of_the_previous_version_are_imported_then_removed(tmp_path: Path) -> None:
    old_segment(tmp_path / "000000000001.spool", [(b"one", False), (b"two", True)])
    torn = struct.pack("<IIB", 100, 0, 0) + b"half a rec"  # a crash during an old append
    old_segment(tmp_path / "000000000002.spool", [(b"three", False)], tail=torn)
    (tmp_path / "notes.spool").write_text("stray")
    spool = Spool(tmp_path, max_bytes=10_000)
    assert len(spool) == 3
    first = spool.peek()
    assert first is not None and first.body == b"one" and not first.gzip
    assert drain(spool) == [b"one", b"two", b"three"]
    assert spool.corrupt_records == 1  # the torn tail, kept for inspection
    assert "000000000001.spool" not in files(tmp_path)
    assert "000000000002.spool.corrupt" in files(tmp_path)
    assert "notes.spool" in files(tmp_path)
    assert drain(Spool(tmp_path, max_bytes=10_000)) == []  # imported once


def test_records_behind_a_damaged_one_in_an_old_segment_are_imported(tmp_path: Path) -> None:
    """They may have been acknowledged: the scan finds the next whole record."""
    segment = tmp_path / "000000000001.spool"
    torn = struct.pack("<IIB", 100, 0, 0) + b"half a rec"  # a crash, then more appends
    flipped = bytearray(struct.pack("<IIB", 40, zlib.crc32(b"x" * 40), 0) + b"x" * 40)
    flipped[20] ^= 0x04
    parts = [
        [(b"one", False)],
        torn,
        [(b"two" * 30, True), (b"three", False)],
        bytes(flipped),
        [(b"four", False)],
        b"\x00" * 64,  # a zero-filled tail: not 64 / 9 empty records
    ]
    data = b""
    for part in parts:
        if isinstance(part, bytes):
            data += part
        else:
            old_segment(segment, part)
            data += segment.read_bytes()
    segment.write_bytes(data)
    spool = Spool(tmp_path, max_bytes=10_000)
    assert drain(spool) == [b"one", b"two" * 30, b"three", b"four"]
    assert spool.corrupt_records == 3  # three damaged spans, each at least one record
    assert (tmp_path / "000000000001.spool.corrupt").read_bytes() == data  # kept as found


def test_an_emptied_database_file_is_damage_not_a_fresh_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"acknowledged", gzip=False)
    spool.close()
    (tmp_path / DB_NAME).write_bytes(b"")
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert reopened.corrupt_files == 1 and reopened.uncounted_files == 1


def test_an_unreadable_database_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"garbage, not SQLite" * 100)
    spool = Spool(tmp_path, max_bytes=10_000)
    assert spool.corrupt_files == 1
    aside = [name for name in files(tmp_path) if name.endswith(".corrupt")]
    assert aside == [f"{DB_NAME}.corrupt"]  # the same naming as checkpoints and alerts
    assert (tmp_path / aside[0]).read_bytes().startswith(b"garbage")
    spool.append(b"after", gzip=False)
    assert drain(spool) == [b"after"]


def test_a_flipped_bit_in_a_body_is_quarantined_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000)
    bodies = [bytes([65 + i]) * 500 for i in range(5)]
    for body in bodies:
        spool.append(body, gzip=False)
    spool.close()
    db = tmp_path / DB_NAME
    data = bytearray(db.read_bytes())
    at = data.find(bodies[2]) + 100
    data[at] ^= 0x10
    db.write_bytes(bytes(data))
    reopened = Spool(tmp_path, max_bytes=100_000)
    assert drain(reopened) == bodies[:2] + bodies[3:]
    assert reopened.corrupt_records == 1
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT id, length(body), reason FROM quarantine").fetchall()
    assert kept == [(3, 500, "CRC mismatch")]
    assert drain(Spool(tmp_path, max_bytes=100_000)) == []  # counted once, not again


def damaged_while_running(tmp_path: Path) -> tuple[Spool, list[bytes]]:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    bodies = [bytes([i]) * 3000 for i in range(1, 40)]
    for body in bodies:
        spool.append(body, gzip=False)
    assert spool._conn is not None
    spool._conn.close()
    db = tmp_path / DB_NAME
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name='records'").fetchone()
    data = bytearray(db.read_bytes())
    data[(root[0] - 1) * 4096] = 0x55  # the records table's root page: not a b-tree page
    db.write_bytes(bytes(data))
    # reconnect without the start-up check, as if the damage happened while running
    spool._conn = spool_db.connect(db)
    return spool, bodies


def test_damage_found_while_running_rebuilds_the_file(tmp_path: Path) -> None:
    spool, bodies = damaged_while_running(tmp_path)
    out = drain(spool)
    assert spool.corrupt_files == 1
    assert out == bodies[: len(out)]
    assert len(out) + spool.corrupt_records == len(bodies)
    assert any(name.endswith(".corrupt") for name in files(tmp_path))


def test_a_failed_rebuild_is_tried_again_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during the salvage must not leave the spool shut for good."""
    spool, bodies = damaged_while_running(tmp_path)
    salvage = spool_db.Salvage.run
    calls: list[int] = []

    def full_disk_once(self: spool_db.Salvage) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return salvage(self)

    monkeypatch.setattr(spool_db.Salvage, "run", full_disk_once)
    with pytest.raises(SpoolError, match="No space left on device"):
        spool.peek()
    assert spool.corrupt_files == 0 and (tmp_path / DB_NAME).exists()  # the original is kept
    out = drain(spool)  # the disk has room again: the next call rebuilds, then reads
    assert len(calls) == 2 and spool.corrupt_files == 1
    assert out == bodies[: len(out)] and len(out) + spool.corrupt_records == len(bodies)
    spool.append(b"after", gzip=False)
    assert drain(spool) == [b"after"]
    spool.close()
    with pytest.raises(SpoolError, match="closed"):  # closed on purpose stays closed
        spool.append(b"late", gzip=False)


def test_a_reader_that_blocks_the_checkpoint_is_a_spool_error(tmp_path: Path) -> None:
    """The row is durable but would stay in the WAL: append says so; the caller's second
    append makes a duplicate, never a loss."""
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"first", gzip=False)
    wal = tmp_path / f"{DB_NAME}-wal"
    reader = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM records").fetchone() == (1,)
    with pytest.raises(SpoolError, match="cannot checkpoint"):
        spool.append(b"second", gzip=False)
    assert wal.stat().st_size > 0
    reader.execute("COMMIT")
    reader.close()
    spool.append(b"second", gzip=False)  # as the sink does after a SpoolError
    assert wal.stat().st_size == 0
    spool.close()
    assert drain(Spool(tmp_path, max_bytes=10_000)) == [b"first", b"second", b"second"]


def test_set_aside_never_overwrites_and_moves_the_companions(tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite"
    for content in (b"first", b"second", b"third"):
        db.write_bytes(content)
        (tmp_path / "x.sqlite-wal").write_bytes(content + b"-wal")
        aside = set_aside(db)
        assert aside.read_bytes() == content
        assert aside.with_name(aside.name + "-wal").read_bytes() == content + b"-wal"
    assert files(tmp_path) >= {"x.sqlite.corrupt", "x.sqlite.corrupt-wal"}
    later = {p.read_bytes() for p in tmp_path.glob("x.sqlite.*Z-*.corrupt")}
    assert later == {b"second", b"third"} and len(files(tmp_path)) == 6
    # a companion alone (the main file already gone) still moves out of the way
    (tmp_path / "x.sqlite-wal").write_bytes(b"stale")
    moved = set_aside(db)
    assert not db.exists() and moved.with_name(moved.name + "-wal").read_bytes() == b"stale"


def test_a_full_disk_is_a_spool_error_and_earlier_records_still_drain(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    spool.append(b"before" * 100, gzip=False)
    assert spool._conn is not None
    pages = spool._conn.execute("PRAGMA page_count").fetchone()[0]
    # SQLite's own limit: the same SQLITE_FULL "database or disk is full" as ENOSPC
    spool._conn.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(SpoolError, match="database or disk is full") as caught:
        spool.append(b"x" * 50_000, gzip=False)
    assert not isinstance(caught.value, SpoolFull)
    assert len(spool) == 1 and spool.size == 600
    assert drain(spool) == [b"before" * 100]
    spool._conn.execute("PRAGMA max_page_count = 1000000")
    spool.append(b"after", gzip=False)
    assert drain(Spool(tmp_path, max_bytes=10_000_000)) == [b"after"]


def test_an_emptied_large_spool_gives_the_disk_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000_000)
    for i in range(24):
        spool.append(bytes([i]) * 1_000_000, gzip=False)
    assert (tmp_path / DB_NAME).stat().st_size > 24_000_000
    assert len(drain(spool)) == 24
    assert (tmp_path / DB_NAME).stat().st_size < 100_000


def test_corrupt_records_reach_the_metrics(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"garbage" * 1000)
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"a" * 500, gzip=False)
    spool.close()
    db = tmp_path / DB_NAME
    data = bytearray(db.read_bytes())
    data[data.find(b"a" * 500) + 7] ^= 1
    db.write_bytes(bytes(data))
    metrics = Metrics()
    sink = DurableSink(InfluxWriter(Config().influx), Spool(tmp_path, 10_000), metrics)
    assert metrics.value("spool_corrupt_files_total") == 0  # a new process counts its own
    assert sink.drain_once() is False  # the only record is corrupt: nothing to send
    assert metrics.value("spool_corrupt_records_total") == 1
    assert metrics.value("spool_records") == 0


def test_an_old_config_with_segment_bytes_still_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "old.toml"
    old.write_text('[spool]\ndir = "var/spool"\nsegment_bytes = 16777216\n')
    config = load_config(old, environ={})
    assert config.spool.dir == "var/spool"
    assert "spool.segment_bytes is ignored" in caplog.text


def test_a_crash_during_a_rebuild_keeps_the_finished_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.append(b"salvaged", gzip=False)
    spool.close()
    # the crash came after the damaged file was set aside, before the copy was renamed
    (tmp_path / DB_NAME).rename(tmp_path / f"{DB_NAME}.new")
    assert drain(Spool(tmp_path, max_bytes=10_000)) == [b"salvaged"]
    # ... or before the set-aside: the copy is incomplete and is thrown away
    (tmp_path / f"{DB_NAME}.new").write_bytes(b"half a copy")
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert drain(reopened) == [] and reopened.corrupt_files == 0
    assert f"{DB_NAME}.new" not in files(tmp_path)
