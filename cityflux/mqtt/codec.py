"""The few MQTT 3.1.1 / 5.0 packets the consumer needs, encoded and parsed in bulk.

Why not paho for receiving (docs/performance.md has the figures): paho reads each packet with
several ``recv`` calls and builds an ``MQTTMessage`` with a callback per message, and each
manual ``ack`` wakes its network thread through a socket pair. That costs more per message than
all of cityflux's decoding and validation together. Here one ``recv`` of up to 256 KiB is parsed
in one tight loop into three lists, and a batch's PUBACKs go out in one ``sendall``.

The broker is not trusted to be correct: every length is checked against the end of its packet,
and anything malformed or forbidden raises :class:`MqttProtocolError` (an ``MqttError``), on
which the consumer drops the connection and reconnects; nothing else escapes :meth:`feed`.

A PUBLISH over ``mqtt.max_packet_size`` is read through, never buffered whole, into a message
the decoder dead-letters as ``too_large`` (:mod:`cityflux.mqtt.oversize` says why); any
other packet over the limit is an error.

Specifications: MQTT 3.1.1 (OASIS, 2014) sections 2-3; MQTT 5.0 (OASIS, 2019) sections 2-3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from cityflux.errors import MqttProtocolError
from cityflux.mqtt.oversize import OVERSIZE_KEEP, ReadThrough, publish_qos

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT, AUTH = 12, 13, 14, 15
PACKET_NAMES: Final = (
    "reserved-type-0",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
)
PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"
_PUBACK_HEADER: Final = b"\x40\x02"
_MAX_REMAINING: Final = 268_435_455
# a packet's first byte, two remaining-length bytes and (if the length has two) the topic length
_HEADER: Final = struct.Struct("!BBBH").unpack_from
_UINT16: Final = struct.Struct("!H").unpack_from
DEFAULT_MAX_PACKET_SIZE: Final = 1_048_576  # mqtt.max_packet_size
V311, V5 = 4, 5

# Packets a server may send us, with the remaining lengths they may have: (minimum, maximum).
# PUBREC/PUBREL/PUBCOMP belong to QoS 2, which we never use; CONNECT, SUBSCRIBE... to clients.
_CONTROLS: Final = {
    V311: {
        CONNACK: (2, 2),
        PUBACK: (2, 2),
        SUBACK: (3, _MAX_REMAINING),
        UNSUBACK: (2, 2),
        PINGRESP: (0, 0),
    },
    V5: {
        CONNACK: (3, _MAX_REMAINING),  # flags, reason code, property length
        PUBACK: (2, _MAX_REMAINING),  # reason code and properties may be omitted
        SUBACK: (4, _MAX_REMAINING),  # packet id, property length, one reason code
        UNSUBACK: (4, _MAX_REMAINING),
        PINGRESP: (0, 0),
        DISCONNECT: (0, _MAX_REMAINING),
        AUTH: (0, _MAX_REMAINING),
    },
}


def varint(value: int) -> bytes:
    """MQTT variable byte integer."""
    if not 0 <= value <= _MAX_REMAINING:
        raise ValueError(f"{value} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    client_id: str
    version: int = V311
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    session_expiry_s: int = 0  # MQTT 5
    receive_maximum: int = 65_535  # MQTT 5
    clean: bool = False  # False: a persistent session (the consumer); publishers need none
    will_topic: str | None = None  # the last will, sent QoS 1 and retained
    will_payload: bytes = b""
    # MQTT 5 Maximum Packet Size: the broker then sends nothing larger, but drops it unseen
    # (mosquitto 2.0 counts no such drop). None: not sent (the default of the consumer).
    max_packet_size: int | None = DEFAULT_MAX_PACKET_SIZE


def connect_packet(options: ConnectOptions) -> bytes:
    """CONNECT (MQTT 3.1.1 section 3.1; MQTT 5 section 3.1)."""
    flags = 0x02 if options.clean else 0
    payload = _string(options.client_id)
    if options.will_topic is not None:
        flags |= 0x04 | 0x08 | 0x20  # will flag, will QoS 1, will retain
        if options.version == V5:
            payload += b"\x00"  # no will properties
        payload += _string(options.will_topic) + _string(options.will_payload)
    if options.username is not None:
        flags |= 0x80
        payload += _string(options.username)
        if options.password is not None:
            flags |= 0x40
            payload += _string(options.password)
    body = (
        _string("MQTT") + bytes([options.version, flags]) + struct.pack("!H", options.keepalive_s)
    )
    if options.version == V5:
        properties = (
            b"\x11"
            + struct.pack("!I", options.session_expiry_s)
            + b"\x21"
            + struct.pack("!H", options.receive_maximum)
        )
        if options.max_packet_size is not None:
            properties += b"\x27" + struct.pack("!I", options.max_packet_size)
        body += varint(len(properties)) + properties
    return _packet(CONNECT << 4, body + payload)


def subscribe_packet(packet_id: int, topic: str, qos: int, version: int) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += b"\x00"  # no properties
    return _packet((SUBSCRIBE << 4) | 0x02, body + _string(topic) + bytes([qos]))


def publish_packet(
    topic: str, payload: bytes, packet_id: int, version: int, retain: bool = False
) -> bytes:
    """PUBLISH at QoS 1 (``packet_id`` > 0) or QoS 0 (``packet_id`` == 0)."""
    first = (PUBLISH << 4) | (0x02 if packet_id else 0) | (0x01 if retain else 0)
    body = _string(topic) + (packet_id.to_bytes(2, "big") if packet_id else b"")
    if version == V5:
        body += b"\x00"  # no properties
    return _packet(first, body + payload)


def puback_packets(packet_ids: list[int]) -> bytes:
    """PUBACKs for many messages at once (reason code 0 may be omitted in MQTT 5 too), the
    identifiers other than 0 (QoS 0: nothing to acknowledge); four bytes each, laid out by
    numpy rather than one ``bytes`` concatenation per message."""
    ids = np.array(packet_ids, dtype=np.uint16)
    ids = ids[ids != 0]
    packets = np.empty((len(ids), 4), dtype=np.uint8)
    packets[:, :2] = np.frombuffer(_PUBACK_HEADER, dtype=np.uint8)
    packets[:, 2:] = ids.astype(">u2").view(np.uint8).reshape(-1, 2)
    return packets.tobytes()


@dataclass(slots=True)
class Control:
    """A packet other than PUBLISH: its type and body."""

    type: int
    body: bytes


@dataclass(slots=True)
class Parsed:
    topics: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    packet_ids: list[int] = field(default_factory=list)  # 0 for QoS 0 (nothing to ack)
    controls: list[Control] = field(default_factory=list)


class PacketReader:
    """Accumulates bytes from the socket and parses every complete packet in them.

    Complete packets are parsed straight out of each chunk (payloads are slices of it). Only
    the one packet that straddles two chunks is kept, in a ``bytearray`` that grows by appending,
    so a large packet read in small pieces costs linear time: each byte is copied into it once
    (``buffered_bytes`` counts them). A packet announcing more than ``max_packet_size`` bytes
    is never buffered: a PUBLISH is read through (``oversized`` counts them, ``discarded_bytes``
    what was not kept of them), anything else is refused from its header.
    """

    def __init__(
        self,
        version: int,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        oversize_keep: int = OVERSIZE_KEEP,
    ) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        # at least the fixed header and the topic length, which say where the packet id is
        self.oversize_keep = max(min(max_packet_size, oversize_keep), 8)
        self.buffered_bytes = 0
        self.oversized = 0
        self.discarded_bytes = 0
        self._partial = bytearray()
        self._through: ReadThrough | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes held between reads: never more than ``max_packet_size``."""
        through = len(self._through.kept) if self._through is not None else 0
        return len(self._partial) + through

    def feed(self, data: bytes) -> Parsed:
        """Every packet completed by ``data``; raises :class:`MqttProtocolError` if malformed."""
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
        """Extend the straddling packet from ``data[pos:]``; the offset in ``data`` after it."""
        partial, used = self._partial, pos
        header = self._header(partial, 0, len(partial))
        while header is None and used < len(data):  # the header (<= 5 bytes) straddles too
            partial.append(data[used])
            used += 1
            self.buffered_bytes += 1
            header = self._header(partial, 0, len(partial))
        if header is None:
            return len(data)
        length, body = header
        if body + length > self.max_packet_size:  # only the header is here: move it over
            through = self._start_read_through(partial[0], body, body + length)
            through.take(partial, 0, len(partial))
            partial.clear()
            self._end_read_through(through, parsed)  # a tiny limit: it may be all header
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
        """(remaining length, body offset) of the packet at ``pos``; None if incomplete."""
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
        """Parse complete packets from ``pos``; the offset of the first incomplete one (or of
        a PUBLISH over the limit, which :meth:`_read_through` then consumes).

        The consumer's hot path, in as few Python steps per packet as we found (bench/
        mqtt_parse_ab.py). A packet with a 1- or 2-byte remaining length is framed from one
        ``struct`` read, and a well-formed QoS 1 PUBLISH (any DUP or RETAIN) is parsed inline;
        any other packet, every malformed PUBLISH included, goes to :meth:`_publish` or
        :meth:`_control`, which check it in full and raise. No packet inside a window of
        ``max_packet_size`` bytes can be over that limit, so the loop checks only the window's
        end and leaves everything else to :meth:`_parse_one`.
        """
        limit, v5, header, uint16 = self.max_packet_size, self.version == V5, _HEADER, _UINT16
        add_topic, add_id = parsed.topics.append, parsed.packet_ids.append
        add_payload = parsed.payloads.append
        while True:
            window = pos + limit if pos + limit < size else size
            last = window - 5  # _HEADER reads 5 bytes
            while pos <= last:
                # the remaining length's bytes, and the topic length if the length has 2
                first, b1, b2, topic_length = header(buf, pos)
                if b1 < 0x80:
                    t, end = pos + 4, pos + 2 + b1  # t: where the topic starts
                    topic_length = (b2 << 8) | (topic_length >> 8)  # past ``end`` if b1 < 2
                elif 0 < b2 < 0x80:
                    t, end = pos + 5, pos + 3 + ((b1 & 0x7F) | (b2 << 7))
                else:
                    break  # 3 or 4 length bytes, or malformed: _header
                if end > window:
                    if window == size and end - pos <= limit:
                        return pos  # the usual end of a read: a packet still incomplete
                    break
                if first & 0xF6 == 0x32:  # PUBLISH at QoS 1
                    p = t + topic_length
                    if t < p <= end - 2:  # a topic and a packet id (so b1 >= 5 above)
                        (packet_id,) = uint16(buf, p)
                        if packet_id and not v5:
                            add_topic(buf[t:p].decode("utf-8", "replace"))
                            add_id(packet_id)
                            add_payload(buf[p + 2 : end])
                            pos = end
                            continue
                        # MQTT 5: a 1-byte property length, the properties in the packet
                        p += 2
                        if packet_id and p < end and (props := buf[p]) < 0x80 and p + props < end:
                            add_topic(buf[t : p - 2].decode("utf-8", "replace"))
                            add_id(packet_id)
                            add_payload(buf[p + 1 + props : end])
                            pos = end
                            continue
                self._packet(buf, first, t - 2, end, parsed)
                pos = end
            # what the fast loop stopped at: one packet in full generality, unless fewer than
            # 2 bytes are left (then it is incomplete, the next most usual end of a read)
            after = self._parse_one(buf, pos, size, parsed) if pos + 1 < size else None
            if after is None:
                return pos
            pos = after

    def _parse_one(self, buf: bytes, pos: int, size: int, parsed: Parsed) -> int | None:
        """The packet at ``pos`` in full generality; the offset after it, or None if it is
        incomplete or over the limit (a PUBLISH over it is then being read through)."""
        found = self._header(buf, pos, size)
        if found is None:
            return None
        length, i = found
        end = i + length
        if end - pos > self.max_packet_size:
            self._start_read_through(buf[pos], i - pos, end - pos)
            return None
        if end > size:
            return None
        self._packet(buf, buf[pos], i, end, parsed)
        return end

    def _packet(self, buf: bytes, first: int, i: int, end: int, parsed: Parsed) -> None:
        """Any complete packet whose body is ``buf[i:end]``, checked in full."""
        if first >> 4 == PUBLISH:
            self._publish(buf, first, i, end, parsed)
        else:
            parsed.controls.append(self._control(first, buf, i, end))

    def _publish(self, buf: bytes, first: int, i: int, end: int, parsed: Parsed) -> None:
        """One PUBLISH whose body is ``buf[i:end]``, every length checked against ``end``."""
        qos = (first >> 1) & 0x03
        if qos > 1:  # we subscribe at QoS 1: QoS 2 would need PUBREC, not PUBACK
            raise MqttProtocolError(f"PUBLISH with QoS {qos}")
        if i + 2 > end:
            raise MqttProtocolError(f"PUBLISH of {end - i} bytes has no topic length")
        p = topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if p > end:
            raise MqttProtocolError("PUBLISH topic runs past the end of the packet")
        if p == i + 2:  # empty: a topic alias in MQTT 5, which we never allowed
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
            if p < end and buf[p] < 0x80:  # fast path: a 1-byte property length
                p += 1 + buf[p]
                if p > end:
                    raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
            else:
                p = skip_properties(buf, p, end)
        # invalid UTF-8 becomes U+FFFD, which no topic level allows: a bad_topic dead letter
        parsed.topics.append(buf[i + 2 : topic_end].decode("utf-8", "replace"))
        parsed.packet_ids.append(packet_id)
        parsed.payloads.append(buf[p:end])

    # -- a PUBLISH over the limit ---------------------------------------------------------
    def _start_read_through(self, first: int, body: int, total: int) -> ReadThrough:
        """Begin reading a PUBLISH of ``total`` bytes through; any other packet is refused."""
        if first >> 4 != PUBLISH:
            raise MqttProtocolError(
                f"{PACKET_NAMES[first >> 4]} of {total} bytes exceeds "
                f"mqtt.max_packet_size ({self.max_packet_size})"
            )
        keep = max(self.oversize_keep, body + 2)
        self._through = ReadThrough(total, body, keep, publish_qos(first))
        return self._through

    def _read_through(self, data: bytes, pos: int, parsed: Parsed) -> int:
        """Consume the oversized PUBLISH's bytes in ``data[pos:]``; the offset after them."""
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
        limits = _CONTROLS[self.version].get(kind)
        if limits is None:
            raise MqttProtocolError(f"unexpected {PACKET_NAMES[kind]} packet from the broker")
        if first & 0x0F:
            raise MqttProtocolError(f"{PACKET_NAMES[kind]} with reserved flags {first & 0x0F:#x}")
        if not limits[0] <= length <= limits[1]:
            raise MqttProtocolError(f"{PACKET_NAMES[kind]} with a remaining length of {length}")
        return Control(kind, buf[start:end])


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A variable byte integer at ``pos`` that must end before ``end``: (value, next offset)."""
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


def skip_properties(buf: bytes, pos: int, end: int) -> int:
    length, pos = read_varint(buf, pos, end)
    if pos + length > end:
        raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
    return pos + length
