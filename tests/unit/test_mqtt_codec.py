from __future__ import annotations

import pytest

from cityflux.errors import IngestError
from cityflux.ingest.mqtt_codec import (
    V5,
    V311,
    ConnectOptions,
    PacketReader,
    connect_packet,
    puback_packets,
    subscribe_packet,
    varint,
)


def publish(topic: bytes, payload: bytes, packet_id: int | None, v5: bool = False) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if packet_id is not None:
        body += packet_id.to_bytes(2, "big")
    if v5:
        body += b"\x02\x01\x01"  # properties: length 2, payload format indicator = 1
    first = 0x32 if packet_id is not None else 0x30
    return bytes([first]) + varint(len(body + payload)) + body + payload


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
    ],
)
def test_varint(value: int, encoded: bytes) -> None:
    assert varint(value) == encoded


@pytest.mark.parametrize("version", [V311, V5])
def test_every_split_of_the_stream_parses_the_same(version: int) -> None:
    v5 = version == V5
    stream = (
        publish(b"a/b", b"x" * 200, 7, v5)
        + publish(b"t", b"", None, v5)
        + b"\xd0\x00"
        + publish(b"c", b"y" * 20_000, 65_535, v5)
    )
    for cut in range(0, len(stream) + 1, 7):
        reader = PacketReader(version)
        first, second = reader.feed(stream[:cut]), reader.feed(stream[cut:])
        assert first.topics + second.topics == ["a/b", "t", "c"]
        assert first.payloads + second.payloads == [b"x" * 200, b"", b"y" * 20_000]
        assert first.packet_ids + second.packet_ids == [7, 0, 65_535]
        assert [c.type for c in first.controls + second.controls] == [13]


def test_a_malformed_length_is_an_error() -> None:
    with pytest.raises(IngestError, match="remaining length"):
        PacketReader(V311).feed(b"\x30\xff\xff\xff\xff\x01")


def test_connect_packets() -> None:
    v3 = connect_packet(ConnectOptions("cf", V311, 30, "u", "p"))
    assert v3 == b"\x10\x14\x00\x04MQTT\x04\xc0\x00\x1e\x00\x02cf\x00\x01u\x00\x01p"
    v5 = connect_packet(ConnectOptions("cf", V5, 30, session_expiry_s=60, receive_maximum=100))
    assert v5 == (
        b"\x10\x17\x00\x04MQTT\x05\x00\x00\x1e\x08\x11\x00\x00\x00\x3c\x21\x00\x64\x00\x02cf"
    )


def test_subscribe_and_puback() -> None:
    assert subscribe_packet(1, "a/#", 1, V311) == b"\x82\x08\x00\x01\x00\x03a/#\x01"
    assert subscribe_packet(1, "a/#", 1, V5) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert puback_packets([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"
