"""The SQLite side of the spool (cityflux/store/spool.py): the schema, connections, error
translation, checks of a row, salvage of a damaged file, and file permissions."""

from __future__ import annotations

import logging
import sqlite3
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cityflux.errors import SpoolError
from cityflux.files import private_sqlite_file

log = logging.getLogger("cityflux.store.spool")

DB_NAME: Final = "spool.sqlite3"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    gzip INTEGER NOT NULL,
    length INTEGER NOT NULL,
    crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY,
    id INTEGER, body BLOB, gzip INTEGER, length INTEGER, crc INTEGER,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
COLUMNS: Final = "id, body, gzip, length, crc"
_CORRUPTION: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
# PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN: the machine, not the file
_ENVIRONMENTAL: Final = frozenset({3, 5, 6, 7, 8, 10, 13, 14})
MARKER: Final = DB_NAME + ".created"
_OLD_HEADER: Final = struct.Struct("<IIB")  # the segment-file spool: length, CRC-32, flags
_MAX_PROBES: Final = 1_000_000  # ids looked up one by one in a damaged file
# How long a statement waits for another connection's lock (SQLite's busy handler), and how
# many times a checkpoint that another reader blocked is tried before it is an error.
BUSY_TIMEOUT_S: Final = 1.0
_CHECKPOINT_ATTEMPTS: Final = 3

Row = tuple[Any, ...]  # (id, body, gzip, length, crc) as read: a damaged row may hold anything


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    body: bytes
    gzip: bool
    id: int


def record_crc(record_id: int, gzip: bool, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(struct.pack("<qB", record_id, gzip)))


# -- SQLite helpers ----------------------------------------------------------------------------
SIZE_PRAGMAS: Final = ("page_size", "page_count")
_SHRINK_BYTES: Final = 16 * 1024 * 1024


def connect(path: Path) -> sqlite3.Connection:
    private_sqlite_file(path)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        if mode != "wal":
            raise SpoolError(f"spool {path}: SQLite refused WAL mode ({mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cell_size_check=ON")  # find damaged pages early
        conn.executescript(_SCHEMA)
    except BaseException:
        close_quietly(conn)
        raise
    return conn


# what reading a damaged file raises: SQLite's errors, and a flipped bit in the schema's text,
# which SQLite quotes in its error message and Python then fails to decode
UNREADABLE: Final = (sqlite3.Error, UnicodeDecodeError)


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """fetchall: a statement left open would hold a read lock and block the checkpoint."""
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        _rollback(conn)
        raise


def checkpoint(conn: sqlite3.Connection, path: Path) -> None:
    """Move the whole WAL into the database file and truncate it; SpoolError if another
    connection (a reader of the file: an operator's ``sqlite3``, a backup) keeps it from that.

    SQLite reports that in the result row (busy, frames in the log, frames moved), not as an
    error: unchecked, acknowledged rows would stay in the WAL, where one flipped bit drops
    every later transaction (cityflux/store/spool.py)."""
    for attempt in range(_CHECKPOINT_ATTEMPTS):
        # each try already waits up to BUSY_TIMEOUT_S in SQLite's busy handler
        busy, frames, moved = fetch_all(conn, "PRAGMA wal_checkpoint(TRUNCATE)")[0]
        if not busy:
            return
        time.sleep(0.05 * (attempt + 1))
    raise SpoolError(
        f"spool {path}: cannot checkpoint the WAL ({moved} of {frames} frames moved): another "
        "connection is reading the file; close it"
    )


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.rollback()
    except sqlite3.Error as exc:  # the error that got us here is the one to report
        log.debug("rollback failed: %s", exc)


@contextmanager
def translated(what: str, path: Path) -> Iterator[None]:
    """Every SQLite or OS error becomes a SpoolError (ENOSPC, "database or disk is full")."""
    try:
        yield
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot {what} ({path}): {exc}") from exc
    except OSError as exc:
        raise SpoolError(f"cannot {what} ({path}): {exc}") from exc


def is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _CORRUPTION


def is_environmental(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _ENVIRONMENTAL


def quick_check(conn: sqlite3.Connection) -> list[str]:
    rows = fetch_all(conn, "PRAGMA quick_check")
    return [] if [r[0] for r in rows] == ["ok"] else [str(r[0]) for r in rows]


def verified_record(row: Row) -> tuple[SpoolRecord | None, str]:
    record_id, body, gzip, length, crc = row
    if not isinstance(body, bytes) or gzip not in (0, 1) or not isinstance(crc, int):
        return None, "malformed row"
    if length != len(body):
        return None, f"length {length} but {len(body)} bytes"
    if record_crc(record_id, bool(gzip), body) != crc:
        return None, "CRC mismatch"
    return SpoolRecord(body, bool(gzip), record_id), ""


def row_length(row: Row) -> int:
    return row[3] if isinstance(row[3], int) else 0


def mark_id(conn: sqlite3.Connection, key: str, record_id: int) -> None:
    """Keep the highest id under ``key`` ('appended', 'drained'): a salvage counts what it
    cannot read between the two."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        (key, record_id),
    )


def mark_drained(conn: sqlite3.Connection, record_id: int) -> None:
    """The highest id gone from the front, in the meta table and (a second copy on another
    page) the header's 32-bit user_version."""
    mark_id(conn, "drained", record_id)
    conn.execute(f"PRAGMA user_version = {min(int(record_id), 2**31 - 1)}")


def drained_id(conn: sqlite3.Connection) -> int:
    rows = fetch_all(conn, "SELECT value FROM meta WHERE key = 'drained'")
    return int(rows[0][0]) if rows and isinstance(rows[0][0], int) else 0


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error as exc:
        log.debug("close failed: %s", exc)


# -- salvage of a damaged file ------------------------------------------------------------------
@dataclass(slots=True)
class _Outcome:
    salvaged: int = 0
    quarantined: int = 0
    lost: int = 0
    counted: bool = True  # False: the file no longer says which ids it held


class Salvage:
    """Copy every row SQLite can still read from a damaged file into a fresh one.

    A scan from the front stops at the first unreadable page; a scan from the back and then a
    lookup of each id still missing reach the rows behind it. Ids between the last drained one
    and the highest ever given that cannot be read are lost: counted, and recorded in the new
    file's quarantine table (body NULL) so a later salvage does not count them again.
    """

    def __init__(self, source: Path, target: sqlite3.Connection) -> None:
        self.source = source
        self.target = target
        self.found: set[int] = set()
        self.outcome = _Outcome()

    def run(self) -> _Outcome:
        try:
            conn = sqlite3.connect(self.source, isolation_level=None)
        except sqlite3.Error:
            self.outcome.counted = False
            return self.outcome
        # text in a damaged file need not be UTF-8 (a flipped bit): read it, never raise on it
        conn.text_factory = _lenient_text
        try:
            self._copy(conn)
        finally:
            close_quietly(conn)
        return self.outcome

    def _copy(self, conn: sqlite3.Connection) -> None:
        self.target.execute("BEGIN IMMEDIATE")
        complete = self._scan(conn, f"SELECT {COLUMNS} FROM records ORDER BY id")
        if not complete:
            self._scan(conn, f"SELECT {COLUMNS} FROM records ORDER BY id DESC")
        known_gone = self._copy_quarantine(conn)
        bounds = self._id_range(conn)
        if bounds is None:
            self.outcome.counted = False
        else:
            first, last = bounds
            gone = self.found | known_gone
            missing = [i for i in range(first, last + 1) if i not in gone]
            if not complete and len(missing) <= _MAX_PROBES:
                for record_id in missing:
                    self._scan(conn, f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,))
            self._record_lost([i for i in missing if i not in self.found])
        self.target.execute("COMMIT")

    def _scan(self, conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> bool:
        """Copy rows until the first error; False if the scan did not reach its end."""
        try:
            for row in conn.execute(sql, params):
                if row[0] in self.found:
                    return True  # the backward scan met the forward one
                self._add(row)
        except UNREADABLE:
            return False
        return True

    def _add(self, row: Row) -> None:
        self.found.add(row[0])
        record, reason = verified_record(row)
        if record is None:
            self._quarantine(row, reason)
            return
        self.target.execute(
            f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            (record.id, record.body, int(record.gzip), len(record.body), row[4]),
        )
        self.outcome.salvaged += 1

    def _quarantine(self, row: Row, reason: str) -> None:
        body = row[1] if isinstance(row[1], bytes) else None
        values = (row[0], body, row[2], row[3], row[4], f"{reason} (salvage)", time.time())
        self.target.execute(
            "INSERT INTO quarantine (id, body, gzip, length, crc, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            tuple(v if isinstance(v, int | bytes | str | float) else None for v in values),
        )
        self.outcome.quarantined += 1

    def _copy_quarantine(self, conn: sqlite3.Connection) -> set[int]:
        """Rows quarantined (or recorded as lost) before: copied, and not counted again."""
        ids: set[int] = set()
        try:
            for row in conn.execute(
                "SELECT id, body, gzip, length, crc, reason, at FROM quarantine ORDER BY qid"
            ):
                self.target.execute(
                    "INSERT INTO quarantine (id, body, gzip, length, crc, reason, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                if isinstance(row[0], int):
                    ids.add(row[0])
        except UNREADABLE as exc:
            log.error("spool salvage: part of the quarantine table is unreadable: %s", exc)
        return ids

    def _id_range(self, conn: sqlite3.Connection) -> tuple[int, int] | None:
        """From just past the last drained id to the highest id ever given; None if the file
        no longer says (then what was lost cannot be counted).

        Each bound is kept twice, on different pages, so that one damaged page leaves one:
        the drained id in the meta table and the header's user_version, the highest id in
        sqlite_sequence and the meta table. Where the two disagree the wider range wins: a
        record counted lost that was drained is a false alarm, the other way round a silent
        loss."""
        tops = [
            _try_int(conn, "SELECT seq FROM sqlite_sequence WHERE name = 'records'"),
            _try_int(conn, "SELECT value FROM meta WHERE key = 'appended'"),
        ]
        top_found = max(self.found, default=0)
        known_tops = [t for t in tops if t is not None and 0 <= t <= top_found + _MAX_PROBES]
        # no row: nothing drained yet (0); an unreadable table: unknown (None)
        drains = [
            _try_int(conn, "SELECT coalesce(max(value), 0) FROM meta WHERE key = 'drained'"),
            _try_int(conn, "PRAGMA user_version"),
        ]
        if not known_tops:
            return None
        top = max(top_found, *known_tops)
        known_drains = [d for d in drains if d is not None and 0 <= d <= top]
        if not known_drains:
            return None
        drained = min(known_drains)
        mark_drained(self.target, drained)
        return min(drained + 1, *self.found, top + 1), top

    def _record_lost(self, ids: list[int]) -> None:
        for record_id in ids:
            self.target.execute(
                "INSERT INTO quarantine (id, body, reason, at) VALUES (?, NULL, ?, ?)",
                (record_id, f"unreadable in the damaged file {self.source.name}", time.time()),
            )
        self.outcome.lost = len(ids)


def _try_int(conn: sqlite3.Connection, sql: str) -> int | None:
    try:
        rows = conn.execute(sql).fetchall()
    except UNREADABLE:
        return None
    return int(rows[0][0]) if rows and isinstance(rows[0][0], int) else None


# -- files -----------------------------------------------------------------------------------
def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


@dataclass(slots=True)
class Segment:
    """What a segment file of the previous version still holds."""

    bodies: list[tuple[bytes, bool]]
    damaged_spans: int = 0  # runs of bytes that are not a whole record: each lost one or more
    damaged_bytes: int = 0


def read_segment(path: Path) -> Segment:
    """Every whole record of a segment file of the previous version (``<IIB`` length, CRC-32
    of the body, flags; then the body), also those behind a torn or damaged one: they may have
    been acknowledged. Past a bad record the scan moves on byte by byte to the next header that
    fits the bytes left and whose body matches its CRC (computed only when the length fits, so
    a damaged span costs little more than its length)."""
    data = memoryview(path.read_bytes())
    found = Segment([])
    offset, damage_from = 0, -1
    while offset < len(data):
        record = _old_record(data, offset)
        if record is None:
            damage_from = offset if damage_from < 0 else damage_from
            offset += 1
            continue
        if damage_from >= 0:
            found.damaged_spans += 1
            found.damaged_bytes += offset - damage_from
            damage_from = -1
        body, gzip = record
        found.bodies.append((body, gzip))
        offset += _OLD_HEADER.size + len(body)
    if damage_from >= 0:
        found.damaged_spans += 1
        found.damaged_bytes += len(data) - damage_from
    return found


def _old_record(data: memoryview, offset: int) -> tuple[bytes, bool] | None:
    start = offset + _OLD_HEADER.size
    if start > len(data):
        return None
    length, crc, flags = _OLD_HEADER.unpack_from(data, offset)
    # the old writer never wrote an empty body or other flags: a run of zeros (a torn write
    # on many file systems) is not a stream of empty records
    if length == 0 or length > len(data) - start or flags > 1:
        return None
    body = data[start : start + length]
    if zlib.crc32(body) != crc:
        return None
    return bytes(body), bool(flags)
