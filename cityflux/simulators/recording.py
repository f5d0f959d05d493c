"""Record MQTT traffic to a compact file, and replay it with its timing (docs/simulators.md).

File format (``.cfxrec``): a gzip stream (RFC 1952) holding length-prefixed msgpack frames.
Each frame is a 4-byte big-endian length followed by that many bytes of msgpack.

* frame 0, the header: ``{"format": "cityflux-recording", "version": 1, "source": url,
  "topic": filter, "started_ns": epoch ns of the first message}``
* every other frame, one message: ``[offset_ns, topic, payload, retain]``, ``offset_ns`` the
  receive time after ``started_ns``; payload bytes exactly as received.

gzip keeps the format readable with standard tools (``zcat``) and compresses JSON payloads
about 8-10x; msgspec's msgpack keeps encoding cheap.
"""

from __future__ import annotations

import gzip
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cityflux.config import MqttConfig
from cityflux.errors import CityfluxError
from cityflux.ingest.timestamps import parse_rfc3339

FORMAT: Final = "cityflux-recording"
VERSION: Final = 1
_LENGTH = struct.Struct(">I")


class Header(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    source: str = ""
    topic: str = "#"
    started_ns: int = 0


Record = tuple[int, str, bytes, bool]  # offset_ns, topic, payload, retain


class RecordingWriter:
    def __init__(self, path: Path, header: Header) -> None:
        self._file = gzip.GzipFile(path, "wb", compresslevel=6)  # closed by close()
        self._encoder = msgspec.msgpack.Encoder()
        self._header = header
        self._started = False
        self.count = 0

    def write(self, received_ns: int, topic: str, payload: bytes, retain: bool) -> None:
        if not self._started:  # the header carries the first message's time
            self._header.started_ns = received_ns
            self._frame(self._header)
            self._started = True
        self._frame((received_ns - self._header.started_ns, topic, payload, retain))
        self.count += 1

    def _frame(self, value: Any) -> None:
        body = self._encoder.encode(value)
        self._file.write(_LENGTH.pack(len(body)) + body)

    def close(self) -> None:
        if not self._started:
            self._frame(self._header)
        self._file.close()


def read_recording(path: Path) -> tuple[Header, Iterator[Record]]:
    """The header, and an iterator over the records in order."""
    handle = gzip.GzipFile(path, "rb")  # closed when the records are exhausted
    try:
        header = msgspec.msgpack.decode(_read_frame(handle) or b"", type=Header)
    except (OSError, EOFError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        handle.close()
        raise CityfluxError(f"{path} is not a cityflux recording: {exc}") from exc
    if header.format != FORMAT or header.version != VERSION:
        handle.close()
        raise CityfluxError(f"{path}: unsupported recording {header.format} v{header.version}")
    decoder = msgspec.msgpack.Decoder(tuple[int, str, bytes, bool])

    def records() -> Iterator[Record]:
        with handle:
            while (frame := _read_frame(handle)) is not None:
                yield decoder.decode(frame)

    return header, records()


def _read_frame(handle: gzip.GzipFile) -> bytes | None:
    prefix = handle.read(4)
    if len(prefix) < 4:
        return None
    (length,) = _LENGTH.unpack(prefix)
    body = handle.read(length)
    if len(body) < length:
        raise CityfluxError("recording truncated")
    return body


# -- recording ---------------------------------------------------------------------------------
class Recorder:
    """Subscribes to ``topic`` on any broker (paho: TLS, auth, v3.1.1/v5) and writes a file."""

    def __init__(self, mqtt: MqttConfig, path: Path, topic: str = "#") -> None:
        # the file is opened once the broker took the connection (start): a refused one must
        # not leave an empty recording behind, nor overwrite an earlier one
        self.writer: RecordingWriter | None = None
        self._path, self._header = path, Header(source=mqtt.url, topic=topic)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        v5 = mqtt.protocol == "5"
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"cityflux-record-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        if mqtt.username:
            self._client.username_pw_set(mqtt.username, mqtt.password)
        if mqtt.tls.enabled or mqtt.url.startswith("mqtts://"):
            self._client.tls_set(mqtt.tls.ca_file, mqtt.tls.cert_file, mqtt.tls.key_file)
            self._client.tls_insecure_set(mqtt.tls.insecure)
        self._client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._mqtt = mqtt

    @property
    def count(self) -> int:
        return 0 if self.writer is None else self.writer.count

    def start(self, timeout_s: float = 10.0) -> None:
        self._client.connect(self._mqtt.host, self._mqtt.port, self._mqtt.keepalive_s)
        self.writer = RecordingWriter(self._path, self._header)  # before any message can come
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            self._path.unlink(missing_ok=True)  # nothing recorded: no empty file left
            raise CityfluxError(f"no subscription on {self._mqtt.url} within {timeout_s:.0f}s")

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            assert self.writer is not None  # opened before the network loop started
            self.writer.write(time.time_ns(), message.topic, bytes(message.payload), message.retain)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            if self.writer is not None:
                self.writer.close()


# -- replay ------------------------------------------------------------------------------------
class TimestampShifter:
    """Moves every reading's timestamp by ``delta_ns``: ``ts`` (ms), ``ts_ns``, RFC 3339.

    RFC 3339 strings become ``ts_ns`` integers (same instant, to the nanosecond). Payloads that
    are not JSON objects or arrays of objects pass unchanged: a replay must reproduce rejections.
    """

    def __init__(self, delta_ns: int) -> None:
        self.delta_ns = delta_ns
        self._decoder = msgspec.json.Decoder()
        self._encoder = msgspec.json.Encoder()

    def __call__(self, payload: bytes) -> bytes:
        try:
            value = self._decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return payload
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, dict) for item in items):
            return payload
        changed = [self._shift(item) for item in items]
        if not any(changed):
            return payload
        return self._encoder.encode(value)

    def _shift(self, reading: dict[str, Any]) -> bool:
        ts = reading.get("ts")
        if type(ts) is int:
            reading["ts"] = ts + self.delta_ns // 1_000_000
            return True
        if isinstance(ts, str):
            parsed = parse_rfc3339(ts)
            if parsed is None:
                return False
            reading["ts_ns"] = parsed + self.delta_ns
            del reading["ts"]
            return True
        if type(reading.get("ts_ns")) is int:
            reading["ts_ns"] += self.delta_ns
            return True
        return False


@dataclass(slots=True)
class ReplayPlan:
    speed: float  # math.inf: as fast as possible
    loops: int = 1
    shift_to_now: bool = False


def replay_batches(
    path: Path, plan: ReplayPlan, now_ns: Callable[[], int] = time.time_ns
) -> Iterator[tuple[float, list[tuple[str, bytes, bool]]]]:
    """(wall-clock offset in s, messages due then), in the recording's order, loop after loop.

    Messages due within 2 ms of each other go together, so pacing costs one sleep per batch.
    """
    header, _ = read_recording(path)
    duration_ns = _duration_ns(path)
    loop_ns = duration_ns + 1_000_000_000  # one second between loops
    base_shift = now_ns() - header.started_ns if plan.shift_to_now else 0
    for loop in range(plan.loops):
        shift = base_shift + (loop * loop_ns if plan.shift_to_now else 0)
        shifter = TimestampShifter(shift) if shift else None
        _, records = read_recording(path)
        batch: list[tuple[str, bytes, bool]] = []
        batch_at = -1.0
        for offset_ns, topic, payload, retain in records:
            at = (loop * loop_ns + offset_ns) / 1e9 / plan.speed
            if batch and (at - batch_at > 0.002 or len(batch) >= 5_000):
                yield batch_at, batch
                batch = []
            if not batch:
                batch_at = at
            batch.append((topic, shifter(payload) if shifter else payload, retain))
        if batch:
            yield batch_at, batch


def _duration_ns(path: Path) -> int:
    last = 0
    for offset_ns, *_ in read_recording(path)[1]:
        last = offset_ns
    return last
