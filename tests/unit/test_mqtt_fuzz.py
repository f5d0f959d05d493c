"""Property-based fuzzing of the MQTT packet reader (short and derandomized; bench/fuzz_mqtt.py
runs the coverage-guided long version).

Whatever bytes a broker sends, ``PacketReader.feed`` returns parsed packets or raises
MqttProtocolError; and a valid stream parses the same however the network splits it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cityflux.errors import MqttProtocolError
from cityflux.mqtt.codec import (
    V5,
    V311,
    Control,
    PacketReader,
    Parsed,
    publish_packet,
    varint,
)
from cityflux.mqtt.control import (
    disconnect_reason,
    parse_connack,
    puback_reason,
    suback_codes,
)
from cityflux.mqtt.oversize import OversizedPayload
from tests.support import examples

FUZZ = settings(
    max_examples=examples(300),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
versions = st.sampled_from([V311, V5])
Expected = tuple[list[str], list[int], list[bytes], list[int]]


@st.composite
def packets(draw: st.DrawFn, version: int) -> tuple[bytes, Expected]:
    """One valid packet a broker may send, and what the reader must make of it."""
    kind = draw(st.sampled_from(["publish", "publish", "publish", "control", "big"]))
    if kind == "control":
        data = draw(
            st.sampled_from(
                [b"\xd0\x00", b"\x40\x02\x12\x34", b"\x90\x03\x00\x01\x01"]
                if version == V311
                else [b"\xd0\x00", b"\x40\x03\x12\x34\x10", b"\x90\x04\x00\x01\x00\x01"]
            )
        )
        return data, ([], [], [], [data[0] >> 4])
    topic = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=24))
    packet_id = draw(st.integers(0, 65_535))
    size = draw(st.integers(16_000, 70_000)) if kind == "big" else draw(st.integers(0, 300))
    payload = bytes([draw(st.integers(0, 255))]) * size
    data = publish_packet(topic, payload, packet_id, version, retain=draw(st.booleans()))
    return data, ([topic], [packet_id], [payload], [])


def flatten(results: list[Parsed]) -> Expected:
    return (
        [t for r in results for t in r.topics],
        [i for r in results for i in r.packet_ids],
        [p for r in results for p in r.payloads],
        [c.type for r in results for c in r.controls],
    )


def feed_all(version: int, pieces: list[bytes], max_size: int = 1_048_576) -> list[Parsed] | None:
    """Feed ``pieces``; None once the reader raises MqttProtocolError (the connection ends)."""
    reader = PacketReader(version, max_size)
    results = []
    for piece in pieces:
        try:
            results.append(reader.feed(piece))
        except MqttProtocolError:
            return None
    return results


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@FUZZ
@given(version=versions, data=st.data())
def test_valid_streams_parse_the_same_split_anywhere(version: int, data: Any) -> None:
    stream = data.draw(st.lists(packets(version), min_size=1, max_size=8))
    whole = b"".join(p for p, _ in stream)
    expected: Expected = ([], [], [], [])
    for _, (topics, ids, payloads, controls) in stream:
        expected[0].extend(topics)
        expected[1].extend(ids)
        expected[2].extend(payloads)
        expected[3].extend(controls)
    cuts = data.draw(st.lists(st.integers(0, len(whole)), max_size=12))
    results = feed_all(version, split(whole, cuts))
    assert results is not None
    assert flatten(results) == expected


@st.composite
def sized_packets(draw: st.DrawFn, version: int, limit: int, keep: int) -> tuple[bytes, Expected]:
    """A valid PUBLISH or control packet, and what a reader with ``max_packet_size=limit`` and
    ``oversize_keep=keep`` must make of it: a PUBLISH over the limit is read through, so its
    topic is cut to the kept bytes, its payload is the kept start with its real size."""
    if draw(st.integers(0, 5)) == 0:
        return b"\xd0\x00", ([], [], [], [13])
    topic = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))
    packet_id = draw(st.integers(0, 65_535))
    payload = bytes([draw(st.integers(0, 255))]) * draw(st.integers(0, 3 * limit))
    data = publish_packet(topic, payload, packet_id, version)
    if len(data) <= limit:
        return data, ([topic], [packet_id], [payload], [])
    name = topic.encode()
    header = len(data) - len(payload) - 2 - len(name) - (2 if packet_id else 0) - (version == V5)
    start = len(data) - len(payload)  # the payload's offset; its property length just before
    cut = name[: max(keep - header - 2, 0)].decode("utf-8", "replace")
    size = len(payload) + (version == V5 and keep < start)  # an upper bound if not kept
    return data, ([cut], [packet_id], [OversizedPayload(data[start:keep], size)], [])


def same(got: Expected, expected: Expected) -> bool:
    """Equal, with every payload's length (the bytes of an OversizedPayload are a prefix)."""
    lengths = [[len(p) for p in e[2]] for e in (got, expected)]
    types = [[type(p) is OversizedPayload for p in e[2]] for e in (got, expected)]
    return got == expected and lengths[0] == lengths[1] and types[0] == types[1]


@FUZZ
@given(version=versions, data=st.data())
def test_streams_with_oversized_publishes_parse_the_same_split_anywhere(
    version: int, data: Any
) -> None:
    """Skip mode: a PUBLISH over the limit, split anywhere, is read through to the same message
    and never held whole; what follows it parses as usual."""
    limit = data.draw(st.integers(60, 1_500))
    keep = data.draw(st.integers(8, limit))
    stream = data.draw(st.lists(sized_packets(version, limit, keep), min_size=1, max_size=8))
    whole = b"".join(p for p, _ in stream)
    expected: Expected = ([], [], [], [])
    for _, (topics, ids, payloads, controls) in stream:
        for have, more in zip(expected, (topics, ids, payloads, controls), strict=True):
            have.extend(more)  # type: ignore[attr-defined]
    reader = PacketReader(version, limit, oversize_keep=keep)
    results = []
    for piece in split(whole, data.draw(st.lists(st.integers(0, len(whole)), max_size=12))):
        results.append(reader.feed(piece))
        assert reader.held_bytes <= limit
    assert same(flatten(results), expected)
    assert reader.held_bytes == 0


# random packets with a correct frame (so that their bodies get parsed), then random bytes
framed = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=6).map(
    lambda packets: b"".join(bytes([first]) + varint(len(body)) + body for first, body in packets)
)


@FUZZ
@given(
    version=versions,
    head=framed,
    tail=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 1_000)),
)
def test_random_bytes_parse_or_raise_a_protocol_error(
    version: int, head: bytes, tail: bytes, cuts: list[int]
) -> None:
    blob = head + tail
    results = feed_all(version, split(blob, cuts), max_size=400)
    if results is not None:  # what parsed is the same as in one piece
        assert flatten(results) == flatten(feed_all(version, [blob], max_size=400) or [])


@st.composite
def mutated(draw: st.DrawFn, version: int) -> bytes:
    """A valid stream with a few bytes overwritten, inserted or cut."""
    stream = bytearray(b"".join(p for p, _ in draw(st.lists(packets(version), max_size=4))))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(stream)))
        action = draw(st.sampled_from(["set", "insert", "cut", "length"]))
        value = draw(st.integers(0, 255))
        if action == "set" and at < len(stream):
            stream[at] = value
        elif action == "insert":
            stream[at:at] = bytes([value])
        elif action == "cut":
            del stream[at : at + draw(st.integers(1, 8))]
        elif action == "length" and at + 1 < len(stream):  # the field that matters most
            stream[at + 1] = value | 0x80 if draw(st.booleans()) else value
    return bytes(stream)


@FUZZ
@given(version=versions, data=st.data())
def test_mutated_streams_parse_or_raise_a_protocol_error(version: int, data: Any) -> None:
    blob = data.draw(mutated(version))
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=6))
    results = feed_all(version, split(blob, cuts))
    if results is not None:
        assert flatten(results) == flatten(feed_all(version, [blob]) or [])


@FUZZ
@given(version=versions, body=st.binary(max_size=64))
def test_control_bodies_parse_or_raise_a_protocol_error(version: int, body: bytes) -> None:
    for parse in (
        lambda: parse_connack(Control(2, body), version),
        lambda: suback_codes(Control(9, body), version, packet_id=1),
        lambda: disconnect_reason(Control(14, body), version),
        lambda: puback_reason(Control(4, body), version),
    ):
        with contextlib.suppress(MqttProtocolError):
            parse()


def test_a_truncated_header_of_every_length_waits_for_more() -> None:
    """1 to 4 bytes of a remaining length are incomplete, not malformed."""
    packet = b"\x30" + varint(2_000_000) + b"\x00\x01t" + b"x" * (2_000_000 - 3)
    reader = PacketReader(V311, max_packet_size=4_000_000)
    for i in range(5):
        assert reader.feed(packet[i : i + 1]).topics == []
    assert reader.feed(packet[5:]).payloads == [b"x" * (2_000_000 - 3)]
