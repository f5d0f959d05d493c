"""Every rejection reason that decode and validate give, with the message a device owner reads,
straight from cityflux/ingest/decode.py and cityflux/ingest/validate.py (no broker, no
database: tests/integration/test_rejections.py follows the same input through the servers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import pytest

from cityflux.config import Config
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Rejection
from cityflux.model.contract import Reason

NOW_NS = 1_795_571_000 * 10**9
NOW_MS = NOW_NS // 1_000_000
CONFIG = Config()
WINDOW = "[now - 2592000 s, now + 300 s]"  # ingest.max_past_s, ingest.max_future_s
ID = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
POLE = "cityflux/v1/centre/pole/pole-0001"
MANHOLE = "cityflux/v1/centre/manhole/mh-0001"
TRAFFIC = "cityflux/v1/centre/traffic/det-0001"
STATUS = f"{POLE}/status"
GOOD = f'{{"ts": {NOW_MS}, "pm25_ugm3": 10.0}}'.encode()


@dataclass(frozen=True, slots=True)
class Judged:
    accepted: dict[str, int]  # readings per kind
    rejections: list[Rejection]


def judge(messages: Sequence[tuple[str, bytes]], config: Config = CONFIG) -> Judged:
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    decoded = decoder.decode([t for t, _ in messages], [p for _, p in messages], NOW_NS)
    rejections = list(decoded.rejections)
    accepted = {}
    for kind, columns in decoded.columns.items():
        good, bad = validate(columns, config.ingest, NOW_NS)
        rejections += bad
        accepted[kind] = good.readings()
    return Judged({k: n for k, n in accepted.items() if n}, rejections)


def lane(number: int = 1, count: int = 1) -> str:
    return f'{{"lane": {number}, "count": {count}, "occupancy_pct": 5.0}}'


def traffic(*lanes: str, interval_s: object = 60) -> bytes:
    return f'{{"ts": {NOW_MS}, "interval_s": {interval_s}, "lanes": [{", ".join(lanes)}]}}'.encode()


# (case, topic, payload, reason, rejected reading or None for the whole message, message);
# a message starting with "~" is a part of the text msgspec words (its wording may change)
CASES: list[tuple[str, str, bytes, Reason, int | None, str]] = [
    (
        "not utf-8",
        POLE,
        b'{"ts": 1, "pm25_ugm3": "\xff\xfe"}',
        Reason.INVALID_UTF8,
        None,
        "payload is not UTF-8: invalid start byte at byte 24",
    ),
    (
        "not utf-8 in a typed string",
        POLE,
        b'{"ts": 1, "device_id": "\xff"}',
        Reason.INVALID_UTF8,
        None,
        "payload is not UTF-8: invalid start byte at byte 24",
    ),
    ("truncated", POLE, b'{"ts": 1, "pm25_ugm3": 1', Reason.INVALID_JSON, None, "~truncated"),
    (
        "NaN",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": NaN}}'.encode(),
        Reason.INVALID_JSON,
        None,
        "~(NaN and Infinity are not JSON)",
    ),
    ("trailing", POLE, GOOD + b"}{", Reason.INVALID_JSON, None, "~trailing characters"),
    (
        "deeply nested",
        POLE,
        b"[" * 100_000 + b"]" * 100_000,
        Reason.INVALID_JSON,
        None,
        "JSON nested too deeply",
    ),
    (
        "status not json",
        STATUS,
        b'{"state": ',
        Reason.INVALID_JSON,
        None,
        "~(NaN and Infinity are not JSON)",
    ),
    (
        "over max_payload_bytes",
        POLE,
        b'{"x": "' + b"a" * 262_144 + b'"}',
        Reason.TOO_LARGE,
        None,
        "payload of 262153 bytes exceeds 262144",
    ),
    (
        "status over max_payload_bytes",
        STATUS,
        b" " * 262_145,
        Reason.TOO_LARGE,
        None,
        "payload of 262145 bytes exceeds 262144",
    ),
    (
        "over max_readings_per_message",
        POLE,
        b"[" + b",".join([GOOD] * 1_001) + b"]",
        Reason.TOO_LARGE,
        None,
        "1001 readings in one message exceed 1000",
    ),
    (
        "outside the root",
        "other/v1/centre/pole/p1",
        GOOD,
        Reason.BAD_TOPIC,
        None,
        "topic is not under cityflux/v1/",
    ),
    (
        "too deep",
        f"{POLE}/extra",
        GOOD,
        Reason.BAD_TOPIC,
        None,
        "expected cityflux/v1/{district}/{kind}/{device_id}[/status], got 4 levels",
    ),
    (
        "id with comma",
        "cityflux/v1/centre/pole/a,b",
        GOOD,
        Reason.BAD_TOPIC,
        None,
        f"device_id 'a,b' must match {ID}",
    ),
    (
        "district with space",
        "cityflux/v1/old town/pole/p1",
        GOOD,
        Reason.BAD_TOPIC,
        None,
        f"district 'old town' must match {ID}",
    ),
    (
        "unknown kind",
        "cityflux/v1/centre/bin/b1",
        GOOD,
        Reason.UNKNOWN_KIND,
        None,
        "kind 'bin' is not one of pole, manhole, traffic",
    ),
    (
        "mistyped",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": "high"}}'.encode(),
        Reason.SCHEMA,
        None,
        "~at `$.pm25_ugm3`",
    ),
    (
        "unknown field",
        POLE,
        f'{{"ts": {NOW_MS}, "pm2_5": 3.0}}'.encode(),
        Reason.SCHEMA,
        None,
        "~unknown field `pm2_5`",
    ),
    (
        "missing interval",
        TRAFFIC,
        f'{{"ts": {NOW_MS}, "lanes": [{lane()}]}}'.encode(),
        Reason.SCHEMA,
        None,
        "~missing required field `interval_s`",
    ),
    ("scalar", POLE, b"42", Reason.SCHEMA, None, "~Expected `object`, got `int`"),
    ("empty array", POLE, b"[]", Reason.SCHEMA, None, "empty array: no readings"),
    (
        "no measurement",
        POLE,
        f'{{"ts": {NOW_MS}}}'.encode(),
        Reason.SCHEMA,
        0,
        "reading carries no measurement field",
    ),
    (
        "no lanes",
        TRAFFIC,
        traffic(),
        Reason.SCHEMA,
        0,
        "lanes is empty",
    ),
    (
        "17 lanes",
        TRAFFIC,
        traffic(*(lane(n % 16 + 1) for n in range(17))),
        Reason.SCHEMA,
        0,
        "17 lanes exceed 16",
    ),
    (
        "lane twice",
        TRAFFIC,
        traffic(lane(2), lane(2)),
        Reason.SCHEMA,
        0,
        "a lane number appears twice",
    ),
    (
        "duplicate key",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "pm25_ugm3": 900}}'.encode(),
        Reason.SCHEMA,
        None,
        "duplicate key pm25_ugm3",
    ),
    (
        "status state",
        STATUS,
        b'{"state": "sleeping"}',
        Reason.SCHEMA,
        None,
        "state 'sleeping' is not one of online, offline",
    ),
    (
        "status shape",
        STATUS,
        b'{"online": true}',
        Reason.SCHEMA,
        None,
        'status payload must be {"state": "online"|"offline", "ts": ...}',
    ),
    (
        "status duplicate key",
        STATUS,
        b'{"state": "online", "state": "offline"}',
        Reason.SCHEMA,
        None,
        "duplicate key state",
    ),
    (
        "above the range",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1500}}'.encode(),
        Reason.OUT_OF_RANGE,
        0,
        "pm25_ugm3=1500.0 outside [0, 1000] µg/m³",
    ),
    (
        "below the range",
        POLE,
        f'{{"ts": {NOW_MS}, "noise_dba": 19.9}}'.encode(),
        Reason.OUT_OF_RANGE,
        0,
        "noise_dba=19.9 outside [20, 140] dB(A)",
    ),
    (
        "manhole tilt",
        MANHOLE,
        f'{{"ts": {NOW_MS}, "tilt_deg": 91}}'.encode(),
        Reason.OUT_OF_RANGE,
        0,
        "tilt_deg=91.0 outside [0, 90] °",
    ),
    (
        "lane number",
        TRAFFIC,
        traffic(lane(0)),
        Reason.OUT_OF_RANGE,
        0,
        "lane=0 outside [1, 16] -",
    ),
    (
        "count over capacity",
        TRAFFIC,
        traffic(lane(1, 61)),
        Reason.OUT_OF_RANGE,
        0,
        "count=61 exceeds 1 vehicle per second per lane over interval_s=60",
    ),
    (
        "float overflow",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1e400}}'.encode(),
        Reason.OUT_OF_RANGE,
        None,
        "~Number out of range - at `$.pm25_ugm3`",
    ),
    (
        "integer over int64",
        TRAFFIC,
        traffic(lane(), interval_s=2**64),
        Reason.OUT_OF_RANGE,
        None,
        "~Expected `int` <= 9223372036854775807",
    ),
    (
        "future",
        POLE,
        f'{{"ts": {NOW_MS + 301_000}, "pm25_ugm3": 1}}'.encode(),
        Reason.BAD_TIMESTAMP,
        0,
        f"timestamp {NOW_NS + 301 * 10**9} ns is outside {WINDOW}",
    ),
    (
        "epoch zero",
        POLE,
        b'{"ts": 1, "pm25_ugm3": 1}',
        Reason.BAD_TIMESTAMP,
        0,
        f"timestamp 1000000 ns is outside {WINDOW}",
    ),
    (
        "no timestamp",
        POLE,
        b'{"pm25_ugm3": 1}',
        Reason.BAD_TIMESTAMP,
        0,
        "timestamp missing or unreadable: give ts (epoch ms or RFC 3339) or ts_ns",
    ),
    (
        "unreadable timestamp",
        POLE,
        b'{"ts": "yesterday", "pm25_ugm3": 1}',
        Reason.BAD_TIMESTAMP,
        0,
        "timestamp missing or unreadable: give ts (epoch ms or RFC 3339) or ts_ns",
    ),
    (
        "beyond int64 ns",
        POLE,
        b'{"ts": 1' + b"0" * 30 + b', "pm25_ugm3": 1}',
        Reason.BAD_TIMESTAMP,
        0,
        f"timestamp outside what int64 ns hold (1677 to 2262), so outside {WINDOW}",
    ),
    (
        "status from 1970",
        STATUS,
        b'{"state": "online", "ts": 1}',
        Reason.BAD_TIMESTAMP,
        0,
        f"timestamp 1000000 ns is outside {WINDOW}",
    ),
    (
        "other device",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "device_id": "pole-0002"}}'.encode(),
        Reason.MISMATCH,
        0,
        "payload says device_id='pole-0002' kind=None, topic says device_id='pole-0001' "
        "kind='pole'",
    ),
    (
        "other kind claimed",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "kind": "manhole"}}'.encode(),
        Reason.MISMATCH,
        0,
        "payload says device_id=None kind='manhole', topic says device_id='pole-0001' kind='pole'",
    ),
    (
        "a pole reading on a manhole topic",
        MANHOLE,
        GOOD,
        Reason.MISMATCH,
        None,
        "payload is a pole reading on a manhole topic",
    ),
]

# given by other stages: the sink (write_rejected), analytics (too_late), the error boundary
NOT_FROM_DECODE_OR_VALIDATE = {
    Reason.WRITE_REJECTED,
    Reason.TOO_LATE,
    Reason.INTERNAL_ERROR,
    Reason.REDELIVERED,  # the JetStream source, for a message never settled
}


def test_every_reason_of_decode_and_validate_has_a_case() -> None:
    assert {case[3] for case in CASES} == set(Reason) - NOT_FROM_DECODE_OR_VALIDATE


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "reading", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_rejection(
    topic: str, payload: bytes, reason: Reason, reading: int | None, message: str
) -> None:
    judged = judge([(topic, payload)])
    assert judged.accepted == {}
    assert len(judged.rejections) == 1, judged.rejections
    rejection = judged.rejections[0]
    assert (rejection.reason, rejection.index, rejection.reading) == (reason, 0, reading)
    if message.startswith("~"):
        assert message[1:] in rejection.message
    else:
        assert rejection.message == message


def test_each_rejection_names_its_message_in_a_mixed_batch() -> None:
    """The same cases in one batch, good messages between them: indices stay exact."""
    messages: list[tuple[str, bytes]] = []
    for _, topic, payload, *_ in CASES:
        messages += [(topic, payload), (POLE, GOOD)]
    judged = judge(messages)
    assert judged.accepted == {"pole": len(CASES)}
    found = sorted((r.index, r.reason) for r in judged.rejections)
    assert found == [(2 * i, case[3]) for i, case in enumerate(CASES)]


# -- valid input ---------------------------------------------------------------------------------
def test_the_valid_forms_pass() -> None:
    judged = judge(
        [
            (POLE, GOOD),
            (POLE, b"[" + b",".join([GOOD] * 1_000) + b"]"),  # at max_readings_per_message
            (MANHOLE, f'{{"ts_ns": {NOW_NS}, "tilt_deg": 90, "cover_open": true}}'.encode()),
            (TRAFFIC, traffic(*(lane(n, 60) for n in range(1, 17)))),  # 16 lanes at capacity
            (STATUS, b'{"state": "offline"}'),
            (f"{MANHOLE}/status", f'{{"state": "online", "ts": {NOW_MS}}}'.encode()),
            ("cityflux/v1/deadletter/schema", b"not ours to judge"),  # our own topic: ignored
        ]
    )
    assert judged.rejections == []
    assert judged.accepted == {"pole": 1_001, "manhole": 1, "traffic": 1, "status": 2}


@pytest.mark.parametrize(
    ("offset_ns", "accepted"),
    [
        (300 * 10**9, True),  # now + max_future_s
        (300 * 10**9 + 1, False),
        (-2_592_000 * 10**9, True),  # now - max_past_s
        (-2_592_000 * 10**9 - 1, False),
    ],
)
def test_the_time_window_edges(offset_ns: int, accepted: bool) -> None:
    judged = judge([(POLE, f'{{"ts_ns": {NOW_NS + offset_ns}, "pm25_ugm3": 1}}'.encode())])
    assert judged.accepted == ({"pole": 1} if accepted else {})
    assert [r.reason for r in judged.rejections] == ([] if accepted else [Reason.BAD_TIMESTAMP])


def test_the_window_follows_the_configuration() -> None:
    narrow = msgspec.structs.replace(
        CONFIG, ingest=msgspec.structs.replace(CONFIG.ingest, max_past_s=60, max_future_s=0)
    )
    old = f'{{"ts": {NOW_MS - 61_000}, "pm25_ugm3": 1}}'.encode()
    ahead = f'{{"ts": {NOW_MS + 1}, "pm25_ugm3": 1}}'.encode()
    judged = judge([(POLE, old), (POLE, ahead), (POLE, GOOD)], narrow)
    assert judged.accepted == {"pole": 1}
    assert [(r.index, r.message) for r in judged.rejections] == [
        (0, f"timestamp {NOW_NS - 61 * 10**9} ns is outside [now - 60 s, now + 0 s]"),
        (1, f"timestamp {NOW_NS + 10**6} ns is outside [now - 60 s, now + 0 s]"),
    ]


# -- validate: whole readings, first failed check ----------------------------------------------
def test_one_bad_lane_rejects_its_whole_reading_only() -> None:
    payload = b"[" + traffic(lane(1), lane(2, 61)) + b"," + traffic(lane(1), lane(2)) + b"]"
    judged = judge([(TRAFFIC, payload)])
    assert judged.accepted == {"traffic": 1}
    assert [(r.reason, r.index, r.reading) for r in judged.rejections] == [
        (Reason.OUT_OF_RANGE, 0, 0)
    ]


def test_a_reading_failing_several_checks_is_rejected_once_for_the_first() -> None:
    """The timestamp is checked first, then the fields in contract order."""
    payload = b'{"ts": 1, "pm25_ugm3": -1, "noise_dba": 500}'
    judged = judge([(POLE, payload)])
    assert [(r.reason, r.reading) for r in judged.rejections] == [(Reason.BAD_TIMESTAMP, 0)]
    payload = f'{{"ts": {NOW_MS}, "pm25_ugm3": -1, "noise_dba": 500}}'.encode()
    judged = judge([(POLE, payload)])
    assert [r.message for r in judged.rejections] == ["pm25_ugm3=-1.0 outside [0, 1000] µg/m³"]


def test_bad_readings_of_an_array_are_rejected_alone() -> None:
    payload = (
        f'[{{"ts": {NOW_MS}, "pm25_ugm3": 1}}, {{"ts": {NOW_MS}, "pm25_ugm3": -5}}, '
        f'{{"ts": {NOW_MS}, "pm25_ugm3": "x"}}, {{"ts": {NOW_MS}, "pm25_ugm3": 3}}, '
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1e400}}, {{"pm25_ugm3": 1, "pm25_ugm3": 2}}]'
    ).encode()
    judged = judge([(POLE, GOOD), (POLE, payload)])
    assert judged.accepted == {"pole": 3}
    assert sorted((r.index, r.reading, r.reason) for r in judged.rejections) == [
        (1, 1, Reason.OUT_OF_RANGE),
        (1, 2, Reason.SCHEMA),
        (1, 4, Reason.OUT_OF_RANGE),
        (1, 5, Reason.SCHEMA),
    ]


# -- BUG: a reading is rejected twice ----------------------------------------------------------
@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (POLE, b'{"kind": "manhole"}'),
        (POLE, f'{{"ts": {NOW_MS}, "device_id": "pole-0002"}}'.encode()),
        (MANHOLE, f'[{{"ts": {NOW_MS}, "kind": ""}}]'.encode()),
    ],
)
def test_bug_a_mismatched_reading_without_measurements_is_rejected_once(
    topic: str, payload: bytes
) -> None:
    """BUG (cityflux/ingest/decode.py, _build_columns): a pole or manhole reading whose
    device_id/kind claim disagrees with its topic AND that carries no measurement field is
    rejected twice (mismatch, then schema "reading carries no measurement field"): two dead
    letters and two counts for one reading. _has_measurements rejects every empty row, even
    one _claims_match already rejected (traffic guards this with ``keep[row]``). Fix: reject
    only ``empty & keep`` there."""
    judged = judge([(topic, payload)])
    assert [(r.reason, r.reading) for r in judged.rejections] == [(Reason.MISMATCH, 0)]
