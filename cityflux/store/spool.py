"""An append-only, fsynced, size-capped disk spool of write bodies, drained in order.

Layout: a directory of segment files ``000000000001.spool`` ... Each record is a 9-byte header
(``<IIB``: body length, CRC-32 of the body, flags) and the body (a line-protocol request body,
gzip-compressed when flag bit 0 is set). ``append`` returns only after ``fsync``: the MQTT
acknowledgement that follows it is then safe against a power cut.

Draining re-reads the oldest segment from its start after a restart, so a record may be written
to InfluxDB twice; that is harmless, because a point with the same series and timestamp
overwrites itself with the same values. A torn record at the tail (a crash during ``append``)
fails its CRC, is counted and skipped: it was never acknowledged, so the broker redelivers it.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cityflux.errors import SpoolError, SpoolFull

_HEADER: Final = struct.Struct("<IIB")
_SUFFIX: Final = ".spool"
FLAG_GZIP: Final = 1


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    body: bytes
    gzip: bool
    segment: int
    end: int  # offset just past this record in its segment


class Spool:
    """Thread-safe: the ingest thread appends while the drain thread reads and commits."""

    def __init__(self, directory: str | Path, max_bytes: int, segment_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.corrupt_records = 0
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.directory}: {exc}") from exc
        self._segments = sorted(int(p.stem) for p in self.directory.glob(f"*{_SUFFIX}"))
        self._sizes = {seq: self._path(seq).stat().st_size for seq in self._segments}
        self._read_offset = 0  # in the oldest segment
        self.records = sum(self._count(seq) for seq in self._segments)

    # -- state ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes not yet drained."""
        with self._lock:
            return sum(self._sizes.values()) - self._read_offset

    def __len__(self) -> int:
        return self.records

    @property
    def empty(self) -> bool:
        return self.records == 0

    # -- writing ----------------------------------------------------------------------------
    def append(self, body: bytes, gzip: bool) -> None:
        """Durably append one body; raises SpoolFull when the cap would be exceeded."""
        record = _HEADER.pack(len(body), zlib.crc32(body), FLAG_GZIP if gzip else 0) + body
        with self._lock:
            used = sum(self._sizes.values()) - self._read_offset
            if used + len(record) > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.directory} holds {used} bytes; cap is {self.max_bytes}"
                )
            seq = self._writable_segment(len(record))
            try:
                with self._path(seq).open("ab") as handle:
                    handle.write(record)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise SpoolError(f"cannot append to spool: {exc}") from exc
            self._sizes[seq] += len(record)
            self.records += 1

    def _writable_segment(self, size: int) -> int:
        if self._segments and self._sizes[self._segments[-1]] + size <= self.segment_bytes:
            return self._segments[-1]
        seq = (self._segments[-1] + 1) if self._segments else 1
        self._path(seq).touch()
        _fsync_dir(self.directory)  # the new file's name must survive a crash too
        self._segments.append(seq)
        self._sizes[seq] = 0
        return seq

    # -- draining ---------------------------------------------------------------------------
    def peek(self) -> SpoolRecord | None:
        """The oldest record not yet committed, or None."""
        with self._lock:
            while self._segments:
                seq = self._segments[0]
                record = self._read_at(seq, self._read_offset)
                if record is not None:
                    return record
                if self._read_offset < self._sizes[seq]:  # torn tail: skip it
                    self.corrupt_records += 1
                    self.records = max(0, self.records - 1)
                self._drop_oldest()
            return None

    def commit(self, record: SpoolRecord) -> None:
        """The record was written to the database: forget it."""
        with self._lock:
            if not self._segments or self._segments[0] != record.segment:
                raise SpoolError("commit of a record that is not the oldest")
            self._read_offset = record.end
            self.records -= 1
            if self._read_offset >= self._sizes[record.segment]:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        seq = self._segments.pop(0)
        del self._sizes[seq]
        self._read_offset = 0
        self._path(seq).unlink(missing_ok=True)

    def _read_at(self, seq: int, offset: int) -> SpoolRecord | None:
        with self._path(seq).open("rb") as handle:
            handle.seek(offset)
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return None
            length, crc, flags = _HEADER.unpack(header)
            body = handle.read(length)
        if len(body) < length or zlib.crc32(body) != crc:
            return None
        return SpoolRecord(body, bool(flags & FLAG_GZIP), seq, offset + _HEADER.size + length)

    def _count(self, seq: int) -> int:
        count, offset = 0, 0
        while (record := self._read_at(seq, offset)) is not None:
            count += 1
            offset = record.end
        return count

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
