"""Control packets from the broker, read field by field: CONNACK (with its MQTT 5 properties:
Server Keep Alive, Receive Maximum, Maximum Packet Size), SUBACK, PUBACK and DISCONNECT reason
codes, each named as in the specification.

Like :mod:`cityflux.mqtt.codec`, every length is checked against the packet's end and
anything malformed raises :class:`MqttProtocolError`; a refusal (a CONNACK code) is an
``MqttError`` naming the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cityflux.errors import MqttError, MqttProtocolError
from cityflux.mqtt.codec import (
    CONNACK,
    PACKET_NAMES,
    SUBACK,
    V5,
    Control,
    read_varint,
    skip_properties,
)

# CONNACK return codes (3.1.1 section 3.2.2.3) and MQTT 5 reason codes (section 2.4).
CONNACK_CODES_V311: Final = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
REASON_CODES_V5: Final = {
    0x00: "normal disconnection",
    0x04: "disconnect with will message",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}

# MQTT 5 property identifiers (section 2.2.2.2) and how their values are encoded.
_BYTE, _TWO, _FOUR, _VARINT, _TEXT, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final = {
    0x01: _BYTE,  # payload format indicator
    0x02: _FOUR,  # message expiry interval
    0x03: _TEXT,  # content type
    0x08: _TEXT,  # response topic
    0x09: _BINARY,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x11: _FOUR,  # session expiry interval
    0x12: _TEXT,  # assigned client identifier
    0x13: _TWO,  # server keep alive
    0x15: _TEXT,  # authentication method
    0x16: _BINARY,  # authentication data
    0x17: _BYTE,  # request problem information
    0x18: _FOUR,  # will delay interval
    0x19: _BYTE,  # request response information
    0x1A: _TEXT,  # response information
    0x1C: _TEXT,  # server reference
    0x1F: _TEXT,  # reason string
    0x21: _TWO,  # receive maximum
    0x22: _TWO,  # topic alias maximum
    0x23: _TWO,  # topic alias
    0x24: _BYTE,  # maximum QoS
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property (may repeat; skipped)
    0x27: _FOUR,  # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifiers available
    0x2A: _BYTE,  # shared subscription available
}
SERVER_KEEP_ALIVE, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE, REASON_STRING = 0x13, 0x21, 0x27, 0x1F
Properties = dict[int, int | str | bytes]


def parse_properties(buf: bytes, pos: int, end: int) -> tuple[Properties, int]:
    """MQTT 5 properties at ``pos`` (their length first): values by identifier, next offset."""
    length, pos = read_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise MqttProtocolError("MQTT 5 properties run past the end of the packet")
    found: Properties = {}
    while pos < stop:
        identifier = buf[pos]
        kind = _PROPERTY_TYPES.get(identifier)
        if kind is None:
            raise MqttProtocolError(f"unknown MQTT 5 property {identifier:#04x}")
        value, pos = _property_value(buf, pos + 1, stop, kind)
        if identifier == 0x26:
            continue
        if identifier in found:
            raise MqttProtocolError(f"MQTT 5 property {identifier:#04x} given twice")
        found[identifier] = value
    return found, stop


def _property_value(buf: bytes, pos: int, stop: int, kind: int) -> tuple[int | str | bytes, int]:
    if kind == _VARINT:
        return read_varint(buf, pos, stop)
    width = {_BYTE: 1, _TWO: 2, _FOUR: 4}.get(kind)
    if width is not None:
        if pos + width > stop:
            raise MqttProtocolError("MQTT 5 property value runs past its properties")
        return int.from_bytes(buf[pos : pos + width], "big"), pos + width
    values: list[bytes] = []
    for _ in range(2 if kind == _PAIR else 1):
        if pos + 2 > stop:
            raise MqttProtocolError("MQTT 5 property value runs past its properties")
        size = (buf[pos] << 8) | buf[pos + 1]
        if pos + 2 + size > stop:
            raise MqttProtocolError("MQTT 5 property value runs past its properties")
        values.append(bytes(buf[pos + 2 : pos + 2 + size]))
        pos += 2 + size
    if kind == _BINARY:
        return values[0], pos
    return " ".join(v.decode("utf-8", "replace") for v in values), pos


def reason_name(code: int, version: int) -> str:
    """``0x87 not authorized``: a CONNACK or reason code with its name from the specification."""
    names = REASON_CODES_V5 if version == V5 else CONNACK_CODES_V311
    return f"{code:#04x} {names.get(code, 'unknown code')}"


@dataclass(frozen=True, slots=True)
class Connack:
    """A CONNACK: its code and the MQTT 5 limits the server announced (None: not sent)."""

    session_present: bool
    code: int
    server_keep_alive: int | None = None  # replaces our keep alive (MQTT 5 section 3.2.2.3.14)
    receive_maximum: int | None = None  # QoS 1 publishes we may have in flight to the server
    maximum_packet_size: int | None = None  # the largest packet the server accepts from us
    reason_string: str | None = None


def parse_connack(control: Control, version: int) -> Connack:
    """The CONNACK's fields; :class:`MqttProtocolError` if it is malformed."""
    if control.type != CONNACK:
        raise MqttProtocolError(f"expected CONNACK, got {PACKET_NAMES[control.type]}")
    body = control.body
    if len(body) < 2:
        raise MqttProtocolError("CONNACK shorter than 2 bytes")
    flags, code = body[0], body[1]
    if flags & 0xFE:
        raise MqttProtocolError(f"CONNACK with reserved flags {flags:#04x}")
    if code and flags:
        raise MqttProtocolError("CONNACK refusing the connection with session present")
    if version != V5:
        if len(body) != 2 or code > 5:
            raise MqttProtocolError(f"malformed MQTT 3.1.1 CONNACK (return code {code})")
        return Connack(bool(flags), code)
    if 0 < code < 0x80:
        raise MqttProtocolError(f"CONNACK with reason code {code:#04x}, not a CONNACK code")
    props, stop = parse_properties(body, 2, len(body))
    if stop != len(body):
        raise MqttProtocolError("CONNACK has bytes after its properties")
    keep_alive, receive_max = props.get(SERVER_KEEP_ALIVE), props.get(RECEIVE_MAXIMUM)
    max_size, reason = props.get(MAXIMUM_PACKET_SIZE), props.get(REASON_STRING)
    if receive_max == 0 or max_size == 0:
        raise MqttProtocolError("CONNACK with a Receive Maximum or Maximum Packet Size of 0")
    return Connack(
        bool(flags),
        code,
        keep_alive if isinstance(keep_alive, int) else None,
        receive_max if isinstance(receive_max, int) else None,
        max_size if isinstance(max_size, int) else None,
        reason if isinstance(reason, str) else None,
    )


def accepted_connack(control: Control, version: int) -> Connack:
    """The CONNACK if it accepts the connection; ``MqttError`` naming the code if not."""
    connack = parse_connack(control, version)
    if connack.code:
        reason = f" ({connack.reason_string})" if connack.reason_string else ""
        raise MqttError(
            f"broker refused the connection: {reason_name(connack.code, version)}{reason}"
        )
    return connack


def connack_result(control: Control, version: int) -> tuple[bool, int]:
    """(session present, return/reason code) of a CONNACK."""
    connack = parse_connack(control, version)
    return connack.session_present, connack.code


def suback_codes(control: Control, version: int, packet_id: int | None = None) -> list[int]:
    """The SUBACK's return/reason codes, one per topic filter subscribed."""
    if control.type != SUBACK:
        raise MqttProtocolError(f"expected SUBACK, got {PACKET_NAMES[control.type]}")
    body = control.body
    if len(body) < 3:
        raise MqttProtocolError("SUBACK without a return code")
    if packet_id is not None and (body[0] << 8) | body[1] != packet_id:
        raise MqttProtocolError(f"SUBACK for packet id {(body[0] << 8) | body[1]}, not {packet_id}")
    start = skip_properties(body, 2, len(body)) if version == V5 else 2
    if start >= len(body):
        raise MqttProtocolError("SUBACK without a return code")
    return list(body[start:])


def puback_reason(control: Control, version: int) -> int:
    """A PUBACK's reason code (always 0 in 3.1.1; >= 0x80: the broker refused the message)."""
    body = control.body
    if version != V5 or len(body) < 3:
        return 0
    if len(body) > 3:
        parse_properties(body, 3, len(body))
    return body[2]


def disconnect_reason(control: Control, version: int) -> str:
    """Why the broker sent DISCONNECT (MQTT 5): the reason code, its name and reason string."""
    body = control.body
    code = body[0] if body else 0
    text = ""
    if len(body) > 1:
        props, _ = parse_properties(body, 1, len(body))
        reason = props.get(REASON_STRING)
        text = f" ({reason})" if isinstance(reason, str) else ""
    return reason_name(code, version) + text
