"""The disk spool: appends/s and MB/s, the segment files of the previous version vs SQLite.

python -m bench.spool [--seconds 5] [--dir DIR]

Bodies are real line protocol (the mixed bench stream through cityflux's decoder, validator and
encoder), uncompressed as with the shipped ``influx.gzip = false``: 10,000 lines (~1 MB) and
1,000 lines. Each store appends for ``--seconds`` per size (every append durable on return),
then drains what it holds (peek + commit). The directory must be on the disk the spool uses:
on tmpfs fsync is free and the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from bench.stream import mixed_stream
from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.store.influx import InfluxWriter
from cityflux.store.lineprotocol import BatchEncoder
from cityflux.store.spool import Spool


class Store(Protocol):
    def append(self, body: bytes, gzip: bool) -> None: ...

    def peek(self) -> object | None: ...

    def commit(self, record: Any) -> None: ...


# -- the baseline: the segment-file spool as it was (git show 6e7eafa:cityflux/store/spool.py),
# trimmed to what the bench calls
_HEADER: Final = struct.Struct("<IIB")


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    body: bytes
    gzip: bool
    segment: int
    end: int


class SegmentSpool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int) -> None:
        self.directory, self.max_bytes, self.segment_bytes = directory, max_bytes, segment_bytes
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[int] = []
        self._sizes: dict[int, int] = {}
        self._read_offset = 0

    def append(self, body: bytes, gzip: bool) -> None:
        record = _HEADER.pack(len(body), zlib.crc32(body), 1 if gzip else 0) + body
        with self._lock:
            if sum(self._sizes.values()) - self._read_offset + len(record) > self.max_bytes:
                raise RuntimeError("full")
            seq = self._writable_segment(len(record))
            with self._path(seq).open("ab") as handle:
                handle.write(record)
                handle.flush()
                os.fsync(handle.fileno())
            self._sizes[seq] += len(record)

    def _writable_segment(self, size: int) -> int:
        if self._segments and self._sizes[self._segments[-1]] + size <= self.segment_bytes:
            return self._segments[-1]
        seq = (self._segments[-1] + 1) if self._segments else 1
        self._path(seq).touch()
        _fsync_dir(self.directory)
        self._segments.append(seq)
        self._sizes[seq] = 0
        return seq

    def peek(self) -> SegmentRecord | None:
        with self._lock:
            while self._segments:
                seq = self._segments[0]
                with self._path(seq).open("rb") as handle:
                    handle.seek(self._read_offset)
                    header = handle.read(_HEADER.size)
                    if len(header) == _HEADER.size:
                        length, crc, flags = _HEADER.unpack(header)
                        body = handle.read(length)
                        if len(body) == length and zlib.crc32(body) == crc:
                            end = self._read_offset + _HEADER.size + length
                            return SegmentRecord(body, bool(flags & 1), seq, end)
                self._drop_oldest()
            return None

    def commit(self, record: object) -> None:
        assert isinstance(record, SegmentRecord)
        with self._lock:
            self._read_offset = record.end
            if self._read_offset >= self._sizes[record.segment]:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        seq = self._segments.pop(0)
        del self._sizes[seq]
        self._read_offset = 0
        self._path(seq).unlink(missing_ok=True)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.spool"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the measurement ------------------------------------------------------------------------------
def line_bodies(counts: list[int]) -> dict[int, bytes]:
    config = Config()
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    encoder = BatchEncoder()
    writer = InfluxWriter(config.influx)
    stream = mixed_stream(max(counts))
    now = time.time_ns()
    decoded = decoder.decode([t for t, _ in stream], [p for _, p in stream], now)
    lines = [
        line
        for columns in decoded.columns.values()
        for line in encoder.encode(validate(columns, config.ingest, now)[0])
    ]
    return {n: writer.encode_body(lines[:n]) for n in counts}


@dataclass
class Figures:
    appends: int
    append_s: float
    drain_s: float
    size: int

    def row(self, name: str, lines: int) -> str:
        mb = self.appends * self.size / 1e6
        return (
            f"| {name} | {lines:,} | {self.size / 1e6:.2f} | {self.appends / self.append_s:,.0f} "
            f"| {mb / self.append_s:,.1f} | {self.appends / self.drain_s:,.0f} |"
        )


def measure(make: Callable[[Path], Store], root: Path, body: bytes, seconds: float) -> Figures:
    directory = root / "store"
    shutil.rmtree(directory, ignore_errors=True)
    store = make(directory)
    appends, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        store.append(body, False)
        appends += 1
    append_s = time.perf_counter() - start
    start, drained = time.perf_counter(), 0
    while (record := store.peek()) is not None:
        store.commit(record)
        drained += 1
    assert drained == appends, (drained, appends)
    result = Figures(appends, append_s, time.perf_counter() - start, len(body))
    shutil.rmtree(directory, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dir", default=None, help="on the spool's disk (default: a temp dir)")
    args = parser.parse_args()
    bodies = line_bodies([10_000, 1_000])
    stores: dict[str, Callable[[Path], Store]] = {
        "segment files (previous version)": lambda d: SegmentSpool(d, 2**40, 16 * 2**20),
        "SQLite (WAL, synchronous=FULL, checkpoint per append)": lambda d: Spool(d, 2**40),
    }
    print(f"load average before: {os.getloadavg()}")
    print("| store | lines | MB per body | appends/s | MB/s | drained/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for lines, body in bodies.items():
            for name, make in stores.items():
                print(measure(make, Path(tmp), body, args.seconds).row(name, lines), flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
