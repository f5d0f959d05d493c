"""The fast MQTT reader of issue 11 behaves exactly as the reader it replaced.

``bench.mqtt_parse_ab.OldPacketReader`` is a frozen copy of ``PacketReader`` before its hot loop
was rewritten. Whatever a broker sends (valid streams of every packet kind both versions allow,
with random garbage or mutations, split anywhere, with limits small enough that PUBLISHes are
read through and the parse window moves), both readers must return the same messages and
controls from every read, keep the same counters, and raise the same error at the same read.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.mqtt_parse_ab import OldPacketReader
from cityflux.errors import MqttProtocolError
from cityflux.mqtt.codec import V5, V311, PacketReader, Parsed, varint
from tests.support import examples

IDENTITY = settings(
    max_examples=examples(800),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
versions = st.sampled_from([V311, V5])
CONTROLS = {
    V311: [b"\xd0\x00", b"\x40\x02\x12\x34", b"\x90\x03\x00\x01\x01", b"\x20\x02\x00\x00"],
    V5: [b"\xd0\x00", b"\x40\x03\x12\x34\x10", b"\x90\x04\x00\x01\x00\x01", b"\xe0\x00"],
}


@st.composite
def publish(draw: st.DrawFn, version: int) -> bytes:
    """A valid PUBLISH: QoS 0 or 1, DUP (QoS 1), RETAIN, MQTT 5 properties of any length."""
    qos = draw(st.integers(0, 1))
    flags = (qos << 1) | draw(st.integers(0, 1)) | (draw(st.booleans()) << 3 if qos else 0)
    topic = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)).encode()
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += draw(st.integers(1, 65_535)).to_bytes(2, "big")
    if version == V5:  # a 1-byte property length mostly; sometimes one of 2 bytes
        properties = b"\x01\x01" * draw(st.sampled_from([0, 0, 0, 1, 3, 70]))
        body += varint(len(properties)) + properties
    kind = draw(st.sampled_from(["small", "small", "medium", "large"]))
    size = {"small": (0, 120), "medium": (121, 2_000), "large": (16_380, 20_000)}[kind]
    body += bytes([draw(st.integers(0, 255))]) * draw(st.integers(*size))
    return bytes([0x30 | flags]) + varint(len(body)) + body


@st.composite
def malformed(draw: st.DrawFn, version: int) -> bytes:
    """A PUBLISH with one defect at the edges the checks guard, correctly framed."""
    qos, topic, packet_id = 1, b"a/b", b"\x00\x07"
    properties = b"\x00" if version == V5 else b""
    payload = bytes(draw(st.integers(0, 3)))
    defect = draw(
        st.sampled_from(
            ["qos", "dup", "empty", "topic", "id", "no id", "properties", "flags", "length"]
        )
    )
    if defect == "qos":
        qos = draw(st.sampled_from([2, 3]))
    elif defect == "empty":
        topic = b""
    elif defect == "id":
        packet_id = b"\x00\x00"
    elif defect == "no id":  # the packet ends inside or right after the topic
        packet_id, properties, payload = packet_id[: draw(st.integers(0, 1))], b"", b""
    elif defect == "properties" and version == V5:  # they run past the end by 0 to 2 bytes
        properties = bytes([max(len(payload) + draw(st.integers(-1, 1)), 0)])
    body = len(topic).to_bytes(2, "big") + topic
    if defect == "topic":  # the topic length runs past the end, or just reaches it
        body = (len(topic) + draw(st.integers(0, 8))).to_bytes(2, "big") + topic
        packet_id = b""
    first = 0x30 | (qos << 1)
    if defect == "dup":  # DUP is only allowed at QoS 1
        first, packet_id = 0x38, b""
    body += (packet_id if qos else b"") + properties + payload
    if defect == "flags":  # a control packet with flags, or one not allowed from a server
        return bytes([draw(st.sampled_from([0x41, 0x10, 0x60, 0x22, 0xF0]))]) + b"\x02\x00\x01"
    if defect == "length":  # a remaining length not in its shortest encoding, or of 5 bytes
        return bytes([first, len(body) | 0x80]) + draw(st.sampled_from([b"\x00", b"\x80" * 4]))
    return bytes([first]) + varint(len(body)) + body


def packet(version: int) -> st.SearchStrategy[bytes]:
    valid = st.one_of(publish(version), st.sampled_from(CONTROLS[version]))
    return st.one_of(valid, valid, malformed(version))


@st.composite
def streams(draw: st.DrawFn, version: int) -> bytes:
    """A valid stream, then maybe garbage, maybe a few bytes overwritten, inserted or cut."""
    stream = bytearray(b"".join(draw(st.lists(packet(version), max_size=6))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(stream)))
        value = draw(st.integers(0, 255))
        action = draw(st.sampled_from(["set", "insert", "cut", "length", "first"]))
        if action == "set" and at < len(stream):
            stream[at] = value
        elif action == "insert":
            stream[at:at] = bytes([value])
        elif action == "cut":
            del stream[at : at + draw(st.integers(1, 8))]
        elif action == "length" and at + 1 < len(stream):
            stream[at + 1] = value | 0x80 if draw(st.booleans()) else value
        elif action == "first" and at < len(stream):  # a packet type or flags
            stream[at] = (value & 0xF0) | (stream[at] & 0x0F) if value & 1 else value
    return bytes(stream) + draw(st.binary(max_size=60))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def outcome(parsed: Parsed) -> tuple[Any, ...]:
    """Everything a read returns, payload types and (for read-through) true lengths included."""
    payloads = [(type(p).__name__, bytes(p), len(p)) for p in parsed.payloads]
    controls = [(c.type, type(c.body).__name__, c.body) for c in parsed.controls]
    return parsed.topics, parsed.packet_ids, payloads, controls


def run(reader: Any, pieces: list[bytes]) -> list[tuple[Any, ...]]:
    """Per read: its outcome and the reader's counters; the error last if one is raised."""
    steps: list[tuple[Any, ...]] = []
    for piece in pieces:
        try:
            parsed = reader.feed(piece)
        except MqttProtocolError as exc:
            steps.append(("error", type(exc), str(exc)))
            break
        counters = (reader.buffered_bytes, reader.oversized, reader.discarded_bytes)
        steps.append((outcome(parsed), counters, reader.held_bytes))
    return steps


@IDENTITY
@given(version=versions, data=st.data())
def test_the_new_reader_returns_and_raises_what_the_old_one_did(version: int, data: Any) -> None:
    whole = data.draw(streams(version))
    limit = data.draw(st.sampled_from([1_048_576, 1_048_576, 30_000, 1_500, 300, 64, 9]))
    keep = data.draw(st.integers(8, 100_000))
    pieces = split(whole, data.draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    old = run(OldPacketReader(version, limit, keep), pieces)
    new = run(PacketReader(version, limit, keep), pieces)
    assert new == old


@IDENTITY
@given(version=versions, data=st.data())
def test_valid_streams_in_socket_sized_reads_parse_as_before(version: int, data: Any) -> None:
    """Valid packets only, read the way the consumer does: the fast path, not the errors."""
    whole = b"".join(data.draw(st.lists(publish(version), min_size=1, max_size=40)))
    # reads of 1 byte to 64 KiB, at most ~200 of them
    size = data.draw(
        st.sampled_from([1, 5, 1_500, 4_096, 65_536]).map(lambda s: max(s, len(whole) // 200))
    )
    pieces = [whole[at : at + size] for at in range(0, len(whole), size)]
    old = run(OldPacketReader(version), pieces)
    new = run(PacketReader(version), pieces)
    assert new == old
    assert not any(step[0] == "error" for step in new)
