"""The chaos run's load: a simulated city whose every reading can be counted, hostile payloads
and malformed MQTT packets.

Every good reading has a unique (device, timestamp) that follows from its sequence number
``seq`` alone (device ``seq % D``, timestamp ``start + seq / rate``), so the set of readings the
broker acknowledged is one boolean array, and a reading missing from InfluxDB can be named by
device and time without keeping the stream. A message the broker did not acknowledge is sent
again (paho resends unacknowledged QoS 1 messages on reconnect): a duplicate lands on the same
point, so "landed" is a count of distinct readings whatever the redeliveries.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from cityflux.model.citymap import CityMap
from cityflux.model.devices import number_devices

KIND_CODES = ("pole", "manhole", "traffic")
# The field each measurement is counted by: every good reading of that kind carries it.
COUNT_FIELD = {"pole": "pm25_ugm3", "manhole": "battery_pct", "traffic": "count"}
# paho numbers messages 1..65535 without checking which ids are still in use: never have more
# unacknowledged messages than that (a broker outage at 5,000 msg/s fills 30,000 in 6 s; the
# publisher then waits, as a device's bounded buffer would).
MAX_OUTSTANDING = 30_000
POISON_PREFIX = "poison-"


@dataclass(frozen=True, slots=True)
class Devices:
    """The city's devices in a fixed order: ``seq % len`` picks the device of a reading."""

    kind: npt.NDArray[np.int8]  # index into KIND_CODES
    lanes: npt.NDArray[np.int16]  # traffic points per reading (1 for poles and manholes)
    ids: list[str]
    topics: list[str]

    @classmethod
    def of(cls, city: CityMap, root: str) -> Devices:
        numbers = number_devices(city)  # the order the simulator and the analytics use
        lanes_of = {d.id: d.lanes for d in city.detectors}
        kinds = [KIND_CODES.index(kind) for kind in numbers.kind]
        lanes = [
            lanes_of[device] if kind == "traffic" else 1
            for kind, device in zip(numbers.kind, numbers.ids, strict=True)
        ]
        return cls(
            np.array(kinds, np.int8), np.array(lanes, np.int16), numbers.ids, numbers.topics(root)
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Stream:
    """Reading ``seq`` of the run: topic, payload, timestamp (epoch ms)."""

    devices: Devices
    rate: int
    start_ms: int

    def ts_ms(self, seq: int) -> int:
        return self.start_ms + seq * 1000 // self.rate

    def message(self, seq: int) -> tuple[str, bytes]:
        number = seq % len(self.devices)
        kind = KIND_CODES[self.devices.kind[number]]
        ts = self.ts_ms(seq)
        v = seq % 97  # deterministic, plausible values: no alert storm from noise alone
        body: dict[str, object]
        if kind == "pole":
            body = {
                "ts": ts,
                "pm25_ugm3": 20 + v / 10,
                "pm10_ugm3": 40 + v / 10,
                "noise_dba": 50 + v / 20,
                "temperature_c": 21.5,
                "humidity_pct": 60.0,
            }
        elif kind == "manhole":
            body = {
                "ts": ts,
                "cover_open": False,
                "tilt_deg": 1.0,
                "water_level_cm": 10 + v / 10,
                "ch4_pct_lel": 1.0,
                "h2s_ppm": 0.5,
                "battery_pct": 80 + v / 10,
            }
        else:
            lanes = int(self.devices.lanes[number])
            body = {
                "ts": ts,
                "interval_s": 60,
                "lanes": [
                    {"lane": k, "count": 10 + v % 10, "occupancy_pct": 12.0, "speed_kmh": 50.0}
                    for k in range(1, lanes + 1)
                ],
            }
        return self.devices.topics[number], msgspec.json.encode(body)

    def expected_points(self, seqs: npt.NDArray[np.int64]) -> dict[str, int]:
        """Points the readings ``seqs`` become in InfluxDB, per measurement."""
        numbers = seqs % len(self.devices)
        kinds = self.devices.kind[numbers]
        weights = self.devices.lanes[numbers].astype(np.int64)
        return {
            kind: int(weights[kinds == code].sum())
            if kind == "traffic"
            else int((kinds == code).sum())
            for code, kind in enumerate(KIND_CODES)
        }


@dataclass
class CityPublisher:
    """Publishes the stream at ``rate`` msg/s, QoS 1, and records which readings the broker
    acknowledged (PUBACK). Behind schedule (broker down), it catches up at twice the rate."""

    stream: Stream
    total: int
    port: int
    acked: npt.NDArray[np.bool_] = field(init=False)
    published: int = 0
    acked_count: int = 0
    started: float = 0.0
    finished_publishing: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _mid_seq: dict[int, int] = field(default_factory=dict)
    _early: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.acked = np.zeros(self.total, np.bool_)
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"chaos-city-{id(self):x}", clean_session=True
        )
        self._client.max_inflight_messages_set(1_000)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_publish = self._on_publish
        self._thread = threading.Thread(target=self._run, name="chaos-publisher", daemon=True)

    @property
    def outstanding(self) -> int:
        return self.published - self.acked_count

    def start(self) -> None:
        connected = threading.Event()
        self._client.on_connect = lambda *args: connected.set()
        self._client.connect_async("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        connected.wait(30)
        self._thread.start()

    def _on_publish(
        self, client: paho.Client, userdata: object, mid: int, rc: object, props: object
    ) -> None:
        with self._lock:
            seq = self._mid_seq.pop(mid, None)
            if seq is None:  # the PUBACK overtook our bookkeeping of the publish
                self._early.add(mid)
            else:
                self._ack(seq)

    def _ack(self, seq: int) -> None:
        if not self.acked[seq]:
            self.acked[seq] = True
            self.acked_count += 1

    def _publish(self, seq: int) -> None:
        topic, payload = self.stream.message(seq)
        info = self._client.publish(topic, payload, qos=1)
        with self._lock:
            self.published += 1
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._ack(seq)
            else:
                self._mid_seq[info.mid] = seq

    def _run(self) -> None:
        rate = self.stream.rate
        self.started = time.monotonic()
        seq = 0
        while seq < self.total and not self._stop.is_set():
            due = min(self.total, int((time.monotonic() - self.started) * rate))
            room = MAX_OUTSTANDING - self.outstanding
            n = min(due - seq, max(1, rate // 25), room)  # 2x rate in 20 ms slices at most
            if n <= 0:
                time.sleep(0.02)
                continue
            for _ in range(n):
                self._publish(seq)
                seq += 1
            time.sleep(0.02)
        self.finished_publishing = time.monotonic()

    @property
    def achieved_rate(self) -> float:
        end = self.finished_publishing or time.monotonic()
        return self.published / max(end - self.started, 1e-9)

    @property
    def done_publishing(self) -> bool:
        return not self._thread.is_alive()

    def wait_acked(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.done_publishing and self.outstanding == 0:
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.disconnect()
        self._client.loop_stop()


# -- hostile payloads ------------------------------------------------------------------------
BIG = 2**63  # one past int64: numpy conversion overflows (issue 9, point 1)


def _poisons(now_ms: int) -> dict[str, tuple[str, bytes, str]]:
    """name -> (kind of the topic, payload, the dead-letter reason we expect)."""
    lane = '{"lane": %d, "count": %d, "occupancy_pct": 1.0}'
    traffic = '{"ts": %d, "interval_s": %d, "lanes": [%s]}'
    return {
        "ts_9999": ("pole", b'{"ts": "9999-12-31T23:59:59Z", "pm25_ugm3": 1}', "bad_timestamp"),
        "lane_2e63": (
            "traffic",
            (traffic % (now_ms, 60, lane % (BIG, 1))).encode(),
            "out_of_range",
        ),
        "count_2e63": (
            "traffic",
            (traffic % (now_ms, 60, lane % (1, BIG))).encode(),
            "out_of_range",
        ),
        "interval_2e63": (
            "traffic",
            (traffic % (now_ms, BIG, lane % (1, 1))).encode(),
            "out_of_range",
        ),
        "invalid_json": ("pole", b'{"ts": 1, "pm25_ugm3": ', "invalid_json"),
        "invalid_utf8": ("pole", b'{"pm25_ugm3": 1.0, "device_id": "\xff\xfe"}', "invalid_utf8"),
        "oversize": (
            "pole",
            b'{"pm25_ugm3": 1.0, "pad": "' + b"x" * 300_000 + b'"}',
            "too_large",
        ),
    }


POISON_NAMES = tuple(_poisons(0))
EXPECTED_REASON = {name: reason for name, (_, _, reason) in _poisons(0).items()}


def connected_client(client_id: str, port: int, timeout_s: float) -> paho.Client:
    """A paho client with its network loop running, connected (it reconnects by itself);
    publishing before the first CONNACK would fail outright instead of queueing."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(1, 2)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect_async("127.0.0.1", port, keepalive=30)
    client.loop_start()
    connected.wait(timeout_s)
    return client


@dataclass
class HostileInjector:
    """Publishes the poison list, each message on its own device topic (so its dead letter can
    be counted exactly), from its own connection; counts what the broker acknowledged."""

    port: int
    root: str
    district: str
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POISON_NAMES, 0))
    acked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POISON_NAMES, 0))
    _round: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, per_kind: int, timeout_s: float = 90.0) -> str:
        with self._lock:
            self._round += 1
            round_ = self._round
        done: set[int] = set()
        client = connected_client(f"chaos-hostile-{round_}", self.port, timeout_s)
        client.on_publish = lambda client, userdata, mid, *rest: done.add(mid)
        mids: list[tuple[str, int]] = []
        try:
            for name, (kind, payload, _) in _poisons(int(time.time() * 1000)).items():
                for i in range(per_kind):
                    device = f"{POISON_PREFIX}{name.replace('_', '-')}-r{round_}-{i}"
                    topic = f"{self.root}/{self.district}/{kind}/{device}"
                    mids.append((name, client.publish(topic, payload, qos=1).mid))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not all(mid in done for _, mid in mids):
                time.sleep(0.1)
        finally:
            client.disconnect()
            client.loop_stop()
        with self._lock:
            for name, mid in mids:
                self.sent[name] += 1
                self.acked[name] += int(mid in done)
        return f"{sum(mid in done for _, mid in mids)}/{len(mids)} PUBACKed"


# -- malformed packets -----------------------------------------------------------------------
MALFORMED: dict[str, bytes] = {
    # remaining length encoded in 5 bytes (the spec allows 4)
    "remaining_length_5_bytes": b"\x30\xff\xff\xff\xff\x7f",
    # PUBLISH whose topic length (32) runs past the end of its 4-byte body
    "topic_length_past_end": b"\x30\x04\x00\x20ab",
    # QoS 1 PUBLISH with no room for the packet id
    "qos1_without_packet_id": b"\x32\x03\x00\x01a",
    # PUBLISH with remaining length 0 (no topic at all)
    "remaining_length_0": b"\x30\x00",
}


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


def send_malformed(port: int, name: str, packet: bytes, timeout_s: float = 5.0) -> str:
    """Connect over a raw socket, send one malformed packet; what the broker did with us:
    ``disconnected`` (the right answer), ``kept open``, or ``refused``/``no connack``."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except OSError:
        return "refused"
    with sock:
        try:
            sock.sendall(_connect_packet(f"chaos-malformed-{name}"[:23]))
            if sock.recv(4)[:1] != b"\x20":
                return "no connack"
            sock.sendall(packet)
            return "disconnected" if sock.recv(1024) == b"" else "answered"
        except TimeoutError:
            return "kept open"
        except OSError:
            return "disconnected"


@dataclass
class MalformedInjector:
    port: int
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, retry_for_s: float = 30.0) -> str:
        """Each malformed packet once; retried while the broker is down (a restart)."""
        results = []
        for name, packet in MALFORMED.items():
            deadline = time.monotonic() + retry_for_s
            outcome = send_malformed(self.port, name, packet)
            while outcome in ("refused", "no connack") and time.monotonic() < deadline:
                time.sleep(0.5)
                outcome = send_malformed(self.port, name, packet)
            with self._lock:
                per = self.outcomes.setdefault(name, {})
                per[outcome] = per.get(outcome, 0) + 1
            results.append(f"{name}: {outcome}")
        return "; ".join(results)
