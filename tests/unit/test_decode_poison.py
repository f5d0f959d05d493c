"""One payload fails only itself: poison timestamps and integers, duplicate keys, and whatever
else decode/validate/encode might raise, each mixed into a batch of good messages."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityflux.config import Config
from cityflux.ingest.boundary import Staged, stage
from cityflux.ingest.decode import BatchDecoder
from cityflux.ingest.validate import validate
from cityflux.model.columns import Decoded
from cityflux.model.contract import Reason
from cityflux.store.lineprotocol import BatchEncoder
from tests.support import examples

NOW_NS = time.time_ns()
NOW_MS = NOW_NS // 1_000_000
POLE = "cityflux/v1/centre/pole/pole-0001"
TRAFFIC = "cityflux/v1/centre/traffic/det-0001"
STATUS = "cityflux/v1/centre/pole/pole-0001/status"
GOOD = (POLE, f'{{"ts": {NOW_MS}, "pm25_ugm3": 10.5}}'.encode())
BIG = 10**400
HUGE = "1" + "0" * 5000  # 10**5000: longer than msgspec (and Python's int()) read at all


def lane_payload(interval_s: object = 60, lane: object = 1, count: object = 1) -> bytes:
    """A traffic reading of one lane, numbers written as given (str for the huge ones)."""
    return (
        f'{{"ts": {NOW_MS}, "interval_s": {interval_s}, "lanes": [{{"lane": {lane}, '
        f'"count": {count}, "occupancy_pct": 5.0}}]}}'
    ).encode()


def run(messages: Sequence[tuple[str, bytes]], config: Config | None = None) -> Staged:
    config = config or Config()
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    topics = [t for t, _ in messages]
    payloads = [p for _, p in messages]
    return stage(decoder, BatchEncoder(), config.ingest, topics, payloads, NOW_NS)


def accepted(staged: Staged) -> dict[str, list[int]]:
    """Message indices of the accepted rows, per kind."""
    return {kind: c.message_index.tolist() for kind, c in staged.columns.items() if len(c)}


TIMESTAMP_POISON = [
    ("year 9999", POLE, b'{"ts": "9999-12-31T23:59:59Z", "pm25_ugm3": 1}'),
    ("year 0001", POLE, b'{"ts": "0001-01-01T00:00:00Z", "pm25_ugm3": 1}'),
    ("year 1677", POLE, b'{"ts": "1677-09-21T00:12:43Z", "pm25_ugm3": 1}'),
    ("year 2262", POLE, b'{"ts": "2262-04-11T23:47:17Z", "pm25_ugm3": 1}'),
    ("year 9999 offset", POLE, b'{"ts": "9999-12-31T23:59:59.999999999-23:59", "pm25_ugm3": 1}'),
    ("negative epoch", POLE, b'{"ts": -1, "pm25_ugm3": 1}'),
    ("ms at int64 max", POLE, b'{"ts": 9223372036854775807, "pm25_ugm3": 1}'),
    ("ms at 2**63", POLE, b'{"ts": 9223372036854775808, "pm25_ugm3": 1}'),
    ("ms below int64 min", POLE, b'{"ts": -9223372036854775809, "pm25_ugm3": 1}'),
    ("ms 10**400", POLE, f'{{"ts": {BIG}, "pm25_ugm3": 1}}'.encode()),
    ("ms 10**5000", POLE, f'{{"ts": {HUGE}, "pm25_ugm3": 1}}'.encode()),
    ("seconds, not ms", POLE, f'{{"ts": {NOW_MS // 1000}, "pm25_ugm3": 1}}'.encode()),
    ("ns at int64 max", POLE, b'{"ts_ns": 9223372036854775807, "pm25_ugm3": 1}'),
    ("ns at 2**63", POLE, b'{"ts_ns": 9223372036854775808, "pm25_ugm3": 1}'),
    ("ns at int64 min", POLE, b'{"ts_ns": -9223372036854775808, "pm25_ugm3": 1}'),
    ("ns below int64 min", POLE, b'{"ts_ns": -9223372036854775809, "pm25_ugm3": 1}'),
    ("ns 10**400", POLE, f'{{"ts_ns": {BIG}, "pm25_ugm3": 1}}'.encode()),
    ("ns -10**5000", POLE, f'{{"ts_ns": -{HUGE}, "pm25_ugm3": 1}}'.encode()),
    (
        "traffic year 9999",
        TRAFFIC,
        lane_payload().replace(str(NOW_MS).encode(), b'"9999-01-01T00:00:00Z"'),
    ),
    ("status year 9999", STATUS, b'{"state": "online", "ts": "9999-12-31T23:59:59Z"}'),
    ("status 2**63", STATUS, b'{"state": "offline", "ts": 9223372036854775808}'),
    ("status ns 10**400", STATUS, f'{{"state": "online", "ts_ns": {BIG}}}'.encode()),
]


# ids: the case names; a payload holds the wall clock, and the ids must be the same in every
# pytest-xdist process
@pytest.mark.parametrize(
    ("case", "topic", "payload"), TIMESTAMP_POISON, ids=[c[0] for c in TIMESTAMP_POISON]
)
def test_timestamp_poison_is_bad_timestamp_of_that_message_only(
    case: str, topic: str, payload: bytes
) -> None:
    staged = run([GOOD, (topic, payload), GOOD])
    assert [(r.reason, r.index) for r in staged.rejections] == [(Reason.BAD_TIMESTAMP, 1)], case
    assert accepted(staged) == {"pole": [0, 2]}


INTEGER_POISON = [
    ("interval_s 2**63", lane_payload(interval_s=2**63)),
    ("interval_s -2**63-1", lane_payload(interval_s=-(2**63) - 1)),
    ("interval_s 10**400", lane_payload(interval_s=BIG)),
    ("lane 2**63", lane_payload(lane=2**63)),
    ("lane 2**64", lane_payload(lane=2**64)),
    ("lane -10**400", lane_payload(lane=-BIG)),
    ("count 2**63", lane_payload(count=2**63)),
    ("count -2**63-1", lane_payload(count=-(2**63) - 1)),
    ("count 10**5000", lane_payload(count=HUGE)),
    # inside int64: decoded, then out of the contract's range
    ("lane int64 max", lane_payload(lane=2**63 - 1)),
    ("count int64 max", lane_payload(count=2**63 - 1)),
    ("interval_s int64 min", lane_payload(interval_s=-(2**63))),
]


@pytest.mark.parametrize(("case", "payload"), INTEGER_POISON)
def test_integer_poison_is_out_of_range_of_that_message_only(case: str, payload: bytes) -> None:
    good_traffic = (TRAFFIC, lane_payload())
    staged = run([good_traffic, (TRAFFIC, payload), GOOD, good_traffic])
    assert [(r.reason, r.index) for r in staged.rejections] == [(Reason.OUT_OF_RANGE, 1)], case
    assert accepted(staged) == {"traffic": [0, 3], "pole": [2]}


def test_a_poison_reading_in_an_array_rejects_that_reading_only() -> None:
    good = lane_payload().decode()
    readings = [
        good,
        good.replace('"count": 1', f'"count": {BIG}'),  # slow path: the typed decode fails
        good.replace(str(NOW_MS), '"9999-12-31T23:59:59Z"'),  # decodes, then bad_timestamp
        good.replace(str(NOW_MS), str(NOW_MS + 1)),
    ]
    staged = run([(TRAFFIC, f"[{', '.join(readings)}]".encode())])
    found = sorted(((r.reason, r.reading) for r in staged.rejections), key=lambda x: str(x[1]))
    assert found == [(Reason.OUT_OF_RANGE, 1), (Reason.BAD_TIMESTAMP, 2)]
    assert staged.columns["traffic"].reading_index.tolist() == [0, 3]


def test_other_non_numbers_in_a_timestamp() -> None:
    staged = run(
        [
            (POLE, b'{"ts": 1e300, "pm25_ugm3": 1}'),  # a float is not a timestamp's type
            (POLE, b'{"ts": NaN, "pm25_ugm3": 1}'),  # not JSON
            (POLE, b'{"ts": -Infinity, "pm25_ugm3": 1}'),
            GOOD,
        ]
    )
    assert [r.reason for r in staged.rejections] == [
        Reason.SCHEMA,
        Reason.INVALID_JSON,
        Reason.INVALID_JSON,
    ]
    assert accepted(staged) == {"pole": [3]}


# -- duplicate keys ---------------------------------------------------------------------------
GOOD_ELEMENT = f'{{"ts": {NOW_MS + 2}, "pm25_ugm3": 1}}'
BAD_ELEMENT = f'{{"ts": {NOW_MS}, "pm25_ugm3": "x"}}'  # a schema error: the slow path
DUPLICATE_ELEMENT = f'{{"ts": {NOW_MS + 1}, "pm25_ugm3": 1, "pm25_ugm3": 2}}'
DUPLICATES = [
    (
        "measurement",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "pm25_ugm3": 900}}',
        "pm25_ugm3",
        None,
    ),
    ("timestamp", POLE, f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "ts": {NOW_MS - 5}}}', "ts", None),
    (
        "null after",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "noise_dba": 50, "pm25_ugm3": null}}',
        "pm25_ugm3",
        None,
    ),
    (
        "both null",
        POLE,
        f'{{"ts": {NOW_MS}, "noise_dba": 50, "pm25_ugm3": null, "pm25_ugm3": null}}',
        "pm25_ugm3",
        None,
    ),
    (
        "escaped key",
        POLE,
        f'{{"ts": {NOW_MS}, "pm25_ugm3": 1, "pm25\\u005fugm3": 900}}',
        "pm25_ugm3",
        None,
    ),
    # an escaped colon in a string must not make up for the duplicate's colon in the count
    (
        "escaped colon",
        POLE,
        '{"ts": "2026-01-01T00\\u003a00:00Z", "pm25_ugm3": 1, "pm25_ugm3": 2}',
        "pm25_ugm3",
        None,
    ),
    (
        "rfc 3339 twice",
        POLE,
        '{"ts": "2026-01-01T00:00:00Z", "pm25_ugm3": 1, "ts": "2026-01-01T00:00:01+01:00"}',
        "ts",
        None,
    ),
    (
        "in a lane",
        TRAFFIC,
        lane_payload().decode().replace('"count": 1,', '"count": 1, "count": 2,'),
        "count",
        None,
    ),
    ("status", STATUS, '{"state": "online", "state": "offline"}', "state", None),
    (
        "in an array",
        POLE,
        f"[{GOOD_ELEMENT}, {DUPLICATE_ELEMENT}]",
        "pm25_ugm3",
        1,
    ),
    (
        "in an array, slow path",
        POLE,
        f"[{BAD_ELEMENT}, {DUPLICATE_ELEMENT}, {GOOD_ELEMENT}]",
        "pm25_ugm3",
        1,
    ),
]


@pytest.mark.parametrize(
    ("case", "topic", "payload", "key", "reading"), DUPLICATES, ids=[c[0] for c in DUPLICATES]
)
def test_duplicate_keys_are_rejected_not_last_wins(
    case: str, topic: str, payload: str, key: str, reading: int | None
) -> None:
    staged = run([GOOD, (topic, payload.encode()), GOOD])
    duplicates = [r for r in staged.rejections if r.message.startswith("duplicate key")]
    assert [(r.reason, r.message, r.index, r.reading) for r in duplicates] == [
        (Reason.SCHEMA, f"duplicate key {key}", 1, reading)
    ], case
    rows = {kind: c.message_index.tolist() for kind, c in staged.columns.items()}
    assert rows["pole"].count(0) == 1 and rows["pole"].count(2) == 1
    if reading is None:
        assert all(1 not in indices for indices in rows.values())
    else:  # the other reading of the array is kept
        assert rows["pole"].count(1) == 1


@pytest.mark.parametrize(
    "payload",
    [
        f'{{"ts": {NOW_MS}, "pm25_ugm3": null, "noise_dba": 50}}',  # a null key: counted apart
        '{"ts": "2026-01-01T00:00:00.5+08:00", "pm25_ugm3": 1}',  # colons in a string
        f'{{"ts": {NOW_MS}, "device_id": "pole\\u002d0001", "pm25_ugm3": 1}}',  # a backslash
        f'{{"ts" : {NOW_MS} ,\n "pm25_ugm3" :\t1 }}',  # whitespace anywhere
    ],
    ids=["null key", "colons in a string", "a backslash", "whitespace"],
)
def test_what_only_looks_like_a_duplicate_is_accepted(payload: str) -> None:
    config = Config().with_overrides({"ingest.max_past_s": 10**9})
    staged = run([GOOD, (POLE, payload.encode())], config)
    assert staged.rejections == []
    assert accepted(staged) == {"pole": [0, 1]}


POLE_KEYS = ["lamp_on", "lamp_power_w", "pm25_ugm3", "noise_dba", "humidity_pct"]
numbers = st.one_of(st.none(), st.floats(0, 100, allow_nan=False), st.integers(0, 100))
VALUES = {  # what a duplicate may hold: a value of the key's type, so the typed decode passes
    "ts": st.one_of(st.none(), st.integers(NOW_MS - 10**6, NOW_MS)),
    "device_id": st.just("pole-0001"),
    "lamp_on": st.one_of(st.none(), st.booleans()),
}


@st.composite
def pole_objects(draw: Any) -> tuple[list[tuple[str, Any]], bool]:
    """A pole reading as (key, value) pairs in writing order, maybe with a key written twice."""
    keys = draw(st.lists(st.sampled_from(POLE_KEYS), min_size=1, max_size=5, unique=True))
    ts = draw(st.sampled_from([NOW_MS, "2026-01-01T00:00:00Z", "2026-01-01T08:00:00+08:00", None]))
    pairs: list[tuple[str, Any]] = [("ts", ts)] + [
        (key, True if key == "lamp_on" else draw(st.floats(0, 100, allow_nan=False)))
        for key in keys
    ]
    if draw(st.booleans()):
        pairs.append(("device_id", "pole-0001"))
    twice = draw(st.booleans())
    if twice:
        key = draw(st.sampled_from([k for k, _ in pairs]))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(VALUES.get(key, numbers))))
    return draw(st.permutations(pairs)), twice


def write(pairs: list[tuple[str, Any]], space: str) -> str:
    return "{" + f",{space}".join(f"{json.dumps(k)}:{space}{json.dumps(v)}" for k, v in pairs) + "}"


@settings(max_examples=examples(300), deadline=None)
@given(
    st.lists(st.tuples(pole_objects(), st.sampled_from(["", " ", "\n"])), min_size=1, max_size=8)
)
def test_counting_finds_every_duplicate_and_only_those(
    objects: list[tuple[tuple[list[tuple[str, Any]], bool], str]],
) -> None:
    """Whatever the batch mixes, a payload is rejected as a duplicate iff it has one."""
    config = Config().with_overrides({"ingest.max_past_s": 10**9})
    messages = [(POLE, write(pairs, space).encode()) for (pairs, _), space in objects]
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    decoded: Decoded = decoder.decode([t for t, _ in messages], [p for _, p in messages], NOW_NS)
    flagged = {r.index for r in decoded.rejections if r.message.startswith("duplicate key")}
    assert flagged == {i for i, ((_, twice), _) in enumerate(objects) if twice}


# -- anything else that raises: the error boundary --------------------------------------------
class FaultyDecoder(BatchDecoder):
    """Fault injection: decoding raises whenever the batch holds a message of a marked device."""

    def decode(self, topics: Sequence[str], payloads: Sequence[bytes], now_ns: int) -> Decoded:
        devices = [topic.rsplit("/", 1)[-1].split("-")[0] for topic in topics]
        if "boom" in devices:
            raise ZeroDivisionError("injected")
        if "bang" in devices:
            raise KeyError("other cause")
        if devices.count("half") == 2:
            raise RuntimeError("only these two together")
        return super().decode(topics, payloads, now_ns)


def marked(word: str, n: int) -> tuple[str, bytes]:
    """A valid reading of the device ``{word}-{n}``: pm25_ugm3 = n."""
    return (
        f"cityflux/v1/centre/pole/{word}-{n}",
        f'{{"ts": {NOW_MS + n}, "pm25_ugm3": {n}}}'.encode(),
    )


def run_faulty(messages: list[tuple[str, bytes]]) -> Staged:
    config = Config()
    decoder = FaultyDecoder(config.ingest, config.mqtt.topic_root)
    return stage(
        decoder,
        BatchEncoder(),
        config.ingest,
        [t for t, _ in messages],
        [p for _, p in messages],
        NOW_NS,
    )


def test_a_message_that_raises_is_an_internal_error_and_the_rest_is_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = [(POLE, f'{{"ts": {NOW_MS + i}, "pm25_ugm3": {i}}}'.encode()) for i in range(1000)]
    for index in (3, 500, 998):
        messages[index] = marked("boom", index)
    messages[700] = marked("bang", 700)
    with caplog.at_level(logging.ERROR, logger="cityflux.ingest.boundary"):
        staged = run_faulty(messages)
    errors = sorted((r.index, r.reason, r.message.split(" at ")[0]) for r in staged.rejections)
    assert errors == [
        (3, Reason.INTERNAL_ERROR, "ZeroDivisionError: injected"),
        (500, Reason.INTERNAL_ERROR, "ZeroDivisionError: injected"),
        (700, Reason.INTERNAL_ERROR, "KeyError: 'other cause'"),
        (998, Reason.INTERNAL_ERROR, "ZeroDivisionError: injected"),
    ]
    kept = staged.columns["pole"]
    assert sorted(kept.message_index.tolist()) == sorted(set(range(1000)) - {3, 500, 700, 998})
    # values travel with their own message index: nothing shifted between slices
    assert all(
        value == index
        for value, index in zip(
            kept.fields["pm25_ugm3"].tolist(), kept.message_index.tolist(), strict=True
        )
    )
    assert len(staged.lines) == 996
    assert kept.readings() == 996  # group ids stayed distinct across the merged slices
    # the traceback once per cause: two causes, four messages
    logged = [r for r in caplog.records if "internal_error" in r.getMessage()]
    assert len(logged) == 2
    assert all(r.exc_info is not None for r in logged)


def test_a_failure_only_two_messages_cause_together_costs_nothing() -> None:
    messages = [(POLE, f'{{"ts": {NOW_MS + i}, "pm25_ugm3": 1}}'.encode()) for i in range(16)]
    messages[2], messages[13] = marked("half", 2), marked("half", 13)
    staged = run_faulty(messages)
    assert [r.index for r in staged.rejections if r.reason == Reason.INTERNAL_ERROR] == []
    assert sorted(staged.columns["pole"].message_index.tolist()) == list(range(16))


# -- nothing a payload holds makes the batch step raise ---------------------------------------
FIELD_NAMES = sorted(
    {"ts", "ts_ns", "device_id", "kind", "interval_s", "lanes", "lane", "count", "state"}
    | {name for name in POLE_KEYS}
    | {"occupancy_pct", "speed_kmh", "cover_open", "tilt_deg", "a\nb", ""}
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**400, NOW_MS]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "online", "pole"]),
)
lanes = st.lists(
    st.fixed_dictionaries(
        {"lane": scalars, "count": scalars, "occupancy_pct": scalars},
        optional={"speed_kmh": scalars},
    ),
    max_size=3,
)
shaped = st.one_of(  # readings of the right shape with anything in their slots
    st.fixed_dictionaries({"ts": scalars, "interval_s": scalars, "lanes": lanes}),
    st.fixed_dictionaries(
        {"ts": scalars}, optional={"ts_ns": scalars, "pm25_ugm3": scalars, "lamp_on": scalars}
    ),
    st.fixed_dictionaries({"state": scalars}, optional={"ts": scalars, "ts_ns": scalars}),
)
json_values = st.recursive(
    st.one_of(scalars, shaped, st.lists(shaped, max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=6),
    ),
    max_leaves=20,
)


@settings(max_examples=examples(400), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([POLE, TRAFFIC, STATUS, "cityflux/v1/centre/manhole/mh-1"]),
            json_values,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_no_payload_makes_the_batch_step_raise(messages: list[tuple[str, Any]]) -> None:
    """Without the boundary: arbitrary JSON in every field decodes, validates and encodes."""
    config = Config()
    decoder = BatchDecoder(config.ingest, config.mqtt.topic_root)
    payloads = [json.dumps(value).encode() for _, value in messages]
    decoded = decoder.decode([t for t, _ in messages], payloads, NOW_NS)
    encoder = BatchEncoder()
    for columns in decoded.columns.values():
        good, _ = validate(columns, config.ingest, NOW_NS)
        for line in encoder.encode(good):
            assert "\n" not in line
