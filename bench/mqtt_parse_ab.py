"""MQTT packet parsing, old reader against new, interleaved in one process (issue 11).

    python -m bench.mqtt_parse_ab [--packets 200000] [--rounds 7] [--chunks 65536,1500]

The stream is what the broker sends the consumer: QoS 1 PUBLISHes of ``bench.stream``'s mixed
city stream with packet ids, MQTT 3.1.1 and MQTT 5 (no properties), cut into ``recv``-sized
chunks (64 KiB, as the socket delivers them, and a size that splits most packets). Each round
feeds the whole stream to a fresh reader, old and new alternating, so that both see the same
load; best and median µs per packet are printed with the load average.

``OldPacketReader`` is a frozen copy of ``cityflux.mqtt.codec.PacketReader`` as it was before
issue 11: the baseline here and the reference of tests/unit/test_mqtt_reader_identity.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Protocol

from bench.stream import mixed_stream
from cityflux.errors import MqttProtocolError
from cityflux.mqtt.codec import (
    AUTH,
    CONNACK,
    DEFAULT_MAX_PACKET_SIZE,
    DISCONNECT,
    PACKET_NAMES,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    UNSUBACK,
    V5,
    V311,
    Control,
    PacketReader,
    Parsed,
    publish_packet,
)
from cityflux.mqtt.oversize import OVERSIZE_KEEP, ReadThrough, publish_qos

# -- the frozen reader (cityflux/mqtt/codec.py before issue 11) --------------------------------

_MAX_REMAINING = 268_435_455
_OLD_CONTROLS = {
    V311: {
        CONNACK: (2, 2),
        PUBACK: (2, 2),
        SUBACK: (3, _MAX_REMAINING),
        UNSUBACK: (2, 2),
        PINGRESP: (0, 0),
    },
    V5: {
        CONNACK: (3, _MAX_REMAINING),
        PUBACK: (2, _MAX_REMAINING),
        SUBACK: (4, _MAX_REMAINING),
        UNSUBACK: (4, _MAX_REMAINING),
        PINGRESP: (0, 0),
        DISCONNECT: (0, _MAX_REMAINING),
        AUTH: (0, _MAX_REMAINING),
    },
}


def _old_read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            break
    raise MqttProtocolError("malformed variable byte integer")


def _old_skip_properties(buf: bytes, pos: int, end: int) -> int:
    length, pos = _old_read_varint(buf, pos, end)
    if pos + length > end:
        raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
    return pos + length


class OldPacketReader:
    """``PacketReader`` before issue 11, verbatim but for the names of module helpers."""

    def __init__(
        self,
        version: int,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        oversize_keep: int = OVERSIZE_KEEP,
    ) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self.oversize_keep = max(min(max_packet_size, oversize_keep), 8)
        self.buffered_bytes = 0
        self.oversized = 0
        self.discarded_bytes = 0
        self._partial = bytearray()
        self._through: ReadThrough | None = None

    @property
    def held_bytes(self) -> int:
        through = len(self._through.kept) if self._through is not None else 0
        return len(self._partial) + through

    def feed(self, data: bytes) -> Parsed:
        parsed = Parsed()
        size, pos = len(data), 0
        while pos < size:
            if self._through is not None:
                pos = self._read_through(data, pos, parsed)
            elif self._partial:
                pos = self._complete_partial(data, pos, parsed)
            else:
                pos = self._parse(data, pos, size, parsed)
                if pos < size and self._through is None:
                    self._keep(memoryview(data)[pos:])
                    pos = size
        return parsed

    def _keep(self, piece: memoryview) -> None:
        with piece:
            self._partial += piece
            self.buffered_bytes += len(piece)

    def _complete_partial(self, data: bytes, pos: int, parsed: Parsed) -> int:
        partial, used = self._partial, pos
        header = self._header(partial, 0, len(partial))
        while header is None and used < len(data):
            partial.append(data[used])
            used += 1
            self.buffered_bytes += 1
            header = self._header(partial, 0, len(partial))
        if header is None:
            return len(data)
        length, body = header
        if body + length > self.max_packet_size:
            through = self._start_read_through(partial[0], body, body + length)
            through.take(partial, 0, len(partial))
            partial.clear()
            self._end_read_through(through, parsed)
            return used
        missing = body + length - len(partial)
        if len(data) - used < missing:
            self._keep(memoryview(data)[used:])
            return len(data)
        self._keep(memoryview(data)[used : used + missing])
        packet = bytes(partial)
        partial.clear()
        self._parse(packet, 0, len(packet), parsed)
        return used + missing

    def _header(self, buf: bytes | bytearray, pos: int, size: int) -> tuple[int, int] | None:
        length, shift, i = 0, 0, pos + 1
        while i < size:
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise MqttProtocolError("remaining length not in its shortest encoding")
                return length, i
            shift += 7
            if shift > 21:
                raise MqttProtocolError("remaining length longer than 4 bytes")
        return None

    def _parse(self, buf: bytes, pos: int, size: int, parsed: Parsed) -> int:
        limit, publish = self.max_packet_size, self._publish
        while pos + 1 < size:
            length = buf[pos + 1]
            if length < 0x80:
                i = pos + 2
            elif pos + 2 < size and 0 < buf[pos + 2] < 0x80:
                length, i = (length & 0x7F) | (buf[pos + 2] << 7), pos + 3
            else:
                found = self._header(buf, pos, size)
                if found is None:
                    break
                length, i = found
            end = i + length
            if end - pos > limit:
                self._start_read_through(buf[pos], i - pos, end - pos)
                break
            if end > size:
                break
            first = buf[pos]
            if first >> 4 == PUBLISH:
                publish(buf, first, i, end, parsed)
            else:
                parsed.controls.append(self._control(first, buf, i, end))
            pos = end
        return pos

    def _publish(self, buf: bytes, first: int, i: int, end: int, parsed: Parsed) -> None:
        qos = (first >> 1) & 0x03
        if qos > 1:
            raise MqttProtocolError(f"PUBLISH with QoS {qos}")
        if i + 2 > end:
            raise MqttProtocolError(f"PUBLISH of {end - i} bytes has no topic length")
        p = topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if p > end:
            raise MqttProtocolError("PUBLISH topic runs past the end of the packet")
        if p == i + 2:
            raise MqttProtocolError("PUBLISH with an empty topic")
        packet_id = 0
        if qos:
            packet_id = (buf[p] << 8) | buf[p + 1] if p + 2 <= end else 0
            if not packet_id:
                raise MqttProtocolError("QoS 1 PUBLISH without a packet id (or with id 0)")
            p += 2
        elif first & 0x08:
            raise MqttProtocolError("QoS 0 PUBLISH with the DUP flag")
        if self.version == V5:
            if p < end and buf[p] < 0x80:
                p += 1 + buf[p]
                if p > end:
                    raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
            else:
                p = _old_skip_properties(buf, p, end)
        parsed.topics.append(buf[i + 2 : topic_end].decode("utf-8", "replace"))
        parsed.packet_ids.append(packet_id)
        parsed.payloads.append(buf[p:end])

    def _start_read_through(self, first: int, body: int, total: int) -> ReadThrough:
        if first >> 4 != PUBLISH:
            raise MqttProtocolError(
                f"{PACKET_NAMES[first >> 4]} of {total} bytes exceeds "
                f"mqtt.max_packet_size ({self.max_packet_size})"
            )
        keep = max(self.oversize_keep, body + 2)
        self._through = ReadThrough(total, body, keep, publish_qos(first))
        return self._through

    def _read_through(self, data: bytes, pos: int, parsed: Parsed) -> int:
        through = self._through
        assert through is not None
        count = min(len(data) - pos, through.total - through.seen)
        kept = through.take(data, pos, count)
        self.buffered_bytes += kept
        self.discarded_bytes += count - kept
        self._end_read_through(through, parsed)
        return pos + count

    def _end_read_through(self, through: ReadThrough, parsed: Parsed) -> None:
        if through.seen == through.total:
            self._through = None
            self.oversized += 1
            topic, packet_id, payload = through.message(self.version == V5)
            parsed.topics.append(topic)
            parsed.packet_ids.append(packet_id)
            parsed.payloads.append(payload)

    def _control(self, first: int, buf: bytes, start: int, end: int) -> Control:
        kind, length = first >> 4, end - start
        limits = _OLD_CONTROLS[self.version].get(kind)
        if limits is None:
            raise MqttProtocolError(f"unexpected {PACKET_NAMES[kind]} packet from the broker")
        if first & 0x0F:
            raise MqttProtocolError(f"{PACKET_NAMES[kind]} with reserved flags {first & 0x0F:#x}")
        if not limits[0] <= length <= limits[1]:
            raise MqttProtocolError(f"{PACKET_NAMES[kind]} with a remaining length of {length}")
        return Control(kind, buf[start:end])


# -- the benchmark ----------------------------------------------------------------------------


class Reader(Protocol):
    def feed(self, data: bytes) -> Parsed: ...


def build_stream(packets: int, version: int) -> bytes:
    """QoS 1 PUBLISHes of the mixed city stream, packet ids cycling 1..65535 as a broker's do."""
    messages = mixed_stream(packets)
    return b"".join(
        publish_packet(topic, payload, number % 65_535 + 1, version)
        for number, (topic, payload) in enumerate(messages)
    )


def chunked(stream: bytes, size: int) -> list[bytes]:
    return [stream[at : at + size] for at in range(0, len(stream), size)]


def one_round(make: Callable[[], Reader], chunks: list[bytes], packets: int) -> float:
    """Seconds to feed every chunk to a fresh reader; checks that every packet came out."""
    reader = make()
    got = 0
    gc.disable()  # a collection landing in one side's round is noise, not parsing
    try:
        started = time.perf_counter()
        for chunk in chunks:
            got += len(reader.feed(chunk).topics)
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    if got != packets:
        raise AssertionError(f"{got} packets parsed of {packets}")
    return elapsed


def compare(version: int, chunk_size: int, stream: bytes, packets: int, rounds: int) -> None:
    chunks = chunked(stream, chunk_size)
    sides: dict[str, Callable[[], Reader]] = {
        "old": lambda: OldPacketReader(version),
        "new": lambda: PacketReader(version),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, make in sides.items():
            times[name].append(one_round(make, chunks, packets) / packets * 1e6)
    label = "3.1.1" if version == V311 else "5"
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in sides:
        print(
            f"MQTT {label:5} chunks {chunk_size:6,d} B  {name}: best {best[name]:.3f}  "
            f"median {median[name]:.3f} µs/packet"
        )
    print(
        f"MQTT {label:5} chunks {chunk_size:6,d} B  speed-up: best {best['old'] / best['new']:.2f}x"
        f"  median {median['old'] / median['new']:.2f}x   load {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--chunks", default="65536,1500", help="recv sizes in bytes, comma-separated"
    )
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)"
    )
    for version in (V311, V5):
        stream = build_stream(args.packets, version)
        print(
            f"stream: {args.packets:,} packets, {len(stream) / args.packets:.0f} B each on average"
        )
        for size in (int(text) for text in args.chunks.split(",")):
            compare(version, size, stream, args.packets, args.rounds)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
