"""A conformance table: packets a broker may send us (MQTT 3.1.1 and 5.0), valid and invalid.

Each valid row says what the reader must return; each invalid row which rule it breaks. The
invalid ones must raise MqttProtocolError (an MqttError: the consumer reconnects), never an
IndexError or anything else.
"""

from __future__ import annotations

import re

import pytest

from cityflux.errors import MqttError, MqttProtocolError
from cityflux.mqtt.codec import (
    CONNACK,
    V5,
    V311,
    Control,
    PacketReader,
    varint,
)
from cityflux.mqtt.control import (
    accepted_connack,
    disconnect_reason,
    parse_connack,
    suback_codes,
)
from cityflux.mqtt.oversize import OversizedPayload


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def topic(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


# (topics, packet ids, payloads, control types) of a valid stream
Result = tuple[list[str], list[int], list[bytes], list[int]]


def publish_result(name: str, packet_id: int, payload: bytes) -> Result:
    return [name], [packet_id], [payload], []


USER_PROPERTY = b"\x26" + topic(b"k" * 90) + topic(b"v" * 90)  # 185 bytes: a 2-byte length

VALID: list[tuple[str, int, bytes, Result]] = [
    ("publish qos 0", V311, packet(0x30, topic(b"a/b") + b"hi"), publish_result("a/b", 0, b"hi")),
    ("publish qos 0, empty payload", V311, packet(0x30, topic(b"t")), publish_result("t", 0, b"")),
    (
        "publish qos 1 dup retain",
        V311,
        packet(0x3B, topic(b"t") + b"\x01\x02" + b"x"),
        publish_result("t", 258, b"x"),
    ),
    (
        "publish with a 3-byte remaining length",
        V311,
        packet(0x32, topic(b"t") + b"\xff\xff" + b"z" * 20_000),
        publish_result("t", 65_535, b"z" * 20_000),
    ),
    (
        "invalid UTF-8 topic: replaced, rejected downstream as bad_topic",
        V311,
        packet(0x30, topic(b"a/\xff") + b"p"),
        publish_result("a/\ufffd", 0, b"p"),
    ),
    ("connack", V311, b"\x20\x02\x01\x00", ([], [], [], [CONNACK])),
    (
        "connack refusing: parsed, refused by accepted_connack",
        V311,
        b"\x20\x02\x00\x05",
        ([], [], [], [2]),
    ),
    ("puback", V311, b"\x40\x02\x00\x01", ([], [], [], [4])),
    ("suback", V311, b"\x90\x03\x00\x01\x01", ([], [], [], [9])),
    ("suback failure code", V311, b"\x90\x03\x00\x01\x80", ([], [], [], [9])),
    ("unsuback", V311, b"\xb0\x02\x00\x01", ([], [], [], [11])),
    ("pingresp", V311, b"\xd0\x00", ([], [], [], [13])),
    (
        "v5 publish, properties",
        V5,
        packet(0x32, topic(b"t") + b"\x00\x07" + b"\x02\x01\x01" + b"{}"),
        publish_result("t", 7, b"{}"),
    ),
    (
        "v5 publish, no properties",
        V5,
        packet(0x30, topic(b"t") + b"\x00" + b"p"),
        publish_result("t", 0, b"p"),
    ),
    (
        "v5 publish, 2-byte property length",
        V5,
        packet(0x30, topic(b"t") + varint(len(USER_PROPERTY)) + USER_PROPERTY + b"p"),
        publish_result("t", 0, b"p"),
    ),
    ("v5 connack", V5, b"\x20\x03\x00\x00\x00", ([], [], [], [2])),
    ("v5 puback, reason omitted", V5, b"\x40\x02\x00\x01", ([], [], [], [4])),
    ("v5 puback, no matching subscribers", V5, b"\x40\x03\x00\x01\x10", ([], [], [], [4])),
    ("v5 puback, reason and properties", V5, b"\x40\x04\x00\x01\x00\x00", ([], [], [], [4])),
    ("v5 suback", V5, b"\x90\x04\x00\x01\x00\x01", ([], [], [], [9])),
    ("v5 disconnect", V5, b"\xe0\x01\x8b", ([], [], [], [14])),
    ("v5 auth", V5, b"\xf0\x00", ([], [], [], [15])),
]

INVALID: list[tuple[str, int, bytes, str]] = [
    ("publish, remaining length 0", V311, b"\x30\x00", "no topic length"),
    ("publish, remaining length 1", V311, b"\x30\x01\x00", "no topic length"),
    ("topic length past the end", V311, b"\x30\x03\x00\x05a", "topic runs past the end"),
    ("empty topic", V311, b"\x30\x02\x00\x00", "empty topic"),
    ("qos 1 without packet id", V311, b"\x32\x03\x00\x01t", "without a packet id"),
    ("qos 1, half a packet id", V311, b"\x32\x04\x00\x01t\x00", "without a packet id"),
    ("qos 1, packet id 0", V311, b"\x32\x05\x00\x01t\x00\x00", "or with id 0"),
    ("qos 2", V311, packet(0x34, topic(b"t") + b"\x00\x01"), "QoS 2"),
    ("qos 3 (both bits)", V311, packet(0x36, topic(b"t") + b"\x00\x01"), "QoS 3"),
    ("qos 0 with DUP", V311, packet(0x38, topic(b"t")), "DUP"),
    ("remaining length of 5 bytes", V311, b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    ("remaining length not minimal", V311, b"\x30\x80\x00", "shortest encoding"),
    ("packet type 0", V311, b"\x00\x00", "unexpected reserved-type-0"),
    ("CONNECT from the server", V311, b"\x10\x00", "unexpected CONNECT"),
    ("SUBSCRIBE from the server", V311, b"\x82\x02\x00\x01", "unexpected SUBSCRIBE"),
    ("PINGREQ from the server", V311, b"\xc0\x00", "unexpected PINGREQ"),
    ("PUBREC (QoS 2 flow)", V311, b"\x50\x02\x00\x01", "unexpected PUBREC"),
    ("PUBREL (QoS 2 flow)", V311, b"\x62\x02\x00\x01", "unexpected PUBREL"),
    ("DISCONNECT in 3.1.1", V311, b"\xe0\x00", "unexpected DISCONNECT"),
    ("AUTH in 3.1.1", V311, b"\xf0\x00", "unexpected AUTH"),
    ("connack of 3 bytes in 3.1.1", V311, b"\x20\x03\x00\x00\x00", "CONNACK with a remaining"),
    ("pingresp with a body", V311, b"\xd0\x01\x00", "PINGRESP with a remaining"),
    ("puback with flags", V311, b"\x42\x02\x00\x01", "PUBACK with reserved flags"),
    ("suback without a code", V311, b"\x90\x02\x00\x01", "SUBACK with a remaining"),
    ("v5 properties past the end", V5, b"\x30\x05\x00\x01t\x05\x01", "properties run past"),
    ("v5 property length cut", V5, b"\x30\x04\x00\x01t\x80", "variable byte integer"),
    ("v5 property length 5 bytes", V5, b"\x30\x08\x00\x01t\xff\xff\xff\xff\x01", "variable byte"),
    ("v5 publish without properties", V5, b"\x30\x03\x00\x01t", "variable byte integer"),
    ("v5 connack of 2 bytes", V5, b"\x20\x02\x00\x00", "CONNACK with a remaining"),
    ("v5 suback of 3 bytes", V5, b"\x90\x03\x00\x01\x00", "SUBACK with a remaining"),
    ("v5 qos 2", V5, packet(0x34, topic(b"t") + b"\x00\x01\x00"), "QoS 2"),
]


@pytest.mark.parametrize(("name", "version", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_packets(name: str, version: int, data: bytes, expected: Result) -> None:
    parsed = PacketReader(version).feed(data)
    got = (parsed.topics, parsed.packet_ids, parsed.payloads, [c.type for c in parsed.controls])
    assert got == expected
    # the same bytes one at a time parse the same (every packet straddles many reads)
    reader = PacketReader(version)
    pieces = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert [t for p in pieces for t in p.topics] == expected[0]
    assert [p for piece in pieces for p in piece.payloads] == expected[2]


@pytest.mark.parametrize(("name", "version", "data", "error"), INVALID, ids=[v[0] for v in INVALID])
def test_invalid_packets(name: str, version: int, data: bytes, error: str) -> None:
    with pytest.raises(MqttProtocolError, match=re.escape(error)):
        PacketReader(version).feed(data)
    # also when the packet arrives after a good one, in pieces
    good = b"\xd0\x00"
    reader = PacketReader(version)
    with pytest.raises(MqttProtocolError, match=re.escape(error)):
        for i in range(0, len(good + data), 2):
            reader.feed((good + data)[i : i + 2])


def test_a_control_packet_over_the_maximum_is_refused() -> None:
    reader = PacketReader(V5, max_packet_size=100)
    with pytest.raises(MqttProtocolError, match=r"DISCONNECT of 104 bytes exceeds"):
        reader.feed(b"\xe0\x66")  # remaining length 102 + 2: the body never needs to arrive


PUBLISH_VALID = [row for row in VALID if row[2][0] >> 4 == 3]
PUBLISH_INVALID = [row for row in INVALID if row[2][0] >> 4 == 3]


@pytest.mark.parametrize("keep", [8, 9, 12, 10_000])
@pytest.mark.parametrize(
    ("name", "version", "data", "expected"), PUBLISH_VALID, ids=[v[0] for v in PUBLISH_VALID]
)
def test_valid_publishes_over_the_maximum_are_read_through(
    name: str, version: int, data: bytes, expected: Result, keep: int
) -> None:
    """Each valid PUBLISH, one byte over the limit: the same topic (cut to what is kept) and
    packet id, the start of its payload, and its size (exact once its start was kept)."""
    reader = PacketReader(version, max_packet_size=len(data) - 1, oversize_keep=keep)
    pieces = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    topics = [t for p in pieces for t in p.topics]
    assert expected[0][0].startswith(topics[0])
    assert [i for p in pieces for i in p.packet_ids] == expected[1]
    (payload,) = [p for piece in pieces for p in piece.payloads]
    assert isinstance(payload, OversizedPayload)
    assert expected[2][0].startswith(bytes(payload))
    assert len(payload) >= len(expected[2][0])
    if keep >= len(data) - len(expected[2][0]):  # header, topic, id and properties kept
        assert len(payload) == len(expected[2][0])
    assert reader.held_bytes == 0


@pytest.mark.parametrize(
    ("name", "version", "data", "error"), PUBLISH_INVALID, ids=[v[0] for v in PUBLISH_INVALID]
)
def test_invalid_publishes_over_the_maximum_are_refused_the_same(
    name: str, version: int, data: bytes, error: str
) -> None:
    """One byte over the limit and read through, what is kept (all but its last byte) is
    checked like any packet. (Past the kept bytes, the topic length and packet id are read.)"""
    reader = PacketReader(version, max_packet_size=len(data) - 1)
    with pytest.raises(MqttProtocolError, match=re.escape(error)):
        for i in range(len(data)):
            reader.feed(data[i : i + 1])


CONNACK_PROPERTIES = (
    b"\x13\x00\x0a"  # server keep alive 10
    b"\x21\x00\x14"  # receive maximum 20
    b"\x27\x00\x00\x10\x00"  # maximum packet size 4096
    b"\x22\x00\x0a"  # topic alias maximum (noted, unused)
    b"\x26\x00\x01k\x00\x01v"  # a user property
    b"\x26\x00\x01k\x00\x01w"  # user properties may repeat
    b"\x1f\x00\x02ok"  # reason string
)


def v5_connack(code: int, properties: bytes, flags: int = 0) -> Control:
    return Control(CONNACK, bytes([flags, code]) + varint(len(properties)) + properties)


def test_v5_connack_properties_are_read() -> None:
    connack = accepted_connack(v5_connack(0, CONNACK_PROPERTIES, flags=1), V5)
    assert connack.session_present
    assert (connack.server_keep_alive, connack.receive_maximum) == (10, 20)
    assert (connack.maximum_packet_size, connack.reason_string) == (4096, "ok")
    plain = accepted_connack(v5_connack(0, b""), V5)
    assert (plain.server_keep_alive, plain.receive_maximum, plain.maximum_packet_size) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("control", "version", "message"),
    [
        (Control(CONNACK, b"\x00\x05"), V311, "0x05 not authorized"),
        (Control(CONNACK, b"\x00\x04"), V311, "0x04 bad user name or password"),
        (v5_connack(0x86, b""), V5, "0x86 bad user name or password"),
        (v5_connack(0x87, b"\x1f\x00\x04acl!"), V5, "0x87 not authorized (acl!)"),
        (v5_connack(0x8A, b""), V5, "0x8a banned"),
        (v5_connack(0xFE, b""), V5, "0xfe unknown code"),
    ],
)
def test_refusals_name_the_code(control: Control, version: int, message: str) -> None:
    with pytest.raises(MqttError, match=re.escape(message)) as caught:
        accepted_connack(control, version)
    assert not isinstance(caught.value, MqttProtocolError)  # a refusal, not a broken packet


@pytest.mark.parametrize(
    ("control", "version", "error"),
    [
        (Control(4, b"\x00\x01"), V311, "expected CONNACK, got PUBACK"),
        (Control(CONNACK, b"\x00\x06"), V311, "return code 6"),
        (Control(CONNACK, b"\x02\x00"), V311, "reserved flags"),
        (Control(CONNACK, b"\x01\x05"), V311, "with session present"),
        (v5_connack(0x10, b""), V5, "not a CONNACK code"),
        (v5_connack(0, b"\x7f\x00"), V5, "unknown MQTT 5 property 0x7f"),
        (v5_connack(0, b"\x13\x00\x01\x13\x00\x02"), V5, "0x13 given twice"),
        (v5_connack(0, b"\x27\x00\x00"), V5, "runs past its properties"),
        (v5_connack(0, b"\x1f\x00\x09ab"), V5, "runs past its properties"),
        (v5_connack(0, b"\x21\x00\x00"), V5, "Receive Maximum or Maximum Packet Size of 0"),
        (Control(CONNACK, b"\x00\x00\x05\x13"), V5, "properties run past"),
        (Control(CONNACK, b"\x00\x00\x00\x99"), V5, "bytes after its properties"),
    ],
)
def test_malformed_connacks(control: Control, version: int, error: str) -> None:
    with pytest.raises(MqttProtocolError, match=re.escape(error)):
        parse_connack(control, version)


def test_suback_and_disconnect() -> None:
    assert suback_codes(Control(9, b"\x00\x01\x01"), V311, packet_id=1) == [1]
    assert suback_codes(Control(9, b"\x00\x01\x03\x1f\x00\x00\x80"), V5) == [0x80]
    with pytest.raises(MqttProtocolError, match="SUBACK for packet id 2, not 1"):
        suback_codes(Control(9, b"\x00\x02\x01"), V311, packet_id=1)
    with pytest.raises(MqttProtocolError, match="properties run past"):
        suback_codes(Control(9, b"\x00\x01\x09\x00"), V5)
    with pytest.raises(MqttProtocolError, match="without a return code"):
        suback_codes(Control(9, b"\x00\x01\x00"), V5)
    assert disconnect_reason(Control(14, b""), V5) == "0x00 normal disconnection"
    assert disconnect_reason(Control(14, b"\x8b"), V5) == "0x8b server shutting down"
    quota = b"\x97\x05\x1f\x00\x02hi"
    assert disconnect_reason(Control(14, quota), V5) == "0x97 quota exceeded (hi)"
    with pytest.raises(MqttProtocolError):
        disconnect_reason(Control(14, b"\x8b\x05\x1f"), V5)
