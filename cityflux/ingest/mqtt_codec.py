"""The few MQTT 3.1.1 / 5.0 packets the consumer needs, encoded and parsed in bulk.

Why not paho for receiving (docs/performance.md has the figures): paho reads each packet with
several ``recv`` calls and builds an ``MQTTMessage`` with a callback per message, and each
manual ``ack`` wakes its network thread through a socket pair. That costs more per message than
all of cityflux's decoding and validation together. Here one ``recv`` of up to 256 KiB is parsed
in one tight loop into three lists, and a batch's PUBACKs go out in one ``sendall``.

Specifications: MQTT 3.1.1 (OASIS, 2014) sections 2-3; MQTT 5.0 (OASIS, 2019) sections 2-3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from cityflux.errors import IngestError

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
PINGREQ_PACKET: Final = b"\xc0\x00"
DISCONNECT_PACKET: Final = b"\xe0\x00"
_PUBACK_HEADER: Final = b"\x40\x02"
_MAX_REMAINING: Final = 268_435_455
V311, V5 = 4, 5


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
    """PUBACKs for many messages at once (reason code 0 may be omitted in MQTT 5 too)."""
    return b"".join(_PUBACK_HEADER + pid.to_bytes(2, "big") for pid in packet_ids)


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
    """Accumulates bytes from the socket and parses every complete packet in them."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._pending = b""

    def feed(self, data: bytes) -> Parsed:
        buf = self._pending + data if self._pending else data
        parsed = Parsed()
        topics, payloads, ids = parsed.topics, parsed.payloads, parsed.packet_ids
        v5 = self.version == V5
        pos, size = 0, len(buf)
        while pos + 2 <= size:
            first = buf[pos]
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < size:  # remaining length: 1 to 4 bytes
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise IngestError("malformed remaining length from the broker")
            if not complete:
                break
            end = i + length
            if end > size:
                break
            if first >> 4 == PUBLISH:
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                topics.append(buf[i + 2 : topic_end].decode("utf-8", "replace"))
                p = topic_end
                if first & 0x06:
                    ids.append((buf[p] << 8) | buf[p + 1])
                    p += 2
                else:
                    ids.append(0)
                if v5:
                    p = _skip_properties(buf, p)
                payloads.append(buf[p:end])
            else:
                parsed.controls.append(Control(first >> 4, buf[i:end]))
            pos = end
        self._pending = buf[pos:]
        return parsed


def _skip_properties(buf: bytes, pos: int) -> int:
    length, multiplier = 0, 1
    while True:
        byte = buf[pos]
        pos += 1
        length += (byte & 0x7F) * multiplier
        if byte < 0x80:
            return pos + length
        multiplier *= 128


def connack_result(control: Control, version: int) -> tuple[bool, int]:
    """(session present, return/reason code) of a CONNACK."""
    if control.type != CONNACK or len(control.body) < 2:
        raise IngestError(f"expected CONNACK, got packet type {control.type}")
    return bool(control.body[0] & 0x01), control.body[1]


def suback_codes(control: Control, version: int) -> list[int]:
    body = control.body[2:]  # after the packet id
    if version == V5:
        body = body[_skip_properties(body, 0) :]
    return list(body)
