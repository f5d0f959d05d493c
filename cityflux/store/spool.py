"""A size-capped disk spool of write bodies in SQLite, drained in order.

One row per write body in ``spool.sqlite3`` (stdlib ``sqlite3``, WAL journal,
``synchronous=FULL``). ``append`` returns only after the row is committed, fsynced and
checkpointed into the database file: the MQTT acknowledgement that follows it is then safe
against a power cut, and at rest the write-ahead log is empty. That last step matters: SQLite
stops replaying its WAL at the first frame whose checksum fails, so one flipped bit in a WAL
holding acknowledged frames would silently drop every later transaction. In the database file
a flipped bit damages one page, which the checks below find.

SQLite does not checksum pages, so every row carries a CRC-32 of (id, gzip flag, body): a row
that fails it is moved to the ``quarantine`` table (kept for inspection), counted in
:attr:`Spool.corrupt_records` and logged, never dropped silently. At start the file is
``PRAGMA quick_check``-ed; a damaged or unreadable file is salvaged row by row into a fresh one
and set aside as ``spool.sqlite3.corrupt`` (cityflux/files.py: ``set_aside``; docs/operations.md,
"The spool"). A rebuild that fails (a full disk) leaves the original in place and is tried
again by the next call: the spool is never left shut.

Draining is at-least-once: a record written to the database but not yet committed here is sent
again after a restart; harmless, because a point with the same series and timestamp overwrites
itself with the same values.

The SQLite details (schema, salvage, permissions) are in cityflux/store/spool_db.py.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from cityflux.errors import SpoolError, SpoolFull
from cityflux.files import fsync_directory, private_directory, set_aside
from cityflux.store.spool_db import (
    COLUMNS,
    DB_NAME,
    MARKER,
    SIZE_PRAGMAS,
    Row,
    Salvage,
    SpoolRecord,
    checkpoint,
    close_quietly,
    connect,
    drained_id,
    fetch_all,
    is_corruption,
    is_environmental,
    mark_drained,
    mark_id,
    quick_check,
    read_segment,
    record_crc,
    remove_database,
    row_length,
    transaction,
    translated,
    verified_record,
)

__all__ = ["DB_NAME", "Spool", "SpoolRecord", "record_crc"]

log = logging.getLogger(__name__)

_OLD_SEGMENT: Final = re.compile(r"\d{12}\.spool")
T = TypeVar("T")


class Spool:
    """Thread-safe: the ingest thread appends while the drain thread reads and commits."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.max_bytes = max_bytes
        self.corrupt_records = 0  # rows quarantined + rows known lost in a damaged file
        self.corrupt_files = 0  # database files set aside as *.corrupt
        self.uncounted_files = 0  # ... of which the losses could not be counted
        self.records = 0
        self._bytes = 0
        self._next_id = 1
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None  # None: reopened by the next call
        self._closed = False
        with self._lock, translated("open the spool", self.path):
            private_directory(self.directory)
            self._open()
            self._import_segments()
            self._warn_about_strays()

    # -- state ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes not yet drained (bodies; SQLite's own overhead is not counted)."""
        return self._bytes

    def __len__(self) -> int:
        return self.records

    @property
    def empty(self) -> bool:
        return self.records == 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- writing ----------------------------------------------------------------------------
    def append(self, body: bytes, gzip: bool) -> None:
        """Durably append one body. Raises SpoolFull at the cap, SpoolError on any disk or
        SQLite error (ENOSPC, "database or disk is full", I/O error)."""
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.path} holds {self._bytes} bytes; cap is {self.max_bytes}"
                )
            self._retry_if_corrupt("append to the spool", lambda: self._insert(body, gzip))

    def _insert(self, body: bytes, gzip: bool) -> None:
        conn = self._connection()
        record_id = self._next_id
        row = (record_id, body, int(gzip), len(body), record_crc(record_id, gzip, body))
        with transaction(conn):
            conn.execute(f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?)", row)
            mark_id(conn, "appended", record_id)
        # committed and fsynced (synchronous=FULL): durable from here on, so count it even if
        # the checkpoint below fails
        self._next_id += 1
        self.records += 1
        self._bytes += len(body)
        # If this fails (another reader holds the file), append raises although the row is
        # durable, and the caller appends the body again: a duplicate, harmless because InfluxDB
        # overwrites a point with the same series and timestamp with the same values.
        checkpoint(conn, self.path)

    # -- draining ---------------------------------------------------------------------------
    def peek(self) -> SpoolRecord | None:
        """The oldest record not yet committed, or None. Corrupt rows are quarantined."""
        with self._lock:
            return self._retry_if_corrupt("read the spool", self._oldest)

    def _oldest(self) -> SpoolRecord | None:
        conn = self._connection()
        while True:
            rows = fetch_all(conn, f"SELECT {COLUMNS} FROM records ORDER BY id LIMIT 1")
            if not rows:
                return None
            record, reason = verified_record(rows[0])
            if record is not None:
                return record
            self._quarantine(rows[0], reason)

    def _quarantine(self, row: Row, reason: str) -> None:
        conn = self._connection()
        with transaction(conn):
            conn.execute(
                "INSERT INTO quarantine (id, body, gzip, length, crc, reason, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row, reason, time.time()),
            )
            conn.execute("DELETE FROM records WHERE id = ?", (row[0],))
            mark_drained(conn, row[0])
        self.corrupt_records += 1
        self.records = max(0, self.records - 1)
        self._bytes = max(0, self._bytes - row_length(row))
        log.error(
            "spool %s: record %s is corrupt (%s): moved to the quarantine table, not sent",
            self.path,
            row[0],
            reason,
        )

    def commit(self, record: SpoolRecord) -> None:
        """The record was written to the database: forget it (idempotent)."""
        with self._lock:
            self._retry_if_corrupt("commit a spool record", lambda: self._delete(record))

    def _delete(self, record: SpoolRecord) -> None:
        conn = self._connection()
        # fsynced like an append (synchronous=FULL), not switched to NORMAL and back per record:
        # measured (bench/spool.py bodies) that costs ~0.3 ms per drained record (1,000-line
        # bodies ~1,370/s instead of ~2,160/s), still 20x the ~65 such bodies/s InfluxDB takes;
        # and a committed record stays committed through a power cut (no resend).
        with transaction(conn):
            deleted = conn.execute("DELETE FROM records WHERE id = ?", (record.id,)).rowcount
            mark_drained(conn, record.id)
        if deleted:
            self.records = max(0, self.records - 1)
            self._bytes = max(0, self._bytes - len(record.body))
        if self.records == 0:
            self._shrink()

    def _shrink(self) -> None:
        """Give the disk back after an outage: an emptied file keeps its size otherwise."""
        conn = self._connection()
        page_size, pages = (int(fetch_all(conn, f"PRAGMA {p}")[0][0]) for p in SIZE_PRAGMAS)
        if page_size * pages < 16 * 1024 * 1024:
            return
        try:
            fetch_all(conn, "VACUUM")
            checkpoint(conn, self.path)
        except (sqlite3.Error, SpoolError) as exc:  # only disk space is at stake: go on
            log.warning("spool %s: VACUUM of the empty spool failed: %s", self.path, exc)

    # -- opening and recovery -------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        """The open connection; after a failed rebuild or reopen (a full disk, no permission)
        each call tries again, so the spool works once the cause is gone, never stays shut."""
        if self._conn is None:
            if self._closed:
                raise SpoolError(f"spool {self.path} is closed")
            log.warning("spool %s: reopening after an earlier failure", self.path)
            self._open()
        assert self._conn is not None  # _open sets it or raises
        return self._conn

    def _retry_if_corrupt(self, what: str, action: Callable[[], T]) -> T:
        """Run ``action``; if SQLite finds the file damaged, rebuild it and run it once more."""
        with translated(what, self.path):
            try:
                return action()
            except sqlite3.DatabaseError as exc:
                if not is_corruption(exc):
                    raise
                self._rebuild([str(exc)])
                self._load_state()
            return action()

    def _open(self) -> None:
        self._finish_interrupted_rebuild()
        marker = self.path.with_name(MARKER)
        existed = self.path.exists() and self.path.stat().st_size > 0
        problems: list[str] = []
        if marker.exists() and (not existed or self.path.stat().st_size < 100):
            problems = ["the database file is missing or shorter than its header"]
        else:
            try:
                self._conn = connect(self.path)
                if existed:
                    problems = quick_check(self._conn)
            except sqlite3.DatabaseError as exc:
                if is_environmental(exc):  # a full disk, no permission: not damage
                    raise
                problems = [str(exc)]
            except UnicodeDecodeError as exc:  # a flipped bit in the schema's text (found by
                # tests/adversarial/test_spool_torn.py): damage too, not a crash at start-up
                if self._conn is not None:
                    close_quietly(self._conn)
                    self._conn = None
                problems = [f"unreadable text in the file: {exc}"]
        if problems:
            self._rebuild(problems)
        if not marker.exists():  # from now on an empty or missing file means damage
            marker.touch(0o600)
            fsync_directory(self.directory)
        self._load_state()

    def _load_state(self) -> None:
        conn = self._connection()
        count, total, top = fetch_all(
            conn, "SELECT count(*), coalesce(sum(length), 0), coalesce(max(id), 0) FROM records"
        )[0]
        seq = fetch_all(conn, "SELECT coalesce(max(seq), 0) FROM sqlite_sequence")[0][0]
        quarantined = fetch_all(conn, "SELECT coalesce(max(id), 0) FROM quarantine")[0][0]
        self.records, self._bytes = int(count), int(total)
        # never reuse an id, even if the sequence row itself was damaged
        self._next_id = max(int(top), int(seq), int(quarantined), drained_id(conn)) + 1

    def _rebuild(self, problems: list[str]) -> None:
        """Salvage what SQLite can read into a fresh file; set the damaged one aside."""
        log.error(
            "spool %s is damaged (%s): salvaging its records into a new file",
            self.path,
            "; ".join(problems[:5]),
        )
        if self._conn is not None:
            close_quietly(self._conn)
            self._conn = None
        fresh = self.path.with_name(DB_NAME + ".new")
        # From here a failure (ENOSPC, EACCES) leaves _conn None: the next call reopens,
        # which finishes or restarts this rebuild (_finish_interrupted_rebuild, quick_check).
        remove_database(fresh)
        target = connect(fresh)
        try:
            outcome = Salvage(self.path, target).run()
            checkpoint(target, fresh)
        finally:
            target.close()
        aside = set_aside(self.path)
        os.replace(fresh, self.path)
        fsync_directory(self.directory)
        self.corrupt_files += 1
        self.uncounted_files += 0 if outcome.counted else 1
        self.corrupt_records += outcome.quarantined + outcome.lost
        log.error(
            "spool: salvaged %d records; %d failed their CRC (quarantined), %d were unreadable%s;"
            " the damaged file is kept as %s",
            outcome.salvaged,
            outcome.quarantined,
            outcome.lost,
            "" if outcome.counted else " (the file no longer says how many it held)",
            aside,
        )
        self._conn = connect(self.path)

    def _finish_interrupted_rebuild(self) -> None:
        """A crash during :meth:`_rebuild`: the finished copy replaces a set-aside original;
        a copy next to the original is incomplete, and the rebuild starts over."""
        fresh = self.path.with_name(DB_NAME + ".new")
        if not fresh.exists():
            return
        if self.path.exists():
            remove_database(fresh)
        else:
            os.replace(fresh, self.path)
            fsync_directory(self.directory)

    # -- the segment files of the previous version -------------------------------------------
    def _import_segments(self) -> None:
        """Records of the segment-file spool may be acknowledged: import them, then remove the
        segments (a segment with unreadable bytes is kept as ``*.spool.corrupt``)."""
        segments = sorted(
            (p for p in self.directory.iterdir() if _OLD_SEGMENT.fullmatch(p.name)),
            key=lambda p: int(p.stem),
        )
        for segment in segments:
            found = read_segment(segment)
            for body, gzip in found.bodies:
                self._insert(body, gzip)
            if found.damaged_spans:
                # each damaged span held at least one record: counted as one, a lower bound
                self.corrupt_records += found.damaged_spans
                aside = set_aside(segment, companions=())
                log.error(
                    "spool: %s has %d damaged spans (%d bytes) besides %d whole records, which"
                    " were imported; kept as %s",
                    segment,
                    found.damaged_spans,
                    found.damaged_bytes,
                    len(found.bodies),
                    aside,
                )
            else:
                segment.unlink()
                fsync_directory(self.directory)
            log.warning("spool: imported %d records from %s", len(found.bodies), segment)

    def _warn_about_strays(self) -> None:
        ours = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", MARKER}
        strays = [
            p.name
            for p in self.directory.iterdir()
            if p.name not in ours and not p.name.endswith(("corrupt", "corrupt-wal", "corrupt-shm"))
        ]
        if strays:
            log.warning(
                "spool %s: ignoring files that are not the spool's: %s", self.directory, strays
            )
