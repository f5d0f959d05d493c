"""A PUBLISH over ``mqtt.max_packet_size``, read through instead of refused (skip mode).

A broker with a larger limit than ours (any broker under MQTT 3.1.1, which has no way to tell it
ours) sends such a packet, and redelivers it after every reconnect: refusing it would stall
ingest for good. :class:`cityflux.mqtt.codec.PacketReader` instead keeps its first bytes
(header, topic, packet id, MQTT 5 properties and the start of the payload: at most
``OVERSIZE_KEEP``, never more than the limit), discards the rest as it arrives, and returns the
message with an :class:`OversizedPayload`. The decoder dead-letters it as ``too_large`` with its
real size, and the consumer acknowledges it with its batch like any other message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cityflux.errors import MqttProtocolError

# What is kept of a PUBLISH over the limit: room for the longest topic MQTT allows (65,535
# bytes), the packet id, some properties and the dead letter's payload prefix (1 KiB).
OVERSIZE_KEEP: Final = 80 * 1024


class OversizedPayload(bytes):
    """The kept start of a payload too large to keep whole; ``len()`` is its size on the wire.

    Its bytes (what slicing, msgspec and the dead letter's prefix see) are the first ones of the
    payload; its length is the real one, so the decoder's ``len(payload) >
    ingest.max_payload_bytes`` rejects it as ``too_large`` with the true size in the message,
    and the dead letter's ``payload_bytes`` and ``truncated`` are right, with no check added to
    the hot path. ``kept`` is how many bytes it holds.
    """

    size: int

    def __new__(cls, prefix: bytes, size: int) -> OversizedPayload:
        payload = super().__new__(cls, prefix)
        payload.size = size
        return payload

    def __len__(self) -> int:
        return self.size

    @property
    def kept(self) -> int:
        return len(memoryview(self))


@dataclass(slots=True)
class ReadThrough:
    """A PUBLISH over the limit being read: its first ``keep`` bytes kept, the rest counted.

    The packet id of a QoS 1 PUBLISH whose topic runs past the kept bytes is picked out of the
    stream as it passes, so that even that message can be acknowledged.
    """

    total: int  # bytes of the whole packet
    body: int  # offset of the variable header (after the remaining length)
    keep: int  # at most this many bytes of the packet are kept (always past the topic length)
    qos: int
    kept: bytearray = field(default_factory=bytearray)
    seen: int = 0  # bytes of the packet consumed so far
    pid_at: int = -1  # offset of the packet id, once the topic length is known (QoS 1)
    pid: bytearray = field(default_factory=bytearray)  # the packet id, if not in ``kept``

    def take(self, data: bytes | bytearray, pos: int, count: int) -> int:
        """Consume ``data[pos:pos + count]``; the number of bytes kept."""
        start, kept = self.seen, 0
        room = self.keep - len(self.kept)
        if room > 0:
            kept = min(room, count)
            with memoryview(data) as view:
                self.kept += view[pos : pos + kept]
        self.seen += count
        if self.qos and self.pid_at < 0 and len(self.kept) >= self.body + 2:
            self.pid_at = self.body + 2 + int.from_bytes(self.kept[self.body : self.body + 2])
        if self.pid_at + 2 > self.keep:  # not (wholly) kept: pick it out as it passes
            for at in range(max(start, self.pid_at), min(self.seen, self.pid_at + 2)):
                self.pid.append(data[pos + at - start])
        return kept

    def message(self, v5: bool) -> tuple[str, int, OversizedPayload]:
        """Once all of it was read: (topic, packet id, payload), checked like any PUBLISH where
        its fields were kept; a topic cut by the kept bytes is still given (the decoder rejects
        it as bad_topic)."""
        kept, total, i = self.kept, self.total, self.body
        if i + 2 > total:
            raise MqttProtocolError(f"PUBLISH of {total - i} bytes has no topic length")
        p = topic_end = i + 2 + int.from_bytes(kept[i : i + 2])
        if p > total:
            raise MqttProtocolError("PUBLISH topic runs past the end of the packet")
        if p == i + 2:
            raise MqttProtocolError("PUBLISH with an empty topic")
        packet_id = 0
        if self.qos:
            if p + 2 <= len(kept):
                packet_id = int.from_bytes(kept[p : p + 2])
            elif p + 2 <= total:
                packet_id = int.from_bytes(self.pid)
            if not packet_id:
                raise MqttProtocolError("QoS 1 PUBLISH without a packet id (or with id 0)")
            p += 2
        start: int | None = p
        if v5:
            start = _v5_payload_start(kept, p, total)
        if start is None:  # the properties run past what was kept: size is an upper bound
            payload = OversizedPayload(b"", total - p)
        else:
            payload = OversizedPayload(bytes(kept[start:]), total - start)
        return kept[i + 2 : topic_end].decode("utf-8", "replace"), packet_id, payload


def publish_qos(first: int) -> int:
    """The QoS of a PUBLISH's first byte; its flags checked."""
    qos = (first >> 1) & 0x03
    if qos > 1:  # we subscribe at QoS 1: QoS 2 would need PUBREC, not PUBACK
        raise MqttProtocolError(f"PUBLISH with QoS {qos}")
    if not qos and first & 0x08:
        raise MqttProtocolError("QoS 0 PUBLISH with the DUP flag")
    return qos


def _v5_payload_start(kept: bytearray, pos: int, total: int) -> int | None:
    """Where the payload of an oversized MQTT 5 PUBLISH starts (after its properties, whose
    length must fit the packet); None if the property length was cut off by the kept bytes."""
    if pos >= total:
        raise MqttProtocolError("malformed variable byte integer")
    length, shift = 0, 0
    for at in range(pos, min(len(kept), pos + 4)):
        byte = kept[at]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            if at + 1 + length > total:
                raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
            return at + 1 + length
        shift += 7
    if len(kept) - pos >= 4 or len(kept) >= total:
        raise MqttProtocolError("malformed variable byte integer")
    return None
