"""Everything between the source and the sink for one batch (cityflux/pipeline/transform.py),
without servers: line protocol per measurement, one dead letter per rejection in arrival order,
accepted counts per kind, and the rejection counters."""

from __future__ import annotations

import json
from collections import Counter

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from cityflux.config import Config
from cityflux.ingest.deadletter import DeadLetterFactory
from cityflux.ingest.tabulate import KindRows
from cityflux.model.contract import KIND_FIELDS, KINDS, Reason
from cityflux.model.messages import MessageBatch
from cityflux.observability import Metrics
from cityflux.pipeline.transform import BatchOutcome, Transform
from tests.support import examples

# the examples of docs/contract.md are from 2026-11-25 (epoch ms 1795570800000 on): "now" is a
# few minutes later, so all of them are inside the accepted time window
NOW_NS = 1_795_571_000 * 10**9
ROOT = "cityflux/v1"
POLE = f"{ROOT}/centre/pole/pole-0001"
MANHOLE = f"{ROOT}/centre/manhole/mh-0042"
TRAFFIC = f"{ROOT}/centre/traffic/det-0001"

# verbatim from docs/contract.md
POLE_FULL = (
    b'{"ts": 1795570800000, "lamp_on": false, "lamp_power_w": 0.0, "lamp_fault": false, '
    b'"pm25_ugm3": 38.5, "pm10_ugm3": 61.0, "noise_dba": 64.2, "temperature_c": 11.5, '
    b'"humidity_pct": 72.0}'
)
POLE_RFC3339 = (
    b'{"ts": "2026-11-25T08:30:00.123456789+08:00", "pm25_ugm3": 41.25, "noise_dba": 66.0}'
)
POLE_GATEWAY = b"""[
  {"ts": 1795570800000, "lamp_on": true, "lamp_power_w": 148.5, "noise_dba": 58.1},
  {"ts": 1795570860000, "lamp_on": true, "lamp_power_w": 149.0, "noise_dba": 57.3},
  {"ts": 1795570920000, "lamp_on": true, "lamp_power_w": 0.0, "lamp_fault": true}
]"""
MANHOLE_FULL = (
    b'{"ts_ns": 1795570800123456789, "cover_open": false, "tilt_deg": 1.5, '
    b'"water_level_cm": 12.0, "ch4_pct_lel": 0.0, "h2s_ppm": 0.4, "battery_pct": 87.0, '
    b'"temperature_c": 9.0, "device_id": "mh-0042", "kind": "manhole"}'
)
TRAFFIC_3_LANES = (
    b'{"ts": 1795570860000, "interval_s": 60, "lanes": [{"lane": 1, "count": 21, '
    b'"occupancy_pct": 14.5, "speed_kmh": 42.3}, {"lane": 2, "count": 25, "occupancy_pct": 16.0, '
    b'"speed_kmh": 47.8}, {"lane": 3, "count": 0, "occupancy_pct": 0.0, "speed_kmh": null}]}'
)

# (topic, payload, the rejection it earns or None, the dead letter's reading index)
MIXED: list[tuple[str, bytes, Reason | None, int | None]] = [
    (POLE, POLE_FULL, None, None),
    (POLE, b'{"ts": 1795570800000, "pm25_ugm3": 1', Reason.INVALID_JSON, None),
    (TRAFFIC, TRAFFIC_3_LANES, None, None),
    (POLE, b'{"ts": 1795570800000, "pm25_ugm3": 1500}', Reason.OUT_OF_RANGE, 0),
    (f"{ROOT}/centre/pole/bad id", POLE_FULL, Reason.BAD_TOPIC, None),
    (MANHOLE, MANHOLE_FULL, None, None),
    (POLE, b'{"ts": 1795570800000, "pm25_ugm3": 1, "pm25_ugm3": 2}', Reason.SCHEMA, None),
    (f"{POLE}/status", b'{"state": "online", "ts": 1795570800000}', None, None),
    (f"{ROOT}/riverside/pole/pole-0107", POLE_GATEWAY, None, None),
    (f"{ROOT}/deadletter/schema", b'{"reason": "schema"}', None, None),  # our own: ignored
    (f"{MANHOLE}/status", b'{"state": "offline"}', None, None),
    (POLE, POLE_RFC3339, None, None),
    (TRAFFIC, b'{"ts": 1795570860000, "interval_s": 60, "lanes": []}', Reason.SCHEMA, 0),
]


def config() -> Config:
    base = Config()
    return msgspec.structs.replace(
        base, analytics=msgspec.structs.replace(base.analytics, enabled=False)
    )


def transform(metrics: Metrics) -> Transform:
    c = config()
    letters = DeadLetterFactory(c.mqtt.topic_root, c.ingest.deadletter_prefix_bytes)
    return Transform(c, metrics, letters, analytics=None)


def batch_of(messages: list[tuple[str, bytes]]) -> MessageBatch:
    return MessageBatch(
        topics=[t for t, _ in messages],
        payloads=[p for _, p in messages],
        receipts=list(range(1, len(messages) + 1)),
    )


def measurements(outcome: BatchOutcome) -> Counter[str]:
    return Counter(line.split(",", 1)[0] for line in outcome.lines)


def test_a_mixed_batch() -> None:
    metrics = Metrics()
    outcome = transform(metrics)(batch_of([(t, p) for t, p, _, _ in MIXED]), NOW_NS)
    assert measurements(outcome) == {
        "pole": 1 + 3 + 1,
        "traffic": 3,  # one line per lane
        "manhole": 1,
        "device_status": 2,
        "cityflux_deadletter": 5,
    }
    assert outcome.accepted == {"pole": 5, "traffic": 1, "manhole": 1, "status": 2}
    # exact values of two readings, timestamps included
    assert (
        "pole,device_id=pole-0001,district=centre pm25_ugm3=41.25,noise_dba=66.0 "
        "1795566600123456789" in outcome.lines
    )
    assert (
        "device_status,device_id=mh-0042,district=centre,kind=manhole online=false "
        f"{NOW_NS}"  # a will without a clock is stored at arrival
    ) in outcome.lines

    # each rejection: exactly one dead letter, on its reason's topic, in arrival order
    rejected = [(t, p, r, i) for t, p, r, i in MIXED if r is not None]
    assert [topic for topic, _ in outcome.letters] == [
        f"{ROOT}/deadletter/{reason.value}" for _, _, reason, _ in rejected
    ]
    letters = [json.loads(payload) for _, payload in outcome.letters]
    for (topic, payload, reason, reading), letter in zip(rejected, letters, strict=True):
        assert letter["reason"] == reason.value
        assert (letter["topic"], letter["reading"]) == (topic, reading)
        assert letter["payload"] == payload.decode()
        assert letter["payload_bytes"] == len(payload)
        assert letter["received_ns"] == NOW_NS
        assert letter["message"]
    assert letters[1]["message"] == "pm25_ugm3=1500.0 outside [0, 1000] µg/m³"
    assert letters[3]["message"] == "duplicate key pm25_ugm3"
    assert letters[4]["message"] == "lanes is empty"
    # the dead letters in InfluxDB: reason tag, distinct timestamps in the same order
    dead = [line for line in outcome.lines if line.startswith("cityflux_deadletter,")]
    assert [line.split(" ", 1)[0] for line in dead] == [
        f"cityflux_deadletter,reason={r.value}" for _, _, r, _ in rejected
    ]
    assert [int(line.rsplit(" ", 1)[1]) for line in dead] == [
        NOW_NS + offset for offset in range(len(rejected))
    ]

    expected = Counter(r.value for _, _, r, _ in rejected)
    for reason in Reason:
        assert metrics.value("rejections_total", reason=reason.value) == expected[reason.value]
    assert metrics.value("messages_ignored_total") == 1


def test_rejected_readings_of_an_array_are_lettered_in_arrival_order() -> None:
    metrics = Metrics()
    array = (
        b'[{"ts": 1795570800000, "pm25_ugm3": 1.0}, {"ts": 1795570800001, "pm25_ugm3": -5}, '
        b'{"ts": 1795570800002, "pm25_ugm3": "x"}, {"ts": 1795570800003, "pm25_ugm3": 3.0}, '
        b'{"ts": 1, "pm25_ugm3": 1}]'
    )
    outcome = transform(metrics)(batch_of([(POLE, b"\xff"), (POLE, array)]), NOW_NS)
    letters = [json.loads(payload) for _, payload in outcome.letters]
    assert [(x["reason"], x["reading"]) for x in letters] == [
        ("invalid_utf8", None),
        ("out_of_range", 1),
        ("schema", 2),
        ("bad_timestamp", 4),
    ]
    assert "payload" not in letters[0] and letters[0]["payload_base64"] == "/w=="
    assert outcome.accepted == {"pole": 2}
    assert measurements(outcome) == {"pole": 2, "cityflux_deadletter": 4}


def test_an_empty_batch() -> None:
    outcome = transform(Metrics())(MessageBatch(), NOW_NS)
    assert (outcome.lines, outcome.letters, outcome.accepted) == ([], [], {})


# -- any payload on a device topic: accepted or dead-lettered, never both, never raising ------
NOW_MS = NOW_NS // 1_000_000
_NAMES = sorted({spec.name for specs in KIND_FIELDS.values() for spec in specs})
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.just(NOW_MS),
    st.lists(
        st.fixed_dictionaries(
            {"lane": st.integers(0, 20), "count": st.integers(0, 100)},
            optional={"occupancy_pct": st.floats(0, 100), "speed_kmh": st.none()},
        ),
        max_size=3,
    ),
)
_OBJECTS = st.dictionaries(
    st.sampled_from([*_NAMES, "ts", "ts_ns", "state", "kind", "device_id", "junk"]),
    _VALUES,
    max_size=5,
)
PAYLOADS = st.one_of(
    st.binary(max_size=80).map(lambda b: ("bytes", b)),
    _OBJECTS.map(lambda o: ("object", json.dumps(o).encode())),
    st.lists(_OBJECTS, max_size=3).map(lambda a: ("array", json.dumps(a).encode())),
)
MESSAGES = st.lists(
    st.tuples(st.sampled_from(KINDS), st.booleans(), PAYLOADS), min_size=1, max_size=12
)


@settings(max_examples=examples(150), deadline=None)
@given(MESSAGES)
def test_every_message_is_accepted_or_dead_lettered_exactly_once(
    messages: list[tuple[str, bool, tuple[str, bytes]]],
) -> None:
    # a topic per message, so that lines and letters can be traced back to it
    topics = [
        f"{ROOT}/d/{kind}/dev{i}" + ("/status" if status else "")
        for i, (kind, status, _) in enumerate(messages)
    ]
    metrics = Metrics()
    payloads = [payload for _, _, (_, payload) in messages]
    outcome = transform(metrics)(batch_of(list(zip(topics, payloads, strict=True))), NOW_NS)
    letters = [json.loads(payload) for _, payload in outcome.letters]
    stored = [line for line in outcome.lines if not line.startswith("cityflux_deadletter,")]
    assert len(outcome.lines) - len(stored) == len(letters)
    assert metrics.rejected_total() == len(letters)
    for i, (topic, (_, _, (shape, _))) in enumerate(zip(topics, messages, strict=True)):
        lines = [line for line in stored if f",device_id=dev{i}," in line]
        mine = [letter for letter in letters if letter["topic"] == topic]
        whole = [letter for letter in mine if letter["reading"] is None]
        readings = [letter["reading"] for letter in mine if letter["reading"] is not None]
        assert lines or mine, f"message {i} vanished"
        assert len(readings) == len(set(readings)), f"a reading of message {i} lettered twice"
        if whole:  # the whole message is rejected: nothing else of it exists
            assert (len(whole), lines, readings) == (1, [], []), i
        if shape == "object":  # one reading: exactly one of stored or lettered
            assert bool(lines) != bool(mine) and len(mine) <= 1, i


# -- the by-kind fast path is the per-message loop, faster -----------------------------------
_GOOD = [
    (POLE, POLE_FULL),
    (POLE, POLE_RFC3339),
    (MANHOLE, MANHOLE_FULL),
    (TRAFFIC, TRAFFIC_3_LANES),
    (f"{ROOT}/riverside/pole/pole-0107", POLE_GATEWAY),
    (f"{POLE}/status", b'{"state": "online", "ts": 1795570800000}'),
    (f"{ROOT}/deadletter/schema", b'{"reason": "schema"}'),
]
_POOL = _GOOD + [(topic, payload) for topic, payload, reason, _ in MIXED if reason is not None]
# mostly good messages, so that whole kinds take the fast path; sometimes one that is not
_BATCHES = st.lists(
    st.one_of(st.sampled_from(_GOOD[:4]), st.sampled_from(_POOL)), min_size=1, max_size=40
)


def _one_at_a_time(t: Transform) -> Transform:
    """The reference: every message through the per-message loop (the fast path switched off)."""
    t.decoder._decode_by_kind = lambda topics, *_: list(range(len(topics)))  # type: ignore[method-assign]
    return t


@settings(max_examples=examples(200), deadline=None)
@given(_BATCHES)
def test_the_by_kind_path_gives_what_the_per_message_loop_gives(
    messages: list[tuple[str, bytes]],
) -> None:
    fast = transform(Metrics())(batch_of(messages), NOW_NS)
    loop = _one_at_a_time(transform(Metrics()))(batch_of(messages), NOW_NS)
    assert (fast.lines, fast.letters, fast.accepted) == (loop.lines, loop.letters, loop.accepted)


def test_a_clean_batch_takes_the_by_kind_path_whole() -> None:
    t = transform(Metrics())
    messages = [_GOOD[0], _GOOD[2], _GOOD[3], _GOOD[1]] * 5
    left = t.decoder._decode_by_kind(
        [m[0] for m in messages], [m[1] for m in messages], {k: KindRows() for k in KINDS}, []
    )
    assert left == []
    # one bad pole payload sends the poles, and only them, to the per-message loop
    messages[4] = (POLE, b'{"ts": 1795570800000, "pm25_ugm3": 1')
    left = t.decoder._decode_by_kind(
        [m[0] for m in messages], [m[1] for m in messages], {k: KindRows() for k in KINDS}, []
    )
    assert left == [i for i, (topic, _) in enumerate(messages) if topic == POLE]
