from __future__ import annotations

import pytest

from cityflux.config import MQTT_PACKET_MARGIN, Config
from cityflux.errors import ConfigError, MqttError, MqttProtocolError
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.ingest.decode import BatchDecoder
from cityflux.model.contract import Reason
from cityflux.mqtt.codec import (
    V5,
    V311,
    ConnectOptions,
    PacketReader,
    Parsed,
    connect_packet,
    puback_packets,
    subscribe_packet,
    varint,
)
from cityflux.mqtt.oversize import OVERSIZE_KEEP, OversizedPayload


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
    assert issubclass(MqttProtocolError, MqttError)  # the connection loop reconnects on it


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


def test_a_control_packet_over_the_maximum_is_refused_from_its_header() -> None:
    reader = PacketReader(V311, max_packet_size=1_000)
    header = b"\x90" + varint(2_000)  # a SUBACK announcing 2,000 bytes, none of them sent
    with pytest.raises(MqttProtocolError, match=r"SUBACK of 2003 bytes exceeds .*\(1000\)"):
        reader.feed(header)
    assert reader.buffered_bytes == 0
    exact = publish(b"t", b"x" * (1_000 - 8), 1)  # 1,000 bytes in all: allowed, kept whole
    assert len(exact) == 1_000
    assert PacketReader(V311, max_packet_size=1_000).feed(exact).payloads == [b"x" * 992]


def feed_pieces(reader: PacketReader, stream: bytes, step: int) -> Parsed:
    """Feed ``stream`` in pieces of ``step`` bytes; everything parsed, in one Parsed."""
    out = Parsed()
    for at in range(0, len(stream), step):
        parsed = reader.feed(stream[at : at + step])
        out.topics += parsed.topics
        out.payloads += parsed.payloads
        out.packet_ids += parsed.packet_ids
        out.controls += parsed.controls
        assert reader.held_bytes <= reader.max_packet_size  # whatever the piece size
    return out


@pytest.mark.parametrize("version", [V311, V5])
@pytest.mark.parametrize("step", [1_000, 65_536, 262_144, 3_000_000])
def test_a_publish_over_the_maximum_is_read_through_into_a_too_large_payload(
    version: int, step: int
) -> None:
    """Not a protocol error (a broker with a larger limit would redeliver it after every
    reconnect): its header, topic and packet id are read, the first OVERSIZE_KEEP bytes kept,
    the rest discarded as they arrive, and the message returned with its real size."""
    v5 = version == V5
    payload = b'{"ts": 1700000000000, "pm25_ugm3": 1}' + b" " * 2_000_000  # valid JSON whole
    big = publish(b"cityflux/v1/d1/pole/p-1", payload, 4_242, v5)
    stream = publish(b"a", b"before", 1, v5) + big + publish(b"b", b"after", 2, v5) + b"\xd0\x00"
    reader = PacketReader(version)  # 1 MiB
    parsed = feed_pieces(reader, stream, step)
    assert parsed.topics == ["a", "cityflux/v1/d1/pole/p-1", "b"]
    assert parsed.packet_ids == [1, 4_242, 2]
    assert [c.type for c in parsed.controls] == [13]
    before, oversized, after = parsed.payloads
    assert (before, after) == (b"before", b"after")
    assert isinstance(oversized, OversizedPayload)
    header = len(big) - len(payload)
    assert len(oversized) == len(payload) == oversized.size  # the real size, for too_large
    assert oversized.kept == OVERSIZE_KEEP - header
    assert bytes(oversized) == payload[: OVERSIZE_KEEP - header]
    assert oversized[:5] == payload[:5]  # slices are of the kept bytes
    assert (reader.oversized, reader.discarded_bytes) == (1, len(big) - OVERSIZE_KEEP)
    assert reader.buffered_bytes <= 2 * 1_048_576  # not the 2 MB packet


def test_an_oversized_payload_is_dead_lettered_too_large_with_its_real_size() -> None:
    """The decoder and the dead letter, unchanged, see the real size and the kept prefix."""
    payload = b'{"ts": 1700000000000, "pm25_ugm3": 1}' + b" " * 2_000_000
    topic = "cityflux/v1/d1/pole/p-1"
    stream = publish(topic.encode(), payload, 7)
    (oversized,) = PacketReader(V311).feed(stream).payloads
    config = Config()
    decoded = BatchDecoder(config.ingest, "cityflux/v1").decode([topic], [oversized], 0)
    assert decoded.columns == {}
    (rejection,) = decoded.rejections
    assert rejection.reason is Reason.TOO_LARGE
    assert rejection.message == f"payload of {len(payload):,} bytes exceeds 262144".replace(",", "")
    letter = DeadLetterFactory("cityflux/v1", 1_024).letter(rejection, topic, oversized, 0)
    assert (letter.payload_bytes, letter.truncated) == (len(payload), True)
    assert letter.payload == payload[:1_024].decode()


def test_a_packet_id_past_the_kept_bytes_is_still_read() -> None:
    """A topic longer than what is kept: the packet id is picked out of the stream as it
    passes, so that the message is acknowledged; the cut topic is rejected downstream."""
    topic = b"cityflux/v1/" + b"x" * 5_000
    stream = publish(topic, b"p" * 10_000, 513) + publish(b"next", b"n", 514)
    for step in (1, 7, 5_013, 5_015, 100_000):
        reader = PacketReader(V311, max_packet_size=4_096, oversize_keep=1_000)
        parsed = feed_pieces(reader, stream, step)
        assert parsed.packet_ids == [513, 514]
        assert parsed.topics == [topic[:995].decode(), "next"]  # 1,000 kept - 5 header bytes
        assert [len(p) for p in parsed.payloads] == [10_000, 1]
        assert parsed.payloads[0] == b""  # nothing of it kept


def test_v5_properties_past_the_kept_bytes() -> None:
    """Properties longer than what is kept: nothing of the payload is kept. Its size is exact
    when the property length was kept, else an upper bound (counting the properties)."""
    user = b"\x26" + (4_000).to_bytes(2, "big") + b"k" * 4_000 + b"\x00\x01v"
    body = b"\x00\x01t" + b"\x00\x09" + varint(len(user)) + user + b"p" * 3_000
    stream = b"\x32" + varint(len(body)) + body
    for keep, size in ((1_000, 3_000), (8, len(body) - 5)):  # 8: up to the packet id
        parsed = PacketReader(V5, max_packet_size=4_096, oversize_keep=keep).feed(stream)
        assert (parsed.topics, parsed.packet_ids) == (["t"], [9])
        assert parsed.payloads == [b""]
        assert len(parsed.payloads[0]) == size
    whole = PacketReader(V5, max_packet_size=len(stream)).feed(stream)  # fits: read normally
    assert whole.payloads == [b"p" * 3_000]


@pytest.mark.parametrize(
    ("version", "body", "error"),
    [
        (V311, b"\x00\x00" + b"x" * 5_000, "empty topic"),
        (V311, b"\xff\xfft" + b"x" * 5_000, "topic runs past the end"),
        (V311, b"\x00\x01t\x00\x00" + b"x" * 5_000, "or with id 0"),
        (V5, b"\x00\x01t\x00\x01\xff\xff\x7f" + b"x" * 5_000, "properties run past"),
        (V5, b"\x00\x01t\x00\x01\xff\xff\xff\xff\x01" + b"x" * 5_000, "variable byte"),
    ],
)
def test_a_malformed_oversized_publish_is_still_an_error(
    version: int, body: bytes, error: str
) -> None:
    stream = b"\x32" + varint(len(body)) + body
    for step in (1, 3, 1_000, len(stream)):
        reader = PacketReader(version, max_packet_size=4_096)
        with pytest.raises(MqttProtocolError, match=error):
            feed_pieces(reader, stream, step)
    with pytest.raises(MqttProtocolError, match="QoS 2"):  # refused from the first byte
        PacketReader(V311, max_packet_size=4_096).feed(b"\x34" + varint(5_000))


def test_connect_packets() -> None:
    v3 = connect_packet(ConnectOptions("cf", V311, 30, "u", "p"))
    assert connect_packet(ConnectOptions("cf", V5, 30, max_packet_size=None)) == (
        b"\x10\x17\x00\x04MQTT\x05\x00\x00\x1e\x08\x11\x00\x00\x00\x00\x21\xff\xff\x00\x02cf"
    )  # no Maximum Packet Size property (0x27): the consumer's default
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
