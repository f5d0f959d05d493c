from __future__ import annotations

import pytest

from cityflux.config import MQTT_PACKET_MARGIN, Config
from cityflux.errors import ConfigError, IngestError, MqttProtocolError
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
    with pytest.raises(MqttProtocolError, match="remaining length"):
        PacketReader(V311).feed(b"\x30\xff\xff\xff\xff\x01")
    assert issubclass(MqttProtocolError, IngestError)  # the connection loop reconnects on it


def test_a_large_packet_in_small_pieces_is_copied_once() -> None:
    """Reassembly is linear: each byte of a straddling packet enters the buffer once (the old
    reader re-copied the whole pending buffer on every piece: ~3 GiB for this 10 MiB packet)."""
    payload = bytes(range(256)) * (10 * 4096)  # 10 MiB
    packet = publish(b"big/one", payload, 9) + publish(b"small", b"s", 10)
    reader = PacketReader(V311, max_packet_size=11 * 2**20)
    results = [reader.feed(packet[i : i + 16_384]) for i in range(0, len(packet), 16_384)]
    assert [t for r in results for t in r.topics] == ["big/one", "small"]
    assert [p for r in results for p in r.payloads] == [payload, b"s"]
    assert [i for r in results for i in r.packet_ids] == [9, 10]
    assert len(packet) - 16_384 < reader.buffered_bytes <= len(packet)


def test_a_packet_over_the_maximum_is_refused_from_its_header() -> None:
    reader = PacketReader(V311, max_packet_size=1_000)
    header = b"\x32" + varint(2_000)  # a PUBLISH announcing 2,000 bytes, none of them sent
    with pytest.raises(MqttProtocolError, match=r"PUBLISH of 2003 bytes exceeds .*\(1000\)"):
        reader.feed(header)
    assert reader.buffered_bytes == 0
    exact = publish(b"t", b"x" * (1_000 - 8), 1)  # 1,000 bytes in all: allowed
    assert len(exact) == 1_000
    assert PacketReader(V311, max_packet_size=1_000).feed(exact).packet_ids == [1]


def test_connect_packets() -> None:
    v3 = connect_packet(ConnectOptions("cf", V311, 30, "u", "p"))
    assert v3 == b"\x10\x14\x00\x04MQTT\x04\xc0\x00\x1e\x00\x02cf\x00\x01u\x00\x01p"
    v5 = connect_packet(
        ConnectOptions("cf", V5, 30, session_expiry_s=60, receive_maximum=100, max_packet_size=4096)
    )
    assert v5 == (
        b"\x10\x1c\x00\x04MQTT\x05\x00\x00\x1e\x0d\x11\x00\x00\x00\x3c\x21\x00\x64"
        b"\x27\x00\x00\x10\x00\x00\x02cf"
    )


def test_subscribe_and_puback() -> None:
    assert subscribe_packet(1, "a/#", 1, V311) == b"\x82\x08\x00\x01\x00\x03a/#\x01"
    assert subscribe_packet(1, "a/#", 1, V5) == b"\x82\x09\x00\x01\x00\x00\x03a/#\x01"
    assert puback_packets([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mqtt.max_packet_size": 100_000}, "at least ingest.max_payload_bytes"),
        ({"mqtt.max_packet_size": 0}, "at least ingest.max_payload_bytes"),
        ({"mqtt.max_packet_size": 2**31}, "MQTT's own limit"),
    ],
)
def test_max_packet_size_must_hold_a_payload_we_accept(
    overrides: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Config().with_overrides(overrides)
    fits = Config().with_overrides({"mqtt.max_packet_size": 256 * 1024 + MQTT_PACKET_MARGIN})
    assert fits.mqtt.max_packet_size == 266_240
